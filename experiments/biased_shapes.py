"""The paper's bias experiment in miniature: does attention guidance make a classifier look at the object
instead of a background that correlates with the class?

    python experiments/biased_shapes.py                     # 3 methods x 3 seeds, then the tables and figure
    python experiments/biased_shapes.py --seeds 0 --epochs 3   # a quick look
    python experiments/biased_shapes.py --reuse             # re-read finished runs, redo tables and figure

Data: the embedded "gain_shapes" set (64x64, 6 shape classes; in train and validation each image's background
texture is that of its first object's class 90% of the time, in test_unbiased it is independent of the classes).
Methods, each trained in this process by `gain_jax.train_loop.train_and_evaluate` (the loop train.py runs), one
run at a time, with the same seeds, so that the runs of one seed share their initialization, data order and
classification-only epochs:

    baseline   classification only: --am_weight 0 --ex_weight 0 (attention mining never switched on:
               --pretrain_epochs = --epochs, which skips computing a stream whose weight is 0)
    GAIN       attention mining (--am_weight 1) after --pretrain_epochs epochs of classification
    GAIN_ext   attention mining plus extra supervision (--ex_weight, default 10) on --ex_fraction (10%) of the
               training images' masks

Reported per method: mean and sample standard deviation (ddof=1) over the seeds of validation mAP (biased, like
train), test_unbiased mAP, and on test_unbiased the CAM mIoU and pointing-game accuracy of the ground-truth
classes' Grad-CAMs. Each run's history (its metrics.json) is kept; the summary goes to <out>/biased_shapes.json and
<out>/biased_shapes.md, the figure (bars with error bars, and the first seed's heatmaps on unbiased test images)
to <out>/biased_shapes.png.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import sys
import time

import numpy as np

from gain_jax import config as run_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("baseline", "GAIN", "GAIN_ext")
# (key in the summary, split in metrics.json, metric in that split, column title)
METRICS = (
    ("val_mAP", "validation", "mAP", "validation mAP"),
    ("unbiased_mAP", "test_unbiased", "mAP", "unbiased test mAP"),
    ("cam_mIoU", "test_unbiased", "cam_mIoU", "CAM mIoU (unbiased)"),
    ("pointing", "test_unbiased", "pointing_game", "pointing game (unbiased)"),
)
FIGURE_BYTES_LIMIT = 300_000


# ---------------------------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per method and seed")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--epochs", type=int, default=5, help="epochs per run, classification-only ones included")
    p.add_argument("--pretrain_epochs", type=int, default=2,
                   help="classification-only epochs before attention mining (GAIN, GAIN_ext)")
    p.add_argument("--steps_per_epoch", type=int, default=30, help="train steps of --batch_size per epoch")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--ex_weight", type=float, default=10.0, help="GAIN_ext: weight of the mask loss")
    p.add_argument("--ex_fraction", type=float, default=0.1, help="GAIN_ext: fraction of training masks used")
    p.add_argument("--data_dir", default=None, help="tfds data dir (train.py's --data_dir); default: tfds' default")
    p.add_argument("--logdir", default=os.path.join(REPO_ROOT, "runs", "biased_shapes"),
                   help="where the runs (logs, metrics.json, checkpoints) go")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "experiments", "results"),
                   help="where the summary (json, md) and the figure go")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs whose settings match instead of training them again")
    p.add_argument("--heatmap_images", type=int, default=6, help="unbiased test images in the figure")
    p.add_argument("--train_arg", action="append", default=[], metavar="FLAG",
                   help="extra train.py flag for every run (repeat; e.g. --train_arg=--autoaugment, "
                        "--train_arg=--cam=gradcam_pp)")
    return p


def check_args(args, parser) -> None:
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    for flag in ("epochs", "steps_per_epoch", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.pretrain_epochs < args.epochs:
        parser.error(f"--pretrain_epochs must be in [0, --epochs={args.epochs}), got {args.pretrain_epochs}")
    if not 0.0 < args.ex_fraction <= 1.0:
        parser.error(f"--ex_fraction must be in (0, 1], got {args.ex_fraction}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir} does not exist")
    try:
        extra_train_flags(args)
    except run_config.ConfigError as error:
        parser.error(f"--train_arg: {error}")


# ---------------------------------------------------------------------------------------------- runs

def method_flags(method: str, args) -> list[str]:
    if method == "baseline":
        return ["--am_weight", "0", "--ex_weight", "0", "--pretrain_epochs", str(args.epochs)]
    flags = ["--am_weight", "1", "--pretrain_epochs", str(args.pretrain_epochs)]
    if method == "GAIN":
        return flags + ["--ex_weight", "0"]
    return flags + ["--ex_weight", f"{args.ex_weight:g}", "--ex_fraction", f"{args.ex_fraction:g}"]


def run_flags(method: str, seed: int, args) -> list[str]:
    """The train.py flags of one run (the record shows them as commands that rerun it)."""
    flags = ["--dataset", "gain_shapes", "--backbone", "small_cnn", "--logdir", args.logdir,
             "--run_name", run_name(method, seed), "--seed", str(seed), "--epochs", str(args.epochs),
             "--steps_per_epoch", str(args.steps_per_epoch), "--batch_size", str(args.batch_size),
             "--lr", f"{args.lr:g}",
             # checkpoint only the end (the figure reads it); no per-epoch heatmap PNGs (the figure makes its own)
             "--checkpoint_every", str(args.epochs), "--keep", "1", "--num_heatmaps", "0"]
    flags += method_flags(method, args)
    if args.data_dir:
        flags += ["--data_dir", args.data_dir]
    return flags + list(args.train_arg)


def flags_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="--train_arg", add_help=False, exit_on_error=False)
    run_config.add_flags(parser)
    return parser


def extra_train_flags(args) -> None:
    """Check the --train_arg flags early (they must be train.py's config flags)."""
    try:
        flags_parser().parse_args(args.train_arg)
    except argparse.ArgumentError as error:
        raise run_config.ConfigError(str(error)) from None


def run_config_of(method: str, seed: int, args) -> run_config.Config:
    """The run's config, from the same flags as train.py would parse."""
    return run_config.config_from_flags(flags_parser().parse_args(run_flags(method, seed, args)))


def run_name(method: str, seed: int) -> str:
    return f"{method}_seed{seed}"


def run_dir(method: str, seed: int, args) -> str:
    return os.path.join(args.logdir, run_name(method, seed))


def finished_metrics(method: str, seed: int, args) -> dict | None:
    """The run's metrics.json when it finished with the settings this invocation asks for, else None.
    Settings the run resolved (image size) and where things are (data dir, log paths) are not compared."""
    path = os.path.join(run_dir(method, seed, args), "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        metrics = json.load(handle)
    if metrics.get("status") != "finished":
        return None
    wanted = run_config.config_to_dict(run_config_of(method, seed, args))
    saved = metrics.get("config", {})
    for section, values in wanted.items():
        if section == "log":
            continue
        if not isinstance(saved.get(section), dict):
            return None  # an earlier layout: train again
        for key, value in values.items():
            if key in ("data_dir", "manual_dir") or value is None:
                continue
            if saved[section].get(key) != value and not _same_number(saved[section].get(key), value):
                return None
    return metrics


def _same_number(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except (TypeError, ValueError):
        return False


def process_cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_one(method: str, seed: int, args) -> tuple[dict, float, float]:
    """Train one run in this process, its output in <logdir>/<run name>.log; (history, wall s, CPU s)."""
    from gain_jax.train_loop import train_and_evaluate

    directory = run_dir(method, seed, args)
    if os.path.isdir(directory):
        print(f"  removing the unfinished or different earlier run {directory}", flush=True)
        shutil.rmtree(directory)
    os.makedirs(args.logdir, exist_ok=True)
    log_path = os.path.join(args.logdir, f"{run_name(method, seed)}.log")
    config = run_config_of(method, seed, args)
    started, cpu_started = time.time(), process_cpu_seconds()
    with open(log_path, "w") as log:
        log.write(" ".join(["python", "train.py"] + run_flags(method, seed, args)) + "\n")
        log.flush()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                _, history = train_and_evaluate(config)
        except run_config.RunError as error:
            raise SystemExit(f"biased_shapes: {method} seed {seed} failed: {error}; log {log_path}") from None
    if history["status"] != "finished":
        raise SystemExit(f"biased_shapes: {method} seed {seed} {history['status']}; log {log_path}")
    return history, time.time() - started, process_cpu_seconds() - cpu_started


def run_all(args) -> tuple[dict, dict, dict]:
    """{(method, seed): metrics}, {(method, seed): wall seconds} and {(method, seed): CPU seconds (user + system
    of this process during the run)}; both None for reused runs. One run at a time."""
    results, seconds, cpu = {}, {}, {}
    for seed in args.seeds:
        for method in args.methods:
            key = (method, seed)
            metrics = finished_metrics(method, seed, args) if args.reuse else None
            if metrics is not None:
                results[key], seconds[key], cpu[key] = metrics, None, None
                print(f"  reusing {run_dir(method, seed, args)}", flush=True)
                continue
            print(f"  training {method}, seed {seed}: train.py {' '.join(run_flags(method, seed, args))}", flush=True)
            results[key], seconds[key], cpu[key] = train_one(method, seed, args)
            values = ", ".join(f"{title} {metric_value(results[key], name):.3f}" for name, *_, title in METRICS)
            print(f"  done {method}, seed {seed} in {seconds[key]:.0f} s ({cpu[key]:.0f} CPU s): {values}",
                  flush=True)
    return results, seconds, cpu


def metric_value(metrics: dict, key: str) -> float:
    _, split, name, _ = next(m for m in METRICS if m[0] == key)
    value = metrics["final"].get(split, {}).get(name)
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------------------------------------- summary

def summarize(results: dict, args) -> dict:
    summary = {}
    for method in args.methods:
        summary[method] = {}
        for key, *_ in METRICS:
            values = [metric_value(results[(method, seed)], key) for seed in args.seeds]
            summary[method][key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"),
                "per_seed": dict(zip(map(str, args.seeds), values)),
            }
    return summary


def summary_table(summary: dict, args) -> str:
    header = "| method | " + " | ".join(title for *_, title in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for method in args.methods:
        cells = [f"{summary[method][key]['mean']:.3f} ± {summary[method][key]['std']:.3f}" for key, *_ in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_run_table(results: dict, seconds: dict, cpu_seconds: dict, args) -> str:
    lines = ["| method | seed | " + " | ".join(title for *_, title in METRICS) + " | wall s | CPU s |",
             "|" + "---|" * (len(METRICS) + 4)]
    for method in args.methods:
        for seed in args.seeds:
            cells = [f"{metric_value(results[(method, seed)], key):.3f}" for key, *_ in METRICS]
            wall, cpu = seconds[(method, seed)], cpu_seconds[(method, seed)]
            timing = "reused | reused" if wall is None else f"{wall:.0f} | {cpu:.0f}"
            lines.append(f"| {method} | {seed} | " + " | ".join(cells) + f" | {timing} |")
    return "\n".join(lines)


def machine_line() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores ({model}), Python {platform.python_version()}"


# ---------------------------------------------------------------------------------------------- figure

def example_heatmaps(args, count: int):
    """Unbiased test images (one per class of their first label, as far as possible) and, per method, the
    first seed's normalized CAM (the run's method, Grad-CAM by default) of each image's first ground-truth
    class."""
    import jax  # only for the figure

    import gain_jax as gj
    import gain_jax.data as gd  # TensorFlow (no torch in this process)
    from gain_jax import checkpoint

    info = gd.dataset_info("gain_shapes")
    batch = next(gd.input_pipeline("gain_shapes", "test_unbiased", data_dir=args.data_dir, batch_size=64,
                                   train=False, autoaugment=False))
    first_class = np.argmax(np.asarray(batch["labels"]) > 0, axis=1)
    chosen, seen = [], set()
    for index, cls in enumerate(first_class):  # one image per class first, then fill up in order
        if cls not in seen:
            chosen.append(index)
            seen.add(cls)
    chosen += [i for i in range(len(first_class)) if i not in chosen]
    chosen = sorted(chosen[:count])
    images = np.asarray(batch["image"])[chosen]
    classes = first_class[chosen]
    model = gj.build_model("small_cnn", num_classes=info.num_classes, dropout_rate=0.0)
    maps = {}
    seed = args.seeds[0]
    for method in args.methods:
        checkpoint_dir = os.path.join(run_dir(method, seed, args), "checkpoints")
        step = checkpoint.open_manager(checkpoint_dir).latest_step() if os.path.isdir(checkpoint_dir) else None
        if step is None:
            raise SystemExit(f"biased_shapes: no checkpoint in {run_dir(method, seed, args)}/checkpoints")
        variables = checkpoint.restore_variables(checkpoint.open_manager(checkpoint_dir), step)
        gain_cfg = run_config_of(method, seed, args).gain  # the run's CAM method
        _, cams = gj.class_cams(model, variables, jax.numpy.asarray(images), gain_cfg)
        maps[method] = np.asarray(cams)[np.arange(len(chosen)), classes]
    captions = [" + ".join(info.class_names[c] for c in np.flatnonzero(row > 0))
                for row in np.asarray(batch["labels"])[chosen]]
    return images, maps, [info.class_names[c] for c in classes], captions


def make_figure(summary: dict, args, path: str) -> int:
    import matplotlib  # only for the figure (checked at the start)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gain_jax import viz

    images, maps, cam_classes, captions = example_heatmaps(args, args.heatmap_images)
    columns = len(images)
    rows = 1 + len(args.methods)
    figure = plt.figure(figsize=(max(8.0, 1.35 * columns + 1.2), 2.6 + 1.35 * rows), dpi=90)
    # row 1 is a spacer between the bar charts' labels and the heatmap titles
    grid = figure.add_gridspec(2 + rows, max(columns, len(METRICS)), height_ratios=[2.2, 0.15] + [1.0] * rows,
                               hspace=0.3, wspace=0.08, top=0.9, bottom=0.02, left=0.07, right=0.98)
    colours = ("#8c8c8c", "#1f77b4", "#d62728")
    bar_grid = grid[0, :].subgridspec(1, len(METRICS), wspace=0.45)
    for panel, (key, *_, title) in enumerate(METRICS):
        axis = figure.add_subplot(bar_grid[0, panel])
        means = [summary[m][key]["mean"] for m in args.methods]
        stds = [0.0 if math.isnan(summary[m][key]["std"]) else summary[m][key]["std"] for m in args.methods]
        axis.bar(range(len(args.methods)), means, yerr=stds, capsize=4, color=colours[:len(args.methods)])
        for i, m in enumerate(args.methods):  # every seed as a dot
            values = list(summary[m][key]["per_seed"].values())
            axis.plot([i] * len(values), values, "k.", markersize=3)
        axis.set_xticks(range(len(args.methods)), args.methods, fontsize=7)
        axis.set_title(title, fontsize=8)
        axis.tick_params(axis="y", labelsize=7)
        axis.set_ylim(0, 1)
    pictures = viz.denormalize(images)
    for column in range(columns):
        axis = figure.add_subplot(grid[2, column])
        axis.imshow(pictures[column], interpolation="nearest")
        axis.set_title(captions[column], fontsize=6)
        axis.set_xticks([]), axis.set_yticks([])
        if column == 0:
            axis.set_ylabel("input", fontsize=7)
        for row, method in enumerate(args.methods):
            axis = figure.add_subplot(grid[3 + row, column])
            axis.imshow(viz.overlay(pictures[column], maps[method][column]), interpolation="nearest")
            axis.set_xticks([]), axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(method, fontsize=7)
            if row == 0:
                axis.set_title(f"CAM: {cam_classes[column]}", fontsize=6)
    figure.suptitle(f"gain_shapes, small_cnn: mean ± std over seeds {args.seeds} (dots: seeds); "
                    f"Grad-CAMs: seed {args.seeds[0]}, unbiased test images", fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return os.path.getsize(path)


# ---------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    if importlib.util.find_spec("matplotlib") is None:  # fail before 15 minutes of training, not after
        parser.error("matplotlib is needed for the figure: pip install -e \".[bench]\"")
    args.logdir = os.path.abspath(args.logdir)
    started = time.time()
    print(f"biased_shapes: {len(args.methods)} methods x {len(args.seeds)} seeds on {machine_line()}")
    print(f"  {args.epochs} epochs x {args.steps_per_epoch} steps of {args.batch_size} (attention mining from "
          f"epoch {args.pretrain_epochs + 1}), lr {args.lr:g}; GAIN_ext: ex_weight {args.ex_weight:g} on "
          f"{args.ex_fraction:.0%} of the training masks; runs in {args.logdir}", flush=True)
    results, seconds, cpu_seconds = run_all(args)
    training_seconds = time.time() - started

    summary = summarize(results, args)
    table = summary_table(summary, args)
    runs = per_run_table(results, seconds, cpu_seconds, args)
    print(f"\nper run (test_unbiased CAM metrics at pointing tolerance "
          f"{results[(args.methods[0], args.seeds[0])]['final']['test_unbiased'].get('pointing_tolerance_px')} px, "
          f"CAM threshold {results[(args.methods[0], args.seeds[0])]['final']['test_unbiased'].get('cam_threshold')}):")
    print(runs)
    print(f"\nmean ± std (ddof=1) over seeds {args.seeds}:")
    print(table)

    os.makedirs(args.out, exist_ok=True)
    figure_path = os.path.join(args.out, "biased_shapes.png")
    figure_bytes = make_figure(summary, args, figure_path)
    total_seconds = time.time() - started
    print(f"\nfigure: {figure_path} ({figure_bytes / 1000:.0f} kB)"
          + (f"  WARNING: over {FIGURE_BYTES_LIMIT // 1000} kB" if figure_bytes > FIGURE_BYTES_LIMIT else ""))
    total_cpu = sum(c for c in cpu_seconds.values() if c is not None)
    print(f"wall time: {training_seconds:.0f} s training and evaluation ({len(results)} runs, "
          f"{sum(1 for s in seconds.values() if s is None)} reused), {total_seconds:.0f} s in all; "
          f"the runs used {total_cpu:.0f} CPU s (user + system; on an otherwise idle machine the runs' wall time "
          f"is about this divided by the cores they keep busy), load average now {os.getloadavg()[0]:.1f}")

    record = {
        "command": " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]) if argv is None else None,
        "machine": machine_line(),
        "settings": {key: value for key, value in vars(args).items() if key not in ("logdir", "out")},
        "train_commands": {run_name(m, s): " ".join(["python", "train.py"] + run_flags(m, s, args))
                           for m in args.methods for s in args.seeds},
        "summary": summary,
        "per_run": {run_name(m, s): {"seconds": seconds[(m, s)], "cpu_seconds": cpu_seconds[(m, s)],
                                     **{key: metric_value(results[(m, s)], key) for key, *_ in METRICS},
                                     "val_cam_mIoU": results[(m, s)]["final"]["validation"].get("cam_mIoU"),
                                     "val_pointing": results[(m, s)]["final"]["validation"].get("pointing_game")}
                    for m in args.methods for s in args.seeds},
        "wall_seconds": {"training": training_seconds, "total": total_seconds},
        "cpu_seconds_of_runs": total_cpu,
    }
    with open(os.path.join(args.out, "biased_shapes.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    with open(os.path.join(args.out, "biased_shapes.md"), "w") as handle:
        handle.write(f"mean ± std over seeds {args.seeds}\n\n{table}\n\nper run\n\n{runs}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
