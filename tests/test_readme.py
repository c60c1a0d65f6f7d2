"""README.md stays true: every ```python block runs as written, the flags it names exist, and the relative
links of the repository's Markdown files point at files (and headings) that exist.

Each block runs in its own fresh Python process (as a reader would paste it), in a temporary working
directory, with TFDS_DATA_DIR set to the session's prepared gain_shapes folder (conftest.py: built once, as
`make_dataset` builds it for any data dir), so that the training-loop example reads the embedded set from tfds'
default (data_dir=None) and writes its run under the working directory.
"""
import os
import re
import subprocess
import sys

import pytest
from test_train_cli import load_train_py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MARKDOWN = ("README.md", "experiments/README.md", "docs/design.md", "parity_tests/README.md", "bench/README.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def python_blocks():
    """(line number, code) of every ```python block of README.md."""
    text = read("README.md")
    return [(text.count("\n", 0, match.start()) + 1, match.group(2))
            for match in FENCE.finditer(text) if match.group(1) == "python"]


BLOCKS = python_blocks()


def test_readme_has_the_library_examples():
    code = "\n".join(block for _, block in BLOCKS)
    assert len(BLOCKS) >= 3
    for name in ("gain_forward", "gain_losses", "make_train_step", "gj.register", "train_and_evaluate", "evaluate("):
        assert name in code, name


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
@pytest.mark.slow
def test_python_block_runs(line, code, shapes_data_dir, tmp_path):
    env = dict(os.environ, TFDS_DATA_DIR=shapes_data_dir, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1")
    script = tmp_path / f"readme_{line}.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (f"README.md block at line {line} failed (exit {result.returncode})\n"
                                    f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")


def train_flags():
    return {option for action in load_train_py().build_parser()._actions for option in action.option_strings}


def test_flags_in_the_readme_table_are_train_py_flags():
    rows = [line for line in read("README.md").splitlines() if line.startswith("| `--")]
    named = {flag for row in rows for flag in re.findall(r"`(--\w+)", row.split("|")[1])}
    assert len(named) >= 12
    assert named <= train_flags(), sorted(named - train_flags())


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


@pytest.mark.parametrize("path", MARKDOWN)
def test_relative_links_point_at_files_and_headings_that_exist(path):
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", read(path)))  # links only, not code
    folder = os.path.dirname(os.path.join(ROOT, path))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(folder, file_part)) if file_part else os.path.join(ROOT, path)
        assert os.path.exists(linked), f"{path}: link to {target}: no such file"
        assert os.path.commonpath([linked, ROOT]) == ROOT, f"{path}: link to {target} leaves the repository"
        if anchor:
            with open(linked, encoding="utf-8") as handle:
                headings = {slug(line.lstrip("#")) for line in handle if line.startswith("#")}
            assert anchor in headings, f"{path}: link to {target}: no such heading"
