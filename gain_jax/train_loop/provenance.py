"""What produced a run, for its config.json: the library versions and the code's git revision.

Versions come from the installed packages' metadata (importlib.metadata): nothing is imported, torch
included (importing torch after TensorFlow crashes with some wheels).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

# the distributions a run depends on; a name's alternatives (TensorFlow's CPU-only wheel) after it
LIBRARIES = {"jax": ("jax",), "jaxlib": ("jaxlib",), "flax": ("flax",), "optax": ("optax",),
             "orbax-checkpoint": ("orbax-checkpoint",), "tensorflow": ("tensorflow", "tensorflow-cpu"),
             "tensorflow-datasets": ("tensorflow-datasets",), "numpy": ("numpy",), "torch": ("torch",)}
REQUIRED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow", "tensorflow-datasets", "numpy")


def library_versions() -> dict[str, str]:
    """{library: installed version}; torch only when it is installed (it is optional)."""
    versions = {"python": platform.python_version()}
    for name, distributions in LIBRARIES.items():
        for distribution in distributions:
            try:
                versions[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            if name in REQUIRED:
                versions[name] = "unknown"
    return versions


def _git(root: str, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_revision(root: str | None = None) -> dict | None:
    """{"revision", "dirty"} of the checkout gain_jax runs from (tracked files changed: dirty); None when
    gain_jax is not run from a git checkout (an installed package) or git is missing."""
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(top) != os.path.realpath(root):
        return None  # e.g. site-packages inside some other repository
    revision = _git(root, "rev-parse", "HEAD")
    changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    if revision is None or changes is None:
        return None
    return {"revision": revision, "dirty": bool(changes)}


def environment_record() -> dict:
    """config.json's "environment": library versions and, from a checkout, the git revision."""
    return {"versions": library_versions(), "git": git_revision()}
