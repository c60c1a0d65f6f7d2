"""Look at what a trained model attends to: class activation map (CAM) overlays for your own images.

    python -m gain_jax.explain --checkpoint runs/<run>/checkpoints photo.jpg other.png
    python -m gain_jax.explain --checkpoint runs/<run> --classes cat,dog --out_dir cams photo.jpg

Loads the newest checkpoint of a train.py run (or --step) and the config saved with it (backbone, classes,
image size, normalization, CAM method), and writes one PNG per image and class: the class's min-max normalized
CAM (the run's method; Grad-CAM by default), jet-coloured and blended with the original picture (at the
picture's own resolution).
Without --classes, the --top classes by predicted probability are shown.

No TensorFlow here: images are read and resized with PIL (bilinear, antialiased, like the training
pipeline's resize).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image


class ExplainError(Exception):
    """A one-line reason to stop (printed by main, exit status 1)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gain_jax.explain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    p.add_argument("--checkpoint", required=True,
                   help="a run's checkpoint dir, or its run dir (the one holding checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step; default: the newest")
    p.add_argument("--classes", default=None, help="comma-separated class names to show; default: the top ones")
    p.add_argument("--top", type=int, default=3, help="without --classes: how many top-scoring classes to show")
    p.add_argument("--out_dir", default="explanations", help="where the PNGs go")
    return p


def find_checkpoint_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise ExplainError(f"checkpoint dir {path} does not exist")
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def check_out_dir(path: str) -> None:
    """--out_dir is a folder that exists or can be created; checked early, creating nothing."""
    from gain_jax.config import output_folder_problem

    problem = output_folder_problem(path)
    if problem is not None:
        raise ExplainError(f"--out_dir {problem}")


def intact_hint(manager, others) -> str:
    """Which other step restores ("use --step N"), trying the newest first; or that none does."""
    from gain_jax import checkpoint

    for step in sorted(others, reverse=True):
        try:
            checkpoint.read_meta(manager, step)
            checkpoint.restore_variables(manager, step)
        except checkpoint.CheckpointError:
            continue
        return f"the newest intact one is step {step}: use --step {step}"
    return "no other step is intact" if others else "it is the only one"


def load_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB"))
    except (OSError, ValueError) as error:
        raise ExplainError(f"cannot read image {path}: {error}") from None


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def resize_map(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float [h, w] map to [height, width] (bilinear), clipped back to [0, 1]."""
    resized = Image.fromarray(np.asarray(heatmap, np.float32), mode="F").resize((width, height),
                                                                                 Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def choose_classes(probabilities: np.ndarray, class_names: Sequence[str], wanted: Sequence[str] | None,
                   top: int) -> list[int]:
    if wanted:
        unknown = [name for name in wanted if name not in class_names]
        if unknown:
            raise ExplainError(f"unknown class {unknown[0]!r}; the model's classes: {', '.join(class_names)}")
        return [list(class_names).index(name) for name in wanted]
    return [int(c) for c in np.argsort(-probabilities, kind="stable")[:top]]


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def explain(args) -> list[str]:
    import jax  # deferred: keeps `--help` fast

    import gain_jax as gj
    from gain_jax import checkpoint, viz
    from gain_jax.config import ConfigError, config_from_saved

    if args.top < 1:
        raise ExplainError(f"--top must be >= 1, got {args.top}")
    images = [load_image(path) for path in args.images]  # fail on a bad file before the slow part
    directory = find_checkpoint_dir(args.checkpoint)
    manager = checkpoint.open_manager(directory, create=False)
    steps = manager.all_steps()
    if not steps:
        raise ExplainError(f"no checkpoint in {directory}")
    step = max(steps) if args.step is None else args.step
    if step not in steps:
        raise ExplainError(f"no checkpoint step {step} in {directory}; steps: {', '.join(map(str, sorted(steps)))}")
    check_out_dir(args.out_dir)
    try:
        record = checkpoint.read_meta(manager, step).get("config")
        if not isinstance(record, dict) or "class_names" not in record:
            raise ExplainError(f"checkpoint step {step} in {directory} records no run config (not a train.py "
                               f"checkpoint?)")
        variables = checkpoint.restore_variables(manager, step)
    except checkpoint.CheckpointError as error:
        raise ExplainError(f"{error}; {intact_hint(manager, [s for s in steps if s != step])}") from None
    try:
        config = config_from_saved(record)  # the nested layout of train_loop, or the flat one of earlier runs
    except ConfigError as error:
        raise ExplainError(f"checkpoint {directory} step {step}: {error}") from None
    class_names = list(record["class_names"])
    wanted = [name.strip() for name in args.classes.split(",") if name.strip()] if args.classes else None
    if wanted:
        choose_classes(np.zeros(len(class_names)), class_names, wanted, args.top)  # check the names early
    size = config.data.image_size
    if size is None:
        raise ExplainError(f"checkpoint {directory} step {step} does not record its image size")
    model = gj.build_model(config.train.backbone, num_classes=len(class_names), dropout_rate=config.train.dropout)

    # the run's CAM method (config.gain.cam), as in its evaluation
    logits_and_cams = jax.jit(lambda batch: gj.class_cams(model, variables, batch, config.gain))
    mean = record.get("image_mean") or viz.IMAGENET_MEAN
    std = record.get("image_std") or viz.IMAGENET_STD
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as error:
        raise ExplainError(f"--out_dir {args.out_dir}: {error.strerror or error}") from None
    written = []
    for path, image in zip(args.images, images):
        batch = viz.normalize(resize_image(image, size), mean, std)[None]
        logits, cams = (np.asarray(a)[0] for a in logits_and_cams(batch))
        probabilities = 1.0 / (1.0 + np.exp(-logits))
        stem = safe_name(os.path.splitext(os.path.basename(path))[0])
        for c in choose_classes(probabilities, class_names, wanted, args.top):
            heatmap = resize_map(cams[c], image.shape[0], image.shape[1])
            target = os.path.join(args.out_dir, f"{stem}_{safe_name(class_names[c])}.png")
            viz.save_png(target, viz.overlay(image, heatmap))
            written.append(target)
            print(f"{target}: {class_names[c]} p={probabilities[c]:.3f}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        explain(args)
    except ExplainError as error:
        print(f"explain: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
