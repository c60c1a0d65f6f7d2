"""The core runs on any JAX machine: importing it (and every core module) loads neither TensorFlow nor PyTorch."""
import subprocess
import sys

CORE_MODULES = ["gain_jax", "gain_jax.attention", "gain_jax.variants", "gain_jax.gain", "gain_jax.models",
                "gain_jax.convert", "gain_jax.training", "gain_jax.metrics", "gain_jax.viz", "gain_jax.explain",
                "gain_jax.config", "gain_jax.evaluate", "gain_jax.checkpoint", "gain_jax.quiet",
                "gain_jax.datasets", "gain_jax.part_metrics",
                "gain_jax.train_loop", "gain_jax.train_loop.loop",  # loop: every module but:
                "gain_jax.train_loop.provenance"]  # the loop imports gain_jax.data (TensorFlow) only when a run starts


def test_core_imports_neither_tensorflow_nor_torch():
    code = ("import importlib, sys\n"
            f"for name in {CORE_MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch', 'torchvision'))\n"
            "print(heavy[:5])\n"
            "sys.exit(1 if heavy else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
