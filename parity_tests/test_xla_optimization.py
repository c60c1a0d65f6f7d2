"""The suite compiles with LLVM's optimization of XLA:CPU's machine code off (the root conftest.py's TEST_XLA_FLAGS,
to compile faster); users' programs compile at the default level. The two levels round differently in the last
bits, so small_cnn's float32 parity cases (the tightest margins of the suite) and a float64 case run again here, in
a pytest process at the default level with a compile cache of its own, held to the same tolerances."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"  # = conftest.TEST_XLA_FLAGS (the root conftest, not importable)
CASES = ["test_float32_outputs_losses", "test_float64_outputs_losses_grads[small_cnn-24x40-b3-per_label-train-ex]"]


@pytest.mark.slow
def test_parity_holds_at_the_default_xla_optimization_level():
    if not os.environ.get("GAIN_JAX_TEST_DEFAULT_XLA_OPT"):  # the session itself runs at level 0
        assert TEST_XLA_FLAGS in os.environ.get("XLA_FLAGS", "").split()
    env = {name: value for name, value in os.environ.items()
           if name not in ("JAX_COMPILATION_CACHE_DIR", "GAIN_JAX_TEST_COMPILE_CACHE", "PYTEST_XDIST_WORKER")}
    env["XLA_FLAGS"] = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split() if flag != TEST_XLA_FLAGS)
    env["GAIN_JAX_TEST_DEFAULT_XLA_OPT"] = "1"
    node_ids = [f"parity_tests/test_parity_small_cnn.py::{case}" for case in CASES]
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                            *node_ids], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-2000:]
    assert "4 passed" in child.stdout
    assert "float32   mask" in child.stdout  # the parity summary: the cases compared what they compare
