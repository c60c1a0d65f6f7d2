"""experiments/parts_study.py's `heldout` command without training: its flags' refusals, its refusals without the
selection file, without the test result or with a test result of other runs, and what it hands the shared
evaluation (`evaluate_chosen`, monkeypatched here; the tiny study in tests/test_parts_study.py runs it for real)."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import parts_study as study

ARMS = ["baseline", "GAIN", "GAIN_ext@10%", "ex_only@100%"]


@pytest.mark.parametrize("argv, message", [
    (["heldout"], "heldout needs --heldout_seed"),
    (["heldout", "--heldout_seed", "-1"], "--heldout_seed must be in [0, 2**32)"),
    (["heldout", "--heldout_seed", str(2 ** 32)], "--heldout_seed must be in [0, 2**32)"),
    (["heldout", "--heldout_seed", "x"], "invalid int value"),
    (["heldout", "--heldout_seed", "3", "--heldout_images", "1"], "--heldout_images must be in [2, 1000000]"),
    (["heldout", "--heldout_seed", "3", "--arms", "GAIN"], "needs the baseline"),
    (["test", "--heldout_seed", "3"], "are for the heldout command"),
    (["select", "--heldout_images", "10"], "are for the heldout command"),
])
def test_bad_heldout_flags_exit_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        study.parse_args(["--budget", "tiny", *argv])
    assert error.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


def test_heldout_refuses_without_selection_or_test_result_and_evaluates_the_test_s_arms(tmp_path, monkeypatch):
    argv = ["heldout", "--budget", "tiny", "--seeds", "0,1", "--arms", *ARMS, "--out", str(tmp_path),
            "--logdir", str(tmp_path / "runs"), "--heldout_seed", "7", "--heldout_images", "3"]
    args = study.parse_args(argv)
    assert (args.heldout_seed, args.heldout_images) == (7, 3)
    assert study.parse_args(argv[:-2]).heldout_images == study.HELDOUT_IMAGES == 500
    with pytest.raises(SystemExit, match="no selection file"):
        study.main(argv)
    chosen = {target.name: "GAIN" if target.name.startswith("self-guided") else None for target in study.TARGETS}
    (tmp_path / f"{args.name}.selection.json").write_text(json.dumps(
        {"arms": ARMS, "seeds": [0, 1], "gain_parts_version": study.data_version(), "dataset": args.dataset,
         "targets": {name: {"arm": arm} for name, arm in chosen.items()}}))
    with pytest.raises(SystemExit, match="no test result .*: run `test` first"):
        study.main(argv)
    # test evaluates the baseline, the chosen arm and the ceiling, not the unchosen GAIN_ext@10%
    arms = ["baseline", "GAIN", "ex_only@100%"]
    runs = {study.run_name(arm, seed, args): {"arm": arm, "seed": seed} for arm in arms for seed in (0, 1)}
    test_result = tmp_path / f"{args.name}.test.json"
    test_result.write_text(json.dumps({"per_run": dict(list(runs.items())[:-1])}))
    with pytest.raises(SystemExit, match="holds the runs"):
        study.main(argv)
    test_result.write_text(json.dumps({"per_run": runs}))
    with pytest.raises(SystemExit, match="no finished run"):
        study.main(argv)

    monkeypatch.setattr(study, "existing_runs", lambda arms, args, command: None)
    handed = {}

    def evaluate_chosen(args, selection, source, images, note=""):
        handed.update(arms=study.chosen_arms(args, selection), source=source, images=images, note=note)
        return {"per_run": "..."}, "the table"

    monkeypatch.setattr(study, "evaluate_chosen", evaluate_chosen)
    assert study.main(argv) == 0
    assert handed["arms"] == arms and handed["images"] == "held-out"
    assert "generated at evaluation time from the seed" in handed["note"] and "stored nowhere" in handed["note"]
    filenames = [name for batch in handed["source"] for name in batch["filename"]]
    assert filenames == [b"parts_heldout7_000000", b"parts_heldout7_000001", b"parts_heldout7_000002"]
    assert handed["source"][0]["image"].dtype == np.float32 and handed["source"][0]["image"].shape == (3, 112, 112, 3)
    record = json.loads((tmp_path / f"{args.name}.heldout.json").read_text())
    assert record["per_run"] == "..." and record["heldout"]["arms"] == arms
    assert (record["heldout"]["seed"], record["heldout"]["images"], record["heldout"]["stream"]) == (7, 3, "heldout7")
    assert record["heldout"]["test_result"] == test_result.name
    assert (tmp_path / f"{args.name}.heldout.md").read_text() == "the table\n"
