"""A one-seed probe of the part-to-whole benchmark (gain_parts, gain_jax/data/parts.py): does the baseline put its
Grad-CAM on the part, does GAIN_ext with every mask cover the body, and where does self-guided GAIN land?

    python experiments/parts_probe.py                          # baseline, GAIN_ext, GAIN; seed 0; train + evaluate
    python experiments/parts_probe.py --arms baseline --reuse  # evaluate finished runs again, train the others

Each arm is trained by `gain_jax.train_loop.train_and_evaluate` (train.py's loop, in this process, one run at a
time; its output in <logdir>/<arm>_seed<seed>.log), then its final checkpoint is evaluated here on the
`--split` images (validation by default) with `gain_jax.part_metrics`: the label class's Grad-CAM (the run's
CAM method), its mass share on the body and on the part, body and part recall at thresholds 0.1-0.9,
whole-object PxAP, and the class's sigmoid probability on the image and on the same image with the part
erased (the generator's counterfactual: the body's texture where the part was). The same metrics of two
reference maps, which know the masks: the part-only floor (a perfect part detector, at pixel resolution and at
the Grad-CAM grid's) and the whole object.

The train loop evaluates gain_parts' validation split at the end of a run (gain_jax.datasets.FINAL_SPLITS).
Writes <out>/<name>.json (settings, commands, per-arm metrics, wall minutes), <out>/<name>.md and <out>/<name>.png
(the first `FIGURE_IMAGES` images of the split, their body (grey) and part (white) masks, and each arm's map).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from gain_jax import config as run_config  # noqa: E402
from gain_jax import part_metrics  # noqa: E402

# an arm: train.py flags after the common ones ({epochs}: --epochs). The GAIN arms erase with the shifted
# image (on gain_parts: background), so that the erased region's fill is no cue.
ARMS = {
    "baseline": "--am_weight 0 --ex_weight 0 --pretrain_epochs {epochs}",
    "GAIN": "--am_weight 0.1 --am_batchnorm batch --score sigmoid --ex_weight 0 --erase shift",
    "GAIN_ext": "--am_weight 0.1 --am_batchnorm batch --score sigmoid --ex_weight 1 --ex_fraction 1 --erase shift",
    "GAIN_ext_w10": "--am_weight 0.1 --am_batchnorm batch --score sigmoid --ex_weight 10 --ex_fraction 1 "
                    "--erase shift",  # the mask loss 10x: at weight 1 it stays small (0.05-0.07) on gain_parts
    "ex_only": "--am_weight 0 --ex_weight 1 --ex_fraction 1",
}
# the part-only floor at the Grad-CAM grids of small_cnn (stride 8: 14x14 at 112 px) and small_cnn_fine (stride
# 4: 28x28): what a perfect part detector scores at each resolution
GRID_CELLS = (8, 4)
BACKBONES = ("small_cnn", "small_cnn_fine", "small_cnn_nobn")
RECORD_FILE = "parts_probe.json"
FIGURE_IMAGES = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["baseline", "GAIN_ext", "GAIN"], choices=sorted(ARMS))
    p.add_argument("--dataset", default="gain_parts", choices=[d for d in run_config.DATASETS if "parts" in d])
    p.add_argument("--backbone", default="small_cnn", choices=BACKBONES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--pretrain_epochs", type=int, default=1)
    p.add_argument("--steps_per_epoch", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--split", default="validation", choices=["validation", "test"])
    p.add_argument("--eval_examples", type=int, default=0, help="evaluate the first N images only (0: all)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--logdir", default=os.path.join(REPO_ROOT, "runs", "parts_probe"))
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "experiments", "results", "parts_probe"))
    p.add_argument("--name", default=None, help="output file name (default: probe_<arms>)")
    p.add_argument("--reuse", action="store_true", help="evaluate finished runs with the same flags again "
                                                        "instead of training them")
    return p


def run_flags(arm: str, args) -> list[str]:
    flags = ["--dataset", args.dataset, "--backbone", args.backbone, "--seed", str(args.seed),
             "--epochs", str(args.epochs), "--pretrain_epochs", str(args.pretrain_epochs),
             "--steps_per_epoch", str(args.steps_per_epoch), "--batch_size", str(args.batch_size),
             "--lr", f"{args.lr:g}", "--logdir", args.logdir, "--run_name", run_name(arm, args),
             "--checkpoint_every", str(args.epochs), "--keep", "1", "--num_heatmaps", "0"]
    if args.data_dir:
        flags += ["--data_dir", args.data_dir]
    if args.eval_examples:  # the train loop's own validation passes too
        flags += ["--eval_examples", str(args.eval_examples)]
    return flags + shlex.split(ARMS[arm].format(epochs=args.epochs))


def run_name(arm: str, args) -> str:
    backbone = "" if args.backbone == "small_cnn" else f"_{args.backbone}"
    return f"{args.dataset.replace('/', '_')}{backbone}_{arm}_seed{args.seed}"


def config_of(arm: str, args) -> run_config.Config:
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    run_config.add_flags(parser)
    return run_config.config_from_flags(parser.parse_args(run_flags(arm, args)))


def train(arm: str, args) -> float:
    """Train one arm (its log in <logdir>/<run name>.log); wall minutes."""
    from gain_jax import train_loop

    directory = os.path.join(args.logdir, run_name(arm, args))
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(args.logdir, exist_ok=True)
    log_path = os.path.join(args.logdir, f"{run_name(arm, args)}.log")
    started = time.time()
    with open(log_path, "w") as log:
        log.write(shlex.join(["python", "train.py"] + run_flags(arm, args)) + "\n")
        log.flush()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            _, history = train_loop.train_and_evaluate(config_of(arm, args))
    if history["status"] != "finished":
        raise SystemExit(f"parts_probe: {arm} {history['status']}; log {log_path}")
    with open(os.path.join(directory, RECORD_FILE), "w") as handle:
        json.dump({"flags": run_flags(arm, args)}, handle)
    return (time.time() - started) / 60


def finished(arm: str, args) -> bool:
    path = os.path.join(args.logdir, run_name(arm, args), RECORD_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as handle:
        return json.load(handle).get("flags") == run_flags(arm, args)


def part_erased_images(filenames, parts_config, size: int) -> np.ndarray:
    """The images of `filenames` with their part erased (the generator's counterfactual), normalized as the
    pipeline's evaluation images are."""
    from gain_jax.data import parts, pipeline

    images = parts.part_erased_images(filenames, parts_config.part_fraction, parts_config.body_reliability)
    if images.shape[1] != size:
        raise ValueError(f"parts_probe: images of {images.shape[1]} px, the run's {size}")
    return np.asarray(pipeline.normalize_batch(images))


def evaluate_maps(arm_variables, args) -> tuple[dict, dict]:
    """({arm or reference: part_metrics summary} on the split, {"images", "masks", arm: maps} of the first
    FIGURE_IMAGES images); arm_variables: {arm: (model, variables, gain)}."""
    import jax
    import tensorflow_datasets as tfds

    import gain_jax as gj
    import gain_jax.data as gd

    parts_config = tfds.builder(args.dataset, data_dir=args.data_dir).builder_config
    info = gd.dataset_info(args.dataset)
    totals = {name: part_metrics.PartTotals() for name in arm_variables}
    references = {"part_only_pixels": None, **{f"part_only_grid{cell}": cell for cell in GRID_CELLS},
                  "whole_object": "object"}
    totals.update({name: part_metrics.PartTotals() for name in references})
    cams_of = {arm: jax.jit(lambda variables, images, model=model, gain=gain: gj.class_cams(model, variables,
                                                                                            images, gain))
               for arm, (model, _, gain) in arm_variables.items()}
    batches = gd.input_pipeline(args.dataset, args.split, data_dir=args.data_dir, batch_size=50, train=False)
    seen, figure = 0, {}
    for batch in batches:
        if args.eval_examples and seen >= args.eval_examples:
            break
        seen += len(batch["labels"])
        labels, gt = np.asarray(batch["labels"]), np.asarray(batch["mask"])
        body, part = np.asarray(batch["body_mask"]), np.asarray(batch["part_mask"])
        classes = np.argmax(labels, axis=1)
        erased = part_erased_images(batch["filename"], parts_config, info.image_size)
        if not figure:
            figure = {"images": np.asarray(batch["image"])[:FIGURE_IMAGES],
                      "masks": (body + 2 * part)[:FIGURE_IMAGES]}
        for arm, (_, variables, _) in arm_variables.items():
            logits, cams = cams_of[arm](variables, jax.numpy.asarray(batch["image"]))
            erased_logits, _ = cams_of[arm](variables, jax.numpy.asarray(erased))
            rows = np.arange(len(classes))
            p_image = np.asarray(jax.nn.sigmoid(logits))[rows, classes]
            p_erased = np.asarray(jax.nn.sigmoid(erased_logits))[rows, classes]
            maps = part_metrics.label_maps(np.asarray(cams), labels)
            totals[arm].add(maps, body, part, gt, p_image, p_erased)
            figure.setdefault(arm, maps[:FIGURE_IMAGES])
        for name, cell in references.items():
            maps = ((body | part) > 0).astype(np.float32) if cell == "object" else part_metrics.part_only_maps(
                part, cell)
            totals[name].add(maps, body, part, gt)
    return {name: total.summarize() for name, total in totals.items()}, figure


def save_figure(path: str, figure: dict, arms, erased: dict | None = None) -> None:
    """Rows: the images, their body and part masks, then each arm's maps, each followed by the images as its
    attention-mining stream erases them when `erased` has the arm ({arm: [N,H,W,3] normalized images})."""
    from gain_jax import viz

    erased = erased or {}
    pictures = viz.denormalize(figure["images"])
    masks = np.repeat((np.asarray(figure["masks"]) * 120).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    rows, captions = [list(pictures), list(masks)], ["images", "body (grey) and part (white)"]
    for arm in arms:
        rows.append([viz.overlay(picture, heat) for picture, heat in zip(pictures, figure[arm])])
        captions.append(arm)
        if arm in erased:
            rows.append(list(viz.denormalize(erased[arm])))
            captions.append(f"{arm}: the image its L_am sees (its own map erased)")
    viz.save_png(path, viz.grid(rows, captions=captions))


def load(arm: str, args):
    import gain_jax as gj
    import gain_jax.data as gd
    from gain_jax import checkpoint

    config = config_of(arm, args)
    directory = os.path.join(args.logdir, run_name(arm, args), "checkpoints")
    manager = checkpoint.open_manager(directory, create=False)
    variables = checkpoint.restore_variables(manager, manager.latest_step())
    model = gj.build_model(config.train.backbone, gd.dataset_info(args.dataset).num_classes, dropout_rate=0.0)
    return model, variables, config.gain


def run_metrics(arm: str, args) -> dict:
    with open(os.path.join(args.logdir, run_name(arm, args), "metrics.json")) as handle:
        history = json.load(handle)
    final = history.get("final", {}).get("validation", {})
    return {key: final.get(key) for key in ("mAP", "topk_accuracy", "cam_mIoU", "cam_object_mIoU", "pointing_game")}


COLUMNS = (("mAP", "val mAP"), ("topk_accuracy", "val acc"), ("body_share", "body share"),
           ("part_share", "part share"), ("body_recall_mean", "body recall"), ("part_recall_mean", "part recall"),
           ("body_recall@0.5", "body recall@0.5"), ("pxap", "PxAP"), ("p_image", "p image"),
           ("p_part_erased", "p part erased"), ("minutes", "minutes"))


def table(rows: dict) -> str:
    lines = ["| map | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in rows.items():
        cells = [row.get(key) for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    minutes = {}
    for arm in args.arms:
        if args.reuse and finished(arm, args):
            print(f"{arm}: reusing {os.path.join(args.logdir, run_name(arm, args))}", flush=True)
            continue
        print(f"{arm}: training ({shlex.join(run_flags(arm, args))})", flush=True)
        minutes[arm] = train(arm, args)
        print(f"{arm}: trained in {minutes[arm]:.1f} min", flush=True)
    started = time.time()
    summaries, figure = evaluate_maps({arm: load(arm, args) for arm in args.arms}, args)
    eval_minutes = (time.time() - started) / 60
    rows = {}
    for name, summary in summaries.items():
        row = {**summary, "body_recall@0.5": summary["body_recall"][0.5]}
        if name in args.arms:
            row.update(run_metrics(name, args))
            if name in minutes:
                row["minutes"] = minutes[name]
        rows[name] = row
    grids = " and ".join(f"{cell}-px" for cell in GRID_CELLS)
    text = (f"{args.dataset}, {args.backbone}, seed {args.seed}, {args.epochs} epochs x {args.steps_per_epoch} "
            f"steps of {args.batch_size} ({args.pretrain_epochs} classification-only), {args.split} split"
            f"{f' (first {args.eval_examples})' if args.eval_examples else ''}; maps: the label class's "
            f"Grad-CAM; references: part_only_* (a perfect part detector, at pixels and at {grids} Grad-CAM "
            f"cells), whole_object (the object's mask). Evaluation took {eval_minutes:.1f} min.\n\n"
            + table(rows))
    print(text)
    os.makedirs(args.out, exist_ok=True)
    name = args.name or "probe_" + "_".join(args.arms)
    with open(os.path.join(args.out, f"{name}.md"), "w") as handle:
        handle.write(text + "\n")
    save_figure(os.path.join(args.out, f"{name}.png"), figure, args.arms)
    with open(os.path.join(args.out, f"{name}.json"), "w") as handle:
        json.dump({"command": shlex.join(["python", "experiments/parts_probe.py", *(argv or sys.argv[1:])]),
                   "settings": vars(args), "train_commands": {arm: shlex.join(["python", "train.py",
                                                                               *run_flags(arm, args)])
                                                              for arm in args.arms},
                   "results": rows, "eval_minutes": eval_minutes}, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
