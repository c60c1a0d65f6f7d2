"""N seeds of one configuration trained as one program (`gain_jax.make_sweep_train_step`) against N steps
one after another, in one process.

    python bench/seed_sweep.py                          # CPU: small_cnn 64x64 b32, 5 seeds
    python bench/seed_sweep.py --seeds 1,5,20,50        # e.g. on a GPU

The step is the default run's (`train.py` with no flags: `BENCHMARK_GAIN`, small_cnn, 64x64, batch 32, Adam,
dropout 0.5, six classes, the mask loss on every image). For each N, three ways to advance N runs by one step
each, timed in alternation (median of `--steps` rounds after `--warmup` untimed ones; above `--max-unrolled` runs
only vmap):
- sequential: N calls of the single-run step (`make_train_step`), the way N runs one after another spend it;
- unrolled: `make_sweep_train_step(strategy="unrolled")`, N copies of the step in one program;
- vmap: `make_sweep_train_step(strategy="vmap")`, the step batched over the run axis.
Printed: ms per round (all N runs advanced by one step), run-steps/s, and each way's speed-up over sequential.
This measures the step alone: input pipelines, evaluation and checkpoints are not included.

Imports JAX, flax and optax, never TensorFlow or torch: runs on a GPU machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gain_jax as gj
from gain_jax.config import BENCHMARK_GAIN

NUM_CLASSES = 6  # gain_shapes


def synthetic_batch(rng: np.random.Generator, batch_size: int, image_size: int) -> dict:
    """A batch shaped like gain_shapes' (image, labels, masks for the mask loss)."""
    size = (batch_size, image_size, image_size)
    return {"image": jnp.asarray(rng.normal(size=(*size, 3)), jnp.float32),
            "labels": jnp.asarray(rng.integers(0, 2, size=(batch_size, NUM_CLASSES)), jnp.float32),
            "mask": jnp.asarray(rng.integers(0, NUM_CLASSES + 1, size=size), jnp.uint8),
            "has_mask": jnp.ones((batch_size,), bool)}


def median_ms(run_once, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        run_once()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def ways(model, runs: int, batch_size: int, image_size: int, learning_rate: float) -> dict:
    """name -> a closure that advances `runs` runs by one step each and blocks until done."""
    rng = np.random.default_rng(runs)
    tx = optax.adam(learning_rate)
    init_images = jnp.zeros((1, image_size, image_size, 3))
    states = [gj.create_train_state(model.init(jax.random.PRNGKey(run), init_images), tx) for run in range(runs)]
    batches = [synthetic_batch(rng, batch_size, image_size) for _ in range(runs)]
    keys = [jax.random.PRNGKey(1000 + run) for run in range(runs)]
    single = gj.make_train_step(model, BENCHMARK_GAIN)
    sweeps = {strategy: gj.make_sweep_train_step(model, BENCHMARK_GAIN, strategy=strategy)
              for strategy in gj.training.SWEEP_STRATEGIES}  # compiled on first call only
    held = {"sequential": states, **{strategy: gj.stack_trees(states) for strategy in sweeps}}
    stacked_batches, stacked_keys = gj.stack_trees(batches), jnp.stack(keys)

    def sequential():
        held["sequential"] = [single(state, batch, key, 1.0)[0]
                              for state, batch, key in zip(held["sequential"], batches, keys)]
        jax.block_until_ready(held["sequential"])

    def sweep(strategy):
        def run_once():
            held[strategy] = sweeps[strategy](held[strategy], stacked_batches, stacked_keys, 1.0)[0]
            jax.block_until_ready(held[strategy])
        return run_once

    return {"sequential": sequential, **{strategy: sweep(strategy) for strategy in sweeps}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="5", help="comma-separated run counts N (default: 5)")
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds per way (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compilation)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes over the ways; best kept")
    parser.add_argument("--max-unrolled", type=int, default=20,
                        help="largest N timed unrolled and sequential (their compile and dispatch grow with N)")
    args = parser.parse_args(argv)
    try:
        run_counts = [int(text) for text in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: a comma-separated list of integers, got {args.seeds!r}")
    if any(count < 1 for count in run_counts):
        parser.error(f"--seeds: every run count must be at least 1, got {args.seeds!r}")

    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {device.platform} ({device.device_kind}), {platform.node()}, "
          f"{os.cpu_count()} CPUs; {args.backbone} {args.image_size}x{args.image_size} batch {args.batch_size}, "
          f"BENCHMARK_GAIN, Adam; median of {args.steps} rounds after {args.warmup}, best of {args.repeats} passes")
    model = gj.build_model(args.backbone, NUM_CLASSES, dropout_rate=0.5)
    print(f"{'runs':>4}  {'way':<10} {'ms/round':>9} {'run-steps/s':>11} {'speed-up':>8}")
    for runs in run_counts:
        closures = ways(model, runs, args.batch_size, args.image_size, 1e-3)
        if runs > args.max_unrolled:
            closures = {"vmap": closures["vmap"]}
        best = {name: float("inf") for name in closures}
        for _ in range(args.repeats):
            for name, run_once in closures.items():
                best[name] = min(best[name], median_ms(run_once, args.steps, args.warmup))
        for name, ms in best.items():
            speed_up = f"{best['sequential'] / ms:>7.2f}x" if "sequential" in best else "    n/a"
            print(f"{runs:>4}  {name:<10} {ms:>9.1f} {1e3 * runs / ms:>11.1f} {speed_up}")
    assert "tensorflow" not in sys.modules and "torch" not in sys.modules


if __name__ == "__main__":
    main()
