"""Fixtures shared by the tests that train: one prepared gain_shapes data dir per test session (per xdist worker),
so the data set is built once, and one JAX compilation cache for the whole session, so equal programs compile once.

The cache (a temporary folder made when the session starts, removed when it ends) is set in the environment before
any test imports JAX: the tests' own programs, the xdist workers (they inherit the environment) and every
subprocess a test starts (train.py, the bench scripts, README blocks) read and write it. A train_and_evaluate or
train.py run builds its jitted functions anew, so without it each run compiles what the last one did.

The `slow` marker (registered in pyproject.toml) labels a test that trains, starts subprocesses or compiles a
large model; `python -m pytest -m "not slow"` is the fast tier, which keeps a cheaper test of every module
(a parametrized test keeps its cheap cases there). CI runs everything.
"""
import os
import shutil
import sys
import tempfile

import pytest

CACHE_OWNER = "GAIN_JAX_TEST_COMPILE_CACHE"  # set by the process that made the folder; xdist workers inherit it
made_cache = pytest.StashKey[str]()


def pytest_configure(config):
    if CACHE_OWNER not in os.environ:
        os.environ[CACHE_OWNER] = tempfile.mkdtemp(prefix="gain_jax_compile_cache_")
        config.stash[made_cache] = os.environ[CACHE_OWNER]
    settings = {"jax_compilation_cache_dir": os.environ[CACHE_OWNER], "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": 0}  # every program, however quick to compile
    os.environ.update({name.upper(): str(value) for name, value in settings.items()})
    if "jax" in sys.modules:  # imported before this hook (by a plugin): it has read the environment already
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)


def pytest_unconfigure(config):
    made = config.stash.get(made_cache, None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
        os.environ.pop(CACHE_OWNER, None)


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """gain_shapes prepared once for the whole session."""
    import gain_jax.data as gd

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    gd.make_dataset("gain_shapes", "train", data_dir=data_dir, batch_size=1, train=False)
    return data_dir


@pytest.fixture(scope="session")
def compile_cache():
    """The session's JAX compilation cache folder (already in the environment subprocesses inherit)."""
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
