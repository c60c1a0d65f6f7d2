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


@pytest.fixture(autouse=True, scope="module")
def compile_at_level_0():
    """Every test module of tests/ compiles with JAX's `jax_disable_most_optimizations` (XLA's backend optimization
    level 0, LLVM's expensive passes off), in this process and in the subprocesses it starts (train.py, bench
    scripts, README blocks: JAX_DISABLE_MOST_OPTIMIZATIONS in the environment). Most of the suite's time is compiling
    distinct programs, and these compile about a third faster; XLA's HLO passes still run, and what these tests check
    (behaviour, equalities between two paths compiled alike, tolerances measured at both levels) holds at both
    levels: the whole suite passed with every program at level 0 except two of resnet18's float32 parity cases, which
    is why parity_tests/ compiles at the default level (parity_tests/conftest.py clears JAX's in-memory caches as
    each of its modules starts, since this flag is not part of their keys)."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations"), os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS")
    jax.config.update("jax_disable_most_optimizations", True)
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    yield
    jax.config.update("jax_disable_most_optimizations", before[0])
    if before[1] is None:
        os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    else:
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = before[1]
