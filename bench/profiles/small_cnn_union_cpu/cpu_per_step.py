"""Process CPU time (all threads) and wall time per default GAIN step (union), small_cnn 64x64 b32 (or --backbone,
--image-size, --batch-size), of the gain_jax package found in PACKAGE_ROOT: a measure of the step's work that
the machine's load does not inflate the way it inflates wall time (a preempted thread uses no CPU), for A/B
runs on a busy machine.

    git archive main gain_jax | tar -x -C /tmp/main_tree
    for i in 1 2 3; do for root in /tmp/main_tree .; do
        python bench/profiles/small_cnn_union_cpu/cpu_per_step.py $root; done; done

The weights are flax's initialization (seed 0), 2 untimed steps, then --steps timed ones (median and minimum).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package_root", help="directory holding the gain_jax package to time")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    root = os.path.abspath(args.package_root)
    sys.path.insert(0, root)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import gain_jax as gj

    if not os.path.abspath(gj.__file__).startswith(root + os.sep):
        raise SystemExit(f"gain_jax was imported from {gj.__file__}, not from {root}")
    rng = np.random.default_rng(0)
    model = gj.build_model(args.backbone, 20, dropout_rate=0.5)
    size, batch_size = args.image_size, args.batch_size
    images = jnp.asarray(rng.normal(size=(batch_size, size, size, 3)).astype(np.float32))
    labels = np.zeros((batch_size, 20), np.float32)
    for row in labels:
        row[rng.choice(20, 2, replace=False)] = 1.0
    state = gj.create_train_state(model.init(jax.random.PRNGKey(0), images[:1]), optax.adam(1e-4))
    batch = {"image": images, "labels": jnp.asarray(labels)}
    on = jnp.float32(1.0)
    compiled = gj.make_train_step(model, gj.GainConfig()).lower(state, batch, jax.random.PRNGKey(0), on).compile()
    walls, cpus = [], []
    for index in range(2 + args.steps):
        cpu, wall = time.process_time(), time.perf_counter()
        state, metrics = compiled(state, batch, jax.random.PRNGKey(index), on)
        jax.block_until_ready((state, metrics))
        if index >= 2:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    print(f"{root} {args.backbone} {size}x{size} b{batch_size}: load {os.getloadavg()[0]:.1f}; "
          f"wall median {statistics.median(walls) * 1e3:.1f} min "
          f"{min(walls) * 1e3:.1f} ms; process CPU median {statistics.median(cpus) * 1e3:.1f} min "
          f"{min(cpus) * 1e3:.1f} ms; last loss {float(metrics['loss']):.6f}")


if __name__ == "__main__":
    main()
