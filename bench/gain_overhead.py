"""Step-time ratio of a GAIN train step to a plain classification train step (same model, batch, device).

    python bench/gain_overhead.py                       # small_cnn 64x64 b32 and vgg16 112x112 b4
    python bench/gain_overhead.py --backbone vgg16 --image-size 224 --batch-size 8 --steps 10

A GAIN step is one classification forward+backward, K head-only VJPs for Grad-CAM and one forward+backward
over the B*K masked images, so union mode should cost about 2x a classification step (target <= 2.3;
a full backward for Grad-CAM would push it near 2.7). Per-label mode with n labels per image: K = n.
Only JAX, flax and optax are imported (runs on a GPU machine without TensorFlow).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gain_jax as gj


def make_classification_step(model):
    """The baseline: BCE-with-logits, Adam, nothing else."""

    def step(state, batch, rng):
        def loss_fn(params):
            variables = gj.training.variables_of(params, state.batch_stats)
            if state.batch_stats:
                logits, new_state = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"],
                                                rngs={"dropout": rng})
            else:
                logits, new_state = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng}), {}
            return optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean(), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             batch_stats=new_state.get("batch_stats", state.batch_stats), opt_state=opt_state), loss

    return jax.jit(step, donate_argnums=(0,))


def labels_with(num_labels: int, batch_size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.zeros((batch_size, num_classes), np.float32)
    for row in labels:
        row[rng.choice(num_classes, num_labels, replace=False)] = 1.0
    return labels


def time_steps(step_fn, state, batch, steps: int, warmup: int, extra_args=()):
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, out = step_fn(state, batch, jax.random.PRNGKey(i), *extra_args)
        jax.block_until_ready((state, out))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), state


def bench(backbone: str, image_size: int, batch_size: int, steps: int, warmup: int, num_classes: int = 20):
    rng = np.random.default_rng(0)
    model = gj.build_model(backbone, num_classes, dropout_rate=0.5)
    images = jnp.asarray(rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32))
    variables = model.init(jax.random.PRNGKey(0), images[:1])
    tx = optax.adam(1e-4)
    fresh_state = lambda: gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), tx)  # noqa: E731

    rows = []
    batch = {"image": images, "labels": jnp.asarray(labels_with(2, batch_size, num_classes, rng))}
    # interleave baseline and GAIN runs so that machine noise hits both alike
    base_time, _ = time_steps(make_classification_step(model), fresh_state(), batch, steps, warmup)
    cases = [("union (2 labels)", gj.GainConfig(mode="union"), 2),
             ("per-label, 2 labels", gj.GainConfig(mode="per_label", max_labels=2), 2),
             ("per-label, 3 labels", gj.GainConfig(mode="per_label", max_labels=3), 3)]
    for name, cfg, num_labels in cases:
        batch = {"image": images, "labels": jnp.asarray(labels_with(num_labels, batch_size, num_classes, rng))}
        gain_time, _ = time_steps(gj.make_train_step(model, cfg), fresh_state(), batch, steps, warmup,
                                  extra_args=(jnp.float32(1.0),))
        base_again, _ = time_steps(make_classification_step(model), fresh_state(), batch, steps, warmup)
        baseline = statistics.median([base_time, base_again])
        rows.append((name, baseline, gain_time, gain_time / baseline))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="one backbone (default: small_cnn, then vgg16)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    args = parser.parse_args(argv)
    if args.backbone:
        configs = [(args.backbone, args.image_size or 224, args.batch_size or 8)]
    else:
        configs = [("small_cnn", 64, 32), ("vgg16", 112, 4)]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"{'backbone':<10} {'input':>9} {'batch':>5}  {'case':<22} {'cls step ms':>11} {'GAIN step ms':>12} "
          f"{'ratio':>6}")
    for backbone, size, batch_size in configs:
        for name, base, gain, ratio in bench(backbone, size, batch_size, args.steps, args.warmup):
            print(f"{backbone:<10} {f'{size}x{size}':>9} {batch_size:>5}  {name:<22} {base * 1e3:>11.1f} "
                  f"{gain * 1e3:>12.1f} {ratio:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
