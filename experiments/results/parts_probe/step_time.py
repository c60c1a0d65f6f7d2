"""One small_cnn GAIN_ext train step (train.py's default GAIN settings, batch 32, random inputs) at a given image
size: the cost behind gain_parts' 112 px (a 14x14 Grad-CAM grid) against gain_shapes' 64 px. Mean of 10 steps
after one compiling step.

    python experiments/results/parts_probe/step_time.py 112 [num_classes]
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gain_jax as gj
from gain_jax.config import BENCHMARK_GAIN
from gain_jax.training import create_train_state, make_train_step

BATCH = 32
STEPS = 10


def main(size: int, num_classes: int) -> None:
    model = gj.build_model("small_cnn", num_classes)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, size, size, 3)), jnp.float32)
    labels = np.eye(num_classes, dtype=np.float32)[np.arange(BATCH) % num_classes]
    batch = {"image": images, "labels": jnp.asarray(labels),
             "mask": jnp.ones((BATCH, size, size), jnp.uint8), "has_mask": jnp.ones(BATCH, bool)}
    state = create_train_state(model.init(jax.random.PRNGKey(0), images[:1]), optax.adam(1e-3))
    step = make_train_step(model, BENCHMARK_GAIN)
    state, out = step(state, batch, jax.random.PRNGKey(1), 1.0)
    jax.block_until_ready(out["loss"])
    started = time.perf_counter()
    for index in range(STEPS):
        state, out = step(state, batch, jax.random.PRNGKey(index), 1.0)
    jax.block_until_ready(out["loss"])
    print(f"size {size}: {(time.perf_counter() - started) / STEPS * 1000:.0f} ms/step (batch {BATCH}, GAIN_ext)")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 6)
