"""Screen of gain_shapes designs for issue 20's item 1: does the classification-only baseline's shortcut
survive 1x, 2x, 4x and 8x the default budget (600 steps of 32), and what does an unbiased training set of the
same size reach (the oracle)? Validation splits only: no test split is rendered here.

A stand-alone loop, not train.py: the same small_cnn (gain_jax.models), sigmoid cross-entropy, Adam 1e-3,
batch 32, dropout 0.5, ImageNet normalization and no augmentation as the baseline arm of
experiments/biased_shapes.py, on images rendered in memory by gain_jax/data/shapes_render.py (loaded by path,
so that neither TensorFlow nor tfds is needed: it runs on a machine that has only JAX). One long run per
(design, training split), evaluated at each budget. For screening designs; the chosen one is then checked
with train.py itself.

    python experiments/probes/shortcut_screen.py --designs v2 patch12 --out /tmp/screen.json
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "shapes_render", os.path.join(REPO_ROOT, "gain_jax", "data", "shapes_render.py"))
sr = importlib.util.module_from_spec(_spec)
sys.modules["shapes_render"] = sr  # dataclasses of a module loaded by path look it up here
_spec.loader.exec_module(sr)

SPLITS = (("train", 3000), ("train_unbiased", 3000), ("validation", 600), ("validation_unbiased", 600))
_PATCH = dict(cue="patch", texture_contrast=80, radius_range=(8, 14), num_objects_probs=(0.6, 0.4),
              bias_probability=1.0, split_sizes=SPLITS, patch_size=12, background_noise=0)
_HARD = dict(radius_range=(6, 10), shape_colour_distance=90)
DESIGNS = {
    "v2": dataclasses.replace(sr.V2, split_sizes=SPLITS),
    "v2_p1": dataclasses.replace(sr.V2, split_sizes=SPLITS, bias_probability=1.0),
    "v2_p1_hard": dataclasses.replace(sr.V2, split_sizes=SPLITS, bias_probability=1.0, **_HARD),
    "patch12_p1": sr.Design(**_PATCH),
    "patch12_p095": sr.Design(**{**_PATCH, "bias_probability": 0.95}),
    "patch12_p1_hard": sr.Design(**{**_PATCH, **_HARD, "background_noise": 20}),
    "patch12_p095_hard": sr.Design(**{**_PATCH, **_HARD, "background_noise": 20, "bias_probability": 0.95}),
    "patch16_p1_hard": sr.Design(**{**_PATCH, **_HARD, "background_noise": 20, "patch_size": 16,
                                    "texture_contrast": 120}),  # = 3.0.0 (shapes_render.V3)
    # the second call's designs (added on the device by a one-line edit, here as they ran)
    "patch16_p095_hard": sr.Design(**{**_PATCH, **_HARD, "background_noise": 20, "patch_size": 16,
                                      "texture_contrast": 120, "bias_probability": 0.95}),
    "patch14_p1_hard": sr.Design(**{**_PATCH, **_HARD, "background_noise": 20, "patch_size": 14,
                                    "texture_contrast": 120}),
}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _render_range(design_name: str, split: str, start: int, stop: int):
    design = DESIGNS[design_name]
    images, labels = [], []
    for index in range(start, stop):
        example = sr.render(split, index, design)
        images.append(example["image"])
        row = np.zeros(len(sr.CLASS_NAMES), np.float32)
        row[example["classes"]] = 1
        labels.append(row)
    return np.stack(images), np.stack(labels)


def render_split(pool, design_name: str, split: str, size: int):
    chunks = [(start, min(start + 200, size)) for start in range(0, size, 200)]
    parts = list(pool.map(_render_range, *zip(*[(design_name, split, a, b) for a, b in chunks])))
    images = np.concatenate([p[0] for p in parts])
    return ((images.astype(np.float32) / 255 - MEAN) / STD), np.concatenate([p[1] for p in parts])


def mean_average_precision(scores, targets):
    aps = []
    for c in range(scores.shape[1]):
        positives = targets[:, c] > 0
        if not positives.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = positives[order].astype(np.float64)
        tp = np.cumsum(hits)
        precision = tp / np.arange(1, len(hits) + 1)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        aps.append(float(np.sum(np.diff(np.concatenate([[0.0], tp / tp[-1]])) * envelope)))
    return float(np.mean(aps))


def train_and_probe(train_images, train_labels, evals: dict, budgets, seed: int, batch_size: int, lr: float):
    import jax
    import jax.numpy as jnp
    import optax

    from gain_jax.models import build_model

    model = build_model("small_cnn", num_classes=train_labels.shape[1], dropout_rate=0.5)
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init(init_key, jnp.zeros((1,) + train_images.shape[1:]), train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(lr)
    opt_state = tx.init(params)
    images, labels = jnp.asarray(train_images), jnp.asarray(train_labels)

    def step(carry, inputs):
        params, batch_stats, opt_state = carry
        rows, key = inputs

        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images[rows], train=True,
                                          rngs={"dropout": key}, mutable=["batch_stats"])
            return optax.sigmoid_binary_cross_entropy(logits, labels[rows]).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        changes, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, changes), updates["batch_stats"], opt_state), loss

    @jax.jit
    def run_steps(carry, rows, keys):
        return jax.lax.scan(step, carry, (rows, keys))

    @jax.jit
    def predict(params, batch_stats, x):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(train_images)) for _ in range(
        -(-max(budgets) * batch_size // len(train_images)) + 1)])
    carry, done, out = (params, batch_stats, opt_state), 0, {}
    chunk = min(budgets)
    for budget in sorted(budgets):
        losses = []
        while done < budget:  # chunks of one length: one compilation
            count = min(chunk, budget - done)
            rows = order[done * batch_size:(done + count) * batch_size].reshape(count, batch_size)
            keys = jax.random.split(jax.random.fold_in(dropout_key, done), count)
            carry, chunk_losses = run_steps(carry, jnp.asarray(rows), keys)
            losses.append(np.asarray(chunk_losses))
            done += count
        losses = np.concatenate(losses)
        out[budget] = {"train_loss_last100": float(np.mean(losses[-100:]))}
        for name, (x, y) in evals.items():
            scores = np.concatenate([np.asarray(predict(carry[0], carry[1], jnp.asarray(x[i:i + 300])))
                                     for i in range(0, len(x), 300)])
            out[budget][name] = mean_average_precision(scores, y)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=tuple(DESIGNS))
    parser.add_argument("--budgets", type=int, nargs="+", default=[600, 1200, 2400, 4800])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args()
    import jax

    print(f"jax {jax.__version__} on {jax.devices()}", flush=True)
    results = {}
    context = multiprocessing.get_context("spawn")  # no fork after JAX started its threads
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1), mp_context=context) as pool:
        for name in args.designs:
            started = time.time()
            data = {split: render_split(pool, name, split, size) for split, size in SPLITS}
            rendered = time.time() - started
            evals = {split: data[split] for split in ("validation", "validation_unbiased")}
            results[name] = {"design": dataclasses.asdict(DESIGNS[name]), "render_s": rendered}
            for training in ("train", "train_unbiased"):
                started = time.time()
                results[name][training] = train_and_probe(*data[training], evals, args.budgets, args.seed, 32, 1e-3)
                results[name][training]["seconds"] = time.time() - started
                row = "  ".join(f"{b}: {results[name][training][b]['validation']:.3f}/"
                                f"{results[name][training][b]['validation_unbiased']:.3f}" for b in args.budgets)
                print(f"{name:18s} {training:14s} val/val_unbiased mAP  {row}", flush=True)
            with open(args.out, "w") as handle:
                json.dump(results, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
