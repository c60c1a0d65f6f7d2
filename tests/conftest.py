"""Fixtures shared by the tests that train: one prepared gain_shapes data dir and one JAX compilation cache
per test session (per xdist worker), so the data set is built once and equal programs compile once.

The `slow` marker (registered in pyproject.toml) labels a test that trains, starts subprocesses or compiles a
large model; `python -m pytest -m "not slow"` is the fast tier, which keeps a cheaper test of every module
(a parametrized test keeps its cheap cases there). CI runs everything.
"""
import pytest


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """gain_shapes prepared once for the whole session."""
    import gain_jax.data as gd

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    gd.make_dataset("gain_shapes", "train", data_dir=data_dir, batch_size=1, train=False)
    return data_dir


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))
