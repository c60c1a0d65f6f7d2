"""Fast design probe for the gain_shapes redesign (issue 10): data generated in memory by
`gain_jax.data.shapes.generate_example` with overridable generator settings, trained with the library's
jit-compiled GAIN step, evaluated on a biased validation set and an unbiased validation set (never on the
test splits). One run per invocation; prints one JSON line. Used to choose the data set's settings and the
training budget; the reported experiments use experiments/biased_shapes.py on the tfds set.

    python experiments/probes/shapes_probe.py --radius 8 16 --steps 600 --am_weight 0 --ex_weight 0
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gain_jax as gj
from gain_jax import metrics
from gain_jax.data import shapes

MEAN = np.array((0.485, 0.456, 0.406), np.float32)
STD = np.array((0.229, 0.224, 0.225), np.float32)


def make_split(split, count, offset=0):
    images, labels, masks, backgrounds = [], [], [], []
    for index in range(offset, offset + count):
        example = shapes.generate_example(split, index)
        images.append(shapes.decode_png(example["image"]))
        labels.append(example["labels"])
        masks.append(example["mask"])
        backgrounds.append(example["background"])
    images = ((np.stack(images).astype(np.float32) / 255.0) - MEAN) / STD
    return {"image": images, "labels": np.stack(labels), "mask": np.stack(masks),
            "background": np.array(backgrounds)}


def evaluate(model, variables, data, cfg, batch=100):
    logits, cams = [], []
    fn = jax.jit(lambda v, x: gj.class_cams(model, v, x, cfg))
    for start in range(0, len(data["image"]), batch):
        lg, cm = fn(variables, jnp.asarray(data["image"][start:start + batch]))
        logits.append(np.asarray(lg))
        cams.append(np.asarray(cm))
    logits, cams = np.concatenate(logits), np.concatenate(cams)
    labels, masks = data["labels"], data["mask"]
    out = {"mAP": metrics.mean_average_precision(logits, labels)}
    conflicting = labels[np.arange(len(labels)), data["background"]] == 0
    out["mAP_conflicting"] = metrics.mean_average_precision(logits[conflicting], labels[conflicting])
    seg = metrics.cam_segmentation(cams, labels, 0.5)
    inter, union = metrics.iou_counts(seg, masks, labels.shape[1])
    ious = metrics.per_class_iou(inter, union)
    out["mIoU"] = float(np.nanmean(ious))
    out["obj_mIoU"] = float(np.nanmean(ious[1:]))
    hits, trials = metrics.pointing_game(cams, labels, masks, 4.0)
    out["pointing"] = hits / trials
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--radius", type=float, nargs=2, default=[8, 14])
    p.add_argument("--bias", type=float, default=0.9)
    p.add_argument("--objects", type=float, nargs="+", default=[0.6, 0.4])
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--contrast", type=int, default=80, help="texture contrast per channel")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--pretrain", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ex_fraction", type=float, default=0.1)
    p.add_argument("--eval_every", type=int, default=0)
    p.add_argument("--tag", default="")
    for field in ("am_weight", "ex_weight", "sigma", "omega"):
        p.add_argument(f"--{field}", type=float, default=None)
    for field in ("cam", "mask", "score", "am_batchnorm", "cam_grad", "mode"):
        p.add_argument(f"--{field}", default=None)
    p.add_argument("--grads_off", action="store_true")
    args = p.parse_args()
    shapes.RADIUS_RANGE = tuple(args.radius)
    shapes.BIAS_PROBABILITY = args.bias
    shapes.TEXTURE_CONTRAST = args.contrast
    shapes.NUM_OBJECTS_PROBS = tuple(args.objects)
    started = time.time()
    train = make_split("train", args.train)
    val = make_split("validation", 600)
    # the test_unbiased generator past its 600 images: unbiased, never a test image
    val_unbiased = make_split("test_unbiased", 600, offset=100_000)
    rng = np.random.default_rng(args.seed)
    train["has_mask"] = rng.random(args.train) < args.ex_fraction
    gen_s = time.time() - started

    overrides = {k: getattr(args, k) for k in ("am_weight", "ex_weight", "sigma", "omega", "cam", "mask", "score",
                                               "am_batchnorm", "cam_grad", "mode") if getattr(args, k) is not None}
    cfg = gj.GainConfig(grads_off=args.grads_off, **overrides)
    model = gj.build_model("small_cnn", 6)
    key = jax.random.PRNGKey(args.seed)
    variables = model.init(key, jnp.zeros((1, 64, 64, 3)), train=False)
    state = gj.create_train_state(variables, optax.adam(args.lr))
    step = gj.make_train_step(model, cfg)
    order = np.concatenate([rng.permutation(args.train) for _ in range(args.steps * args.batch // args.train + 1)])
    curve = []
    losses = []
    started = time.time()
    for i in range(args.steps):
        idx = order[i * args.batch:(i + 1) * args.batch]
        batch = {"image": train["image"][idx], "labels": train["labels"][idx], "mask": train["mask"][idx],
                 "has_mask": train["has_mask"][idx]}
        if cfg.mode == "per_label":
            batch["packing"] = gj.pack_labels(batch["labels"])
        state, m = step(state, batch, jax.random.fold_in(key, i), np.float32(i >= args.pretrain))
        if (i + 1) % 50 == 0:
            losses.append({k: round(float(m[k]), 4) for k in ("cl", "am", "ex")} | {"step": i + 1})
        if args.eval_every and (i + 1) % args.eval_every == 0:
            curve.append({"step": i + 1, **{k: round(v, 3) for k, v in evaluate(
                model, state.variables, val_unbiased, cfg).items()}})
    train_s = time.time() - started
    result = {"tag": args.tag, "args": vars(args), "gen_s": round(gen_s, 1), "train_s": round(train_s, 1),
              "val": evaluate(model, state.variables, val, cfg),
              "val_unbiased": evaluate(model, state.variables, val_unbiased, cfg),
              "losses": losses, "curve": curve}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
