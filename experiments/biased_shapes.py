"""The paper's bias experiment in miniature: does attention guidance make a classifier look at the object
instead of a background that correlates with the class?

    python experiments/biased_shapes.py                          # the main study: 5 arms x 3 seeds
    python experiments/biased_shapes.py --study mask_fraction    # GAIN_ext with 1% ... 100% of the masks
    python experiments/biased_shapes.py --study ablations        # GAIN_ext with one setting changed per arm
    python experiments/biased_shapes.py --study oversample       # 10% of the masks, drawn more often
    python experiments/biased_shapes.py --arms GAIN "GAIN_ext@5%" --seeds 0   # chosen arms
    python experiments/biased_shapes.py --arm "GAIN_lr=--am_weight 1 --lr 3e-4" --arms baseline GAIN_lr
    python experiments/biased_shapes.py --reuse                  # re-read finished runs, redo tables and figure
    python experiments/biased_shapes.py --together               # each arm's seeds trained as one seed sweep
    python experiments/biased_shapes.py select --study main      # choose on validation: <out>/main.selection.json
    python experiments/biased_shapes.py test --study main        # then the chosen runs on test_unbiased, once

Blind selection (issue 20): training (the default command) evaluates the validation splits only, never
test_unbiased (a run's --test is refused). `select` reads the finished runs' checkpoints on validation_unbiased
and writes, without computing any test number, each arm's CAM threshold and each target's arm (TARGETS: the arm
of the target's family with the best validation_unbiased value of the target's metric) to
<out>/<name>.selection.json, meant to be committed. `test` refuses to run without that file and evaluates only
the chosen arms and the baseline on test_unbiased: per target, the arm - baseline differences paired by seed with
a 95% t-interval ("met" only when its lower bound clears the margin; gain_jax.stats), and for the lead rows a 95%
bootstrap interval over the test images of mAP and PxAP; written to <out>/<name>.test.{json,md}.

Data: the embedded "gain_shapes" set (gain_jax/data/shapes.py): 64x64, 6 shape classes, a texture cue that
predicts the class in train and validation, and is independent of the classes in validation_unbiased (what
configurations are chosen on) and test_unbiased (looked at once, by the `test` command).

Arms: an arm is a name and the train.py flags that make it (ARMS; `{epochs}`, `{pretrain_epochs}`,
`{am_weight}`, `{ex_weight}` and `{ex_fraction}` stand for this script's flags). Every run gets the common
flags (data set, backbone, seed, epochs, steps, batch, lr, --pretrain_epochs), then --train_arg, then
the arm's flags, so an arm's flag wins. Each run is trained in this process by
`gain_jax.train_loop.train_and_evaluate` (the loop train.py runs), one at a time, or with --together each arm's
seeds as one seed sweep (`protocol.train_runs`: the same run folders and, to float32 rounding, results); the runs
of one seed share their initialization, data order and classification-only epochs. A study (STUDIES) is a named
list of arms.

Reported per arm by training: mean and sample standard deviation (ddof=1) over the seeds of validation mAP
(biased, like train), and on validation_unbiased (what configurations are chosen on): mAP, mAP of the
bias-conflicting images, CAM mIoU (threshold 0.5), CAM object mIoU and pointing game of the ground-truth classes'
CAMs; and the floors of the CAM metrics there (all-zero, centred, random maps: the same on every run). Each
run's history (its metrics.json) and log stay under --logdir; the summary goes to <out>/<name>.json and
<out>/<name>.md, the figure to <out>/<name>.png, where <name> is the study's (or "arms-..." for --arms).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import sys
import time
import typing

import numpy as np

from gain_jax import config as run_config
from gain_jax.datasets import GAIN_SHAPES_VERSIONS
from gain_jax.train_loop import provenance

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# arm name -> train.py flags after the common ones; add an arm with one line here (or --arm NAME='FLAGS')
# GAIN's attention mining as chosen on validation_unbiased by one-seed probes (experiments/results/
# probes_v2/README.md): BatchNorm on the erased batch's own statistics, each class's sigmoid as the score,
# weight --am_weight (0.1); upstream's frozen BatchNorm and softmax are the GAIN_upstream arm and ablations.
# Every arm names the settings train.py's defaults could change (so that an arm means the same whatever the
# defaults; upstream: frozen BatchNorm, softmax; --ex_fraction matters only with a mask loss).
_UPSTREAM = "--am_batchnorm frozen --score softmax"
_AM = "--am_weight {am_weight} --am_batchnorm batch --score sigmoid"
_EXT = _AM + " --ex_weight {ex_weight}"
ARMS = {
    "baseline": "--am_weight 0 --ex_weight 0 --ex_fraction 1 --pretrain_epochs {epochs} " + _UPSTREAM,
    "GAIN_upstream": "--am_weight 1 --ex_weight 0 --ex_fraction 1 " + _UPSTREAM,  # upstream's semantics, alpha 1
    "GAIN": _AM + " --ex_weight 0 --ex_fraction 1",
    "GAIN_ext": _EXT + " --ex_fraction {ex_fraction}",
    "ex_only": "--am_weight 0 --ex_weight {ex_weight} --ex_fraction {ex_fraction} " + _UPSTREAM,  # no L_am
    # the mask-fraction curve: GAIN_ext with a share of the training images' masks
    "GAIN_ext@1%": _EXT + " --ex_fraction 0.01",
    "GAIN_ext@2%": _EXT + " --ex_fraction 0.02",
    "GAIN_ext@5%": _EXT + " --ex_fraction 0.05",
    "GAIN_ext@100%": _EXT + " --ex_fraction 1",
    # ablations of GAIN_ext: one setting changed (named ablation:<flag>=<value>)
    "ablation:am_batchnorm=frozen": _EXT + " --ex_fraction {ex_fraction} --am_batchnorm frozen",
    "ablation:score=softmax": _EXT + " --ex_fraction {ex_fraction} --score softmax",
    "ablation:am_weight=1": _EXT + " --ex_fraction {ex_fraction} --am_weight 1",
    "ablation:ex_weight=10": _EXT + " --ex_fraction {ex_fraction} --ex_weight 10",
    "ablation:grads_off": _EXT + " --ex_fraction {ex_fraction} --grads_off",
    "ablation:cam_grad=full": _EXT + " --ex_fraction {ex_fraction} --cam_grad full",
    "ablation:pretrain_epochs=0": _EXT + " --ex_fraction {ex_fraction} --pretrain_epochs 0",
    "ablation:sigma=0.25": _EXT + " --ex_fraction {ex_fraction} --sigma 0.25",
    "ablation:omega=30": _EXT + " --ex_fraction {ex_fraction} --omega 30",
    # the mask loss alone with every training mask: how much of GAIN_ext@100% is L_am's
    "ex_only@100%": "--am_weight 0 --ex_weight {ex_weight} --ex_fraction 1 " + _UPSTREAM,
    # BatchNorm: the same arms on small_cnn without BatchNorm (am_batchnorm has nothing to act on)
    "baseline:nobn": "--am_weight 0 --ex_weight 0 --ex_fraction 1 --pretrain_epochs {epochs} --backbone small_cnn_nobn "
                     + _UPSTREAM,
    "GAIN_ext:nobn": _EXT + " --ex_fraction {ex_fraction} --backbone small_cnn_nobn",
    # the erased region filled with the image rolled by half its size instead of a flat value: is L_am gamed
    # by recognising the flat patch?
    "GAIN:erase=shift": _AM + " --ex_weight 0 --ex_fraction 1 --erase shift",
    "ablation:erase=shift": _EXT + " --ex_fraction {ex_fraction} --erase shift",
    "ablation:am_weight=1,erase=shift": _EXT + " --ex_fraction {ex_fraction} --am_weight 1 --erase shift",
    # L_am kept from moving the maps (--mask_grad stop): it can only teach the classifier to lose the class on
    # the erased image; alone, with Grad-CAM differentiated (maps on the objects), and at alpha 1
    "ablation:mask_grad=stop": _EXT + " --ex_fraction {ex_fraction} --mask_grad stop",
    "GAIN_ext:full,mask_stop": _EXT + " --ex_fraction {ex_fraction} --cam_grad full --mask_grad stop",
    "GAIN_ext:full,mask_stop,alpha1": _EXT + " --ex_fraction {ex_fraction} --cam_grad full --mask_grad stop"
                                      " --am_weight 1",
    "GAIN:mask_grad=stop": _AM + " --ex_weight 0 --ex_fraction 1 --mask_grad stop",
    # the 10% of images with masks drawn again for half of the examples (--ex_oversample 0.5): about 55% of
    # each batch feeds the mask loss instead of 10%; alone and with Grad-CAM differentiated
    "GAIN_ext:oversample": _EXT + " --ex_fraction {ex_fraction} --ex_oversample 0.5",
    "GAIN_ext:oversample,full": _EXT + " --ex_fraction {ex_fraction} --ex_oversample 0.5 --cam_grad full",
    "GAIN_ext:oversample=0.25": _EXT + " --ex_fraction {ex_fraction} --ex_oversample 0.25",
    "GAIN_ext:oversample=0.75": _EXT + " --ex_fraction {ex_fraction} --ex_oversample 0.75",
    "ex_only:oversample": "--am_weight 0 --ex_weight {ex_weight} --ex_fraction {ex_fraction} --ex_oversample 0.5 "
                          + _UPSTREAM,
    # the mask loss alone through differentiated Grad-CAM: how much of cam_grad=full's maps is L_am's
    "ex_only:cam_grad=full": "--am_weight 0 --ex_weight {ex_weight} --ex_fraction {ex_fraction} --cam_grad full "
                             + _UPSTREAM,
    # issue 20's controls: the baseline fed the oversampled draws without the mask loss (is it the masks or the
    # draws?), and the oracle, trained on gain_shapes 3.0.0's train_unbiased (the cue independent of the classes):
    # the ceiling of what the shapes alone allow
    "baseline:oversample": "--am_weight 0 --ex_weight 0 --ex_fraction {ex_fraction} --ex_oversample 0.5 "
                           "--pretrain_epochs {epochs} " + _UPSTREAM,
    "oracle": "--train_split train_unbiased --am_weight 0 --ex_weight 0 --ex_fraction 1 --pretrain_epochs {epochs} "
              + _UPSTREAM,
    # L_am from epoch 5 only, after two epochs of the mask loss alone have moved the maps (epochs 6, pre-training 2)
    "ablation:am_start_epoch=4": _EXT + " --ex_fraction {ex_fraction} --am_start_epoch 4",
}
STUDIES = {
    "main": ("baseline", "GAIN_upstream", "GAIN", "GAIN_ext", "ex_only"),
    "mask_fraction": ("baseline", "GAIN", "ex_only@100%", "GAIN_ext@1%", "GAIN_ext@2%", "GAIN_ext@5%", "GAIN_ext",
                      "GAIN_ext@100%"),  # GAIN_ext: 10%
    # one setting of GAIN_ext changed per arm; more arms are defined above (run them with --arms)
    "ablations": ("GAIN_ext", "ex_only", "ablation:am_batchnorm=frozen", "ablation:score=softmax",
                  "ablation:am_weight=1", "ablation:ex_weight=10", "ablation:grads_off", "ablation:cam_grad=full",
                  "ablation:pretrain_epochs=0", "ablation:sigma=0.25", "ablation:omega=30"),
    "batchnorm": ("baseline", "GAIN_ext", "ablation:am_batchnorm=frozen", "baseline:nobn", "GAIN_ext:nobn"),
    "schedule": ("GAIN_ext", "ex_only", "ablation:pretrain_epochs=0", "ablation:am_start_epoch=4"),
    # which gradient paths make the 10% maps and the classifier move (cam_grad, mask_grad)
    "gradient_paths": ("baseline", "GAIN", "GAIN:mask_grad=stop", "GAIN_ext", "ablation:mask_grad=stop",
                       "ablation:cam_grad=full", "GAIN_ext:full,mask_stop", "GAIN_ext:full,mask_stop,alpha1",
                       "ex_only", "ex_only:cam_grad=full"),
    # the 10% of masks drawn more often
    "oversample": ("baseline", "GAIN_ext", "ablation:cam_grad=full", "GAIN_ext:oversample=0.25", "GAIN_ext:oversample",
                   "GAIN_ext:oversample=0.75", "GAIN_ext:oversample,full", "ex_only:oversample", "GAIN_ext@100%"),
    # issue 20 at convergence (gain_shapes:3.0.0, --epochs 12): the claims' arm (10% of the masks, drawn again for
    # half the examples: chosen on 2.0.0's validation_unbiased) and its controls
    "converged": ("baseline", "GAIN_ext:oversample", "ex_only:oversample", "baseline:oversample", "GAIN_ext@100%",
                  "oracle"),
    "erase": ("GAIN", "GAIN:erase=shift", "GAIN_ext", "ablation:erase=shift", "ablation:am_weight=1",
              "ablation:am_weight=1,erase=shift"),
    # issue 20, item 5: train.py's default re-chosen at its own budget (gain_shapes 2.0.0, --steps_per_epoch 93:
    # 6 epochs of one pass) among its simpler alternatives; `select` applies DEFAULT_CHAIN
    "default": ("baseline", "ex_only@100%", "GAIN_ext@100%"),
}
# (key in the summary, split in metrics.json, metric in that split, column title): validation splits only, what
# training reports; test_unbiased is evaluated by the `test` command, for the configurations `select` chose
METRICS = (
    ("val_mAP", "validation", "mAP", "validation mAP"),
    ("val_unbiased_mAP", "validation_unbiased", "mAP", "validation_unbiased mAP"),
    ("val_unbiased_mAP_conflicting", "validation_unbiased", "mAP_conflicting", "validation_unbiased mAP conflicting"),
    ("val_unbiased_cam_mIoU", "validation_unbiased", "cam_mIoU", "validation_unbiased CAM mIoU (0.5)"),
    ("val_unbiased_cam_object_mIoU", "validation_unbiased", "cam_object_mIoU", "validation_unbiased object mIoU"),
    ("val_unbiased_pointing", "validation_unbiased", "pointing_game", "validation_unbiased pointing"),
)
FLOOR_METRICS = (("cam_mIoU", "CAM mIoU"), ("cam_object_mIoU", "object mIoU"), ("pointing_game", "pointing"))
FIGURE_BYTES_LIMIT = 300_000
COMMANDS = ("train", "select", "test")
RECORD_FILE = "biased_shapes_run.json"  # in each run folder: what --reuse compares beside the config


# ---------------------------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="train", choices=COMMANDS,
                   help="train: the runs and their validation tables; select: each target's configuration from "
                        "validation numbers alone, written to <out>/<name>.selection.json (commit it); test: the "
                        "selected runs on test_unbiased, with intervals (refused without the selection file)")
    p.add_argument("--study", default="main", choices=tuple(STUDIES),
                   help=("the arms to run: " + "; ".join(f"{name}: {', '.join(arms)}"
                                                         for name, arms in STUDIES.items())).replace("%", "%%"))
    p.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                   help="run these arms instead of the study's (names of ARMS or of --arm)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS",
                   help="add or replace an arm: --arm 'GAIN_slow=--am_weight 1 --lr 1e-4' (repeat)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per arm and seed")
    p.add_argument("--epochs", type=int, default=6, help="epochs per run, classification-only ones included")
    p.add_argument("--pretrain_epochs", type=int, default=2,
                   help="classification-only epochs before attention mining (every arm but baseline)")
    p.add_argument("--steps_per_epoch", type=int, default=100, help="train steps of --batch_size per epoch")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--am_weight", type=float, default=0.1, help="GAIN and GAIN_ext arms: weight of L_am (alpha)")
    p.add_argument("--ex_weight", type=float, default=1.0, help="GAIN_ext arms: weight of the mask loss")
    p.add_argument("--ex_fraction", type=float, default=0.1, help="GAIN_ext: fraction of training masks used")
    p.add_argument("--dataset", default="gain_shapes", choices=("gain_shapes", *GAIN_SHAPES_VERSIONS),
                   help="gain_shapes (its default version) or an opt-in version, e.g. gain_shapes:3.0.0 (its "
                        "shortcut survives training; the oracle arm trains on its train_unbiased split)")
    p.add_argument("--data_dir", default=None, help="tfds data dir (train.py's --data_dir); default: tfds' default")
    p.add_argument("--logdir", default=os.path.join(REPO_ROOT, "runs", "biased_shapes"),
                   help="where the runs (logs, metrics.json, checkpoints) go")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "experiments", "results"),
                   help="where the summary (json, md) and the figure go")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs whose settings match instead of training them again")
    p.add_argument("--together", action="store_true",
                   help="train each arm's seeds (those not reused) together as one seed sweep in one program "
                        "(train.py --seeds; --train_arg=--sweep_strategy=vmap for the other strategy): the same run "
                        "folders, results equal to float32 rounding; a run's time is the sweep's divided by its "
                        "seeds. Off by default: on the 2-core CPU 5 seeds of train.py's default gain 7%% "
                        "(bench/README.md, sweep_throughput.py). Arms a "
                        "sweep cannot train (--mode per_label) are trained one seed at a time, with a line saying why")
    p.add_argument("--heatmap_images", type=int, default=6, help="validation_unbiased images in the figure")
    p.add_argument("--train_arg", action="append", default=[], metavar="FLAG",
                   help="extra train.py flag for every run, before the arm's (repeat; e.g. "
                        "--train_arg=--autoaugment, --train_arg=--cam=gradcam_pp)")
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
    args.arm_flags = dict(ARMS)
    for text in args.arm:
        name, sep, flags = text.partition("=")
        if not sep or not name.strip():
            parser.error(f"--arm wants NAME=FLAGS, got {text!r}")
        args.arm_flags[name.strip()] = flags
    args.arms = list(args.arms) if args.arms else list(STUDIES[args.study])
    unknown = [arm for arm in args.arms if arm not in args.arm_flags]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; arms: {', '.join(args.arm_flags)}")
    if len(set(args.arms)) < len(args.arms):
        parser.error(f"an arm is named twice in {args.arms}")
    folders = [run_name(arm, 0) for arm in args.arms]
    if len(set(folders)) < len(folders):
        parser.error(f"arms {args.arms} map to the same run folder names: rename one")
    args.name = output_name(args)
    for arm in args.arms:
        try:
            config = run_config_of(arm, args.seeds[0], args)
        except (run_config.ConfigError, argparse.ArgumentError, KeyError, IndexError, ValueError) as error:
            parser.error(f"arm {arm} ({args.arm_flags[arm]!r}) with --train_arg {args.train_arg}: {error}")
        if config.data.train_split != "train" and config.data.train_split not in version_splits(args.dataset):
            parser.error(f"arm {arm} trains on --train_split {config.data.train_split}, which gain_shapes "
                         f"{data_version(args.dataset)} lacks (--dataset gain_shapes:3.0.0 has train_unbiased)")
        if config.eval.test:
            parser.error(f"arm {arm}: --test in a run's flags; the study trains blind to test_unbiased "
                         "(the `test` command evaluates it, after `select`)")


def output_name(args) -> str:
    """<out>/<name>.{json,md,png}: the study's name, or "arms-<the arms>" for --arms."""
    if args.arms == list(STUDIES[args.study]):
        return args.study
    name = "arms-" + "+".join(_safe(arm) for arm in args.arms)
    if len(name) > 80:
        name = name[:70] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def _safe(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text.replace("%", "pct")).strip("_")


# ---------------------------------------------------------------------------------------------- runs

def arm_flags(arm: str, args) -> list[str]:
    """The arm's train.py flags, with this invocation's values filled in."""
    text = args.arm_flags[arm].format(epochs=args.epochs, pretrain_epochs=args.pretrain_epochs,
                                      ex_weight=f"{args.ex_weight:g}", ex_fraction=f"{args.ex_fraction:g}",
                                      am_weight=f"{args.am_weight:g}")
    return shlex.split(text)


def run_flags(arm: str, seed: int, args) -> list[str]:
    """The train.py flags of one run (the record shows them as commands that rerun it)."""
    flags = ["--dataset", args.dataset, "--backbone", "small_cnn", "--logdir", args.logdir,
             "--run_name", run_name(arm, seed), "--seed", str(seed), "--epochs", str(args.epochs),
             "--pretrain_epochs", str(args.pretrain_epochs),
             "--steps_per_epoch", str(args.steps_per_epoch), "--batch_size", str(args.batch_size),
             "--lr", f"{args.lr:g}",  # no --test: training looks at validation splits only (`test` command)
             # checkpoint only the end (the figure reads it); no per-epoch heatmap PNGs (the figure makes its own)
             "--checkpoint_every", str(args.epochs), "--keep", "1", "--num_heatmaps", "0"]
    if args.data_dir:
        flags += ["--data_dir", args.data_dir]
    return flags + list(args.train_arg) + arm_flags(arm, args)


def flags_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py flags", add_help=False, exit_on_error=False)
    run_config.add_flags(parser)
    return parser


def run_config_of(arm: str, seed: int, args) -> run_config.Config:
    """The run's config, from the same flags as train.py would parse."""
    namespace, unknown = flags_parser().parse_known_args(run_flags(arm, seed, args))
    if unknown:
        raise run_config.ConfigError(f"not train.py config flags: {unknown}")
    return run_config.config_from_flags(namespace)


def run_name(arm: str, seed: int) -> str:
    return f"{_safe(arm)}_seed{seed}"


def run_dir(arm: str, seed: int, args) -> str:
    return os.path.join(args.logdir, run_name(arm, seed))


def data_version(dataset: str) -> str:
    """The gain_shapes version a --dataset name means ("gain_shapes": the builder's default)."""
    from gain_jax.data.shapes import GainShapes  # imports tensorflow_datasets, not TensorFlow's runtime

    return dataset.partition(":")[2] or str(GainShapes.VERSION)


def version_splits(dataset: str) -> tuple[str, ...]:
    from gain_jax.data.shapes import VERSION_SPLIT_SIZES

    return tuple(VERSION_SPLIT_SIZES[data_version(dataset)])


def run_record(arm: str, seed: int, args) -> dict:
    return {"arm": arm, "flags": run_flags(arm, seed, args), "gain_shapes_version": data_version(args.dataset)}


def finished_metrics(arm: str, seed: int, args) -> dict | None:
    """The run's metrics.json when it finished with the settings this invocation asks for (and the same
    gain_shapes version), else None. Settings the run resolved (image size) and where things are (data dir,
    log paths) are not compared."""
    directory = run_dir(arm, seed, args)
    path, record_path = os.path.join(directory, "metrics.json"), os.path.join(directory, RECORD_FILE)
    if not (os.path.isfile(path) and os.path.isfile(record_path)):
        return None
    with open(record_path) as handle:
        if json.load(handle).get("gain_shapes_version") != data_version(args.dataset):
            return None
    with open(path) as handle:
        metrics = json.load(handle)
    if metrics.get("status") != "finished":
        return None
    if not isinstance(metrics.get("config"), dict):
        return None
    # a setting added after the run was trained reads as the value the run implicitly had (config_from_saved)
    saved = run_config.config_from_saved(metrics["config"])
    for _, saved_value, value in run_config.setting_differences(saved, run_config_of(arm, seed, args)):
        if value is not None and not _same_number(saved_value, value):  # None: resolved by the run
            return None
    return metrics


def _same_number(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except (TypeError, ValueError):
        return False


def train_arm(arm: str, seeds: list[int], args) -> tuple[dict, float, float]:
    """Train the arm's runs of `seeds` in this process, one run or several as one seed sweep
    (`protocol.train_runs`: each run's folder, metrics.json and log are those of its run alone), and write each
    one's RECORD_FILE; ({seed: history}, wall s, CPU s of them all)."""
    import protocol

    histories, wall, cpu = protocol.train_runs({seed: run_config_of(arm, seed, args) for seed in seeds},
                                               {seed: run_flags(arm, seed, args) for seed in seeds},
                                               f"biased_shapes: {arm}")
    for seed in seeds:
        with open(os.path.join(run_dir(arm, seed, args), RECORD_FILE), "w") as handle:
            json.dump(run_record(arm, seed, args), handle, indent=1)
    return histories, wall, cpu


def run_all(args) -> tuple[dict, dict, dict, dict]:
    """{(arm, seed): metrics}, {(arm, seed): wall seconds}, {(arm, seed): CPU seconds (user + system of this
    process during the run)}, the last two None for reused runs, and {(arm, seed): the seeds trained with it in
    one sweep (--together), None when alone or reused}: a sweep's runs are each given its time divided by their
    number. One run at a time, or with --together each arm's seeds still to train as one sweep."""
    import protocol

    results, seconds, cpu, sweeps = {}, {}, {}, {}
    for arm, seeds in protocol.run_groups(args.arms, args.seeds, args.together):
        pending = []
        for seed in seeds:
            key = (arm, seed)
            metrics = finished_metrics(arm, seed, args) if args.reuse else None
            if metrics is None:
                pending.append(seed)
                continue
            results[key], seconds[key], cpu[key], sweeps[key] = metrics, None, None, None
            print(f"  reusing {run_dir(arm, seed, args)}", flush=True)
        for batch in protocol.sweep_batches(arm, pending, run_config_of(arm, seeds[0], args)):
            if len(batch) == 1:
                print(f"  training {arm}, seed {batch[0]}: train.py {shlex.join(run_flags(arm, batch[0], args))}",
                      flush=True)
            else:
                flags = protocol.sweep_flags(run_flags(arm, batch[0], args), batch)
                print(f"  training {arm}, seeds {','.join(map(str, batch))} together as one seed sweep: train.py "
                      f"{shlex.join(flags)}", flush=True)
            histories, wall, cpu_seconds = train_arm(arm, batch, args)
            share = f" ({len(batch)} runs trained together: the sweep's {wall:.0f} s and {cpu_seconds:.0f} CPU s " \
                    f"divided by {len(batch)})" if len(batch) > 1 else ""
            for seed in batch:
                key = (arm, seed)
                results[key], sweeps[key] = histories[seed], (batch if len(batch) > 1 else None)
                seconds[key], cpu[key] = wall / len(batch), cpu_seconds / len(batch)
                values = ", ".join(f"{title} {metric_value(results[key], name):.3f}" for name, *_, title in METRICS)
                print(f"  done {arm}, seed {seed} in {seconds[key]:.0f} s ({cpu[key]:.0f} CPU s){share}: {values}",
                      flush=True)
    return results, seconds, cpu, sweeps


def metric_value(metrics: dict, key: str) -> float:
    _, split, name, _ = next(m for m in METRICS if m[0] == key)
    value = metrics["final"].get(split, {}).get(name)
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------------------------------------- summary

def summarize(results: dict, args, metrics=METRICS) -> dict:
    summary = {}
    for arm in args.arms:
        summary[arm] = {}
        for key, *_ in metrics:
            values = [metric_value(results[(arm, seed)], key) for seed in args.seeds]
            summary[arm][key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"),
                "per_seed": dict(zip(map(str, args.seeds), values)),
            }
    return summary


def validation_floors(results: dict) -> dict:
    """{floor: {metric: value}} on validation_unbiased; the floors ignore the model, so every run has the same
    ones (the mean over the runs is taken all the same)."""
    floors = {}
    runs = [r["final"]["validation_unbiased"].get("floors") for r in results.values()]
    runs = [r for r in runs if r]
    if not runs:
        return floors
    for name in runs[0]:
        floors[name] = {metric: float(np.mean([r[name][metric] for r in runs])) for metric, _ in FLOOR_METRICS}
    return floors


def floors_line(floors: dict) -> str:
    if not floors:
        return "floors: not in these runs' metrics"
    names = list(floors)
    figures = ", ".join(f"{title} " + "/".join(f"{floors[name][metric]:.3f}" for name in names)
                        for metric, title in FLOOR_METRICS)
    return f"floors on validation_unbiased (maps that ignore the image: {' / '.join(names)}): {figures}"


def summary_table(summary: dict, args, metrics=METRICS) -> str:
    header = "| arm | " + " | ".join(title for *_, title in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    for arm in args.arms:
        cells = [f"{summary[arm][key]['mean']:.3f} ± {summary[arm][key]['std']:.3f}" for key, *_ in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_run_table(results: dict, seconds: dict, cpu_seconds: dict, args, sweeps: dict | None = None) -> str:
    """One row per run; a run trained in a sweep of N (`sweeps`) has the sweep's times divided by N, marked /N."""
    lines = ["| arm | seed | " + " | ".join(title for *_, title in METRICS) + " | wall s | CPU s |",
             "|" + "---|" * (len(METRICS) + 4)]
    for arm in args.arms:
        for seed in args.seeds:
            cells = [f"{metric_value(results[(arm, seed)], key):.3f}" for key, *_ in METRICS]
            wall, cpu = seconds[(arm, seed)], cpu_seconds[(arm, seed)]
            shared = (sweeps or {}).get((arm, seed))
            mark = f" (sweep/{len(shared)})" if shared else ""
            timing = "reused | reused" if wall is None else f"{wall:.0f}{mark} | {cpu:.0f}{mark}"
            lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + f" | {timing} |")
    return "\n".join(lines)


def arms_table(args) -> str:
    lines = ["| arm | train.py flags after the common ones |", "|---|---|"]
    lines += [f"| {arm} | `{shlex.join(list(args.train_arg) + arm_flags(arm, args))}` |" for arm in args.arms]
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
    """Unbiased validation images (one per class of their first label, as far as possible) and, per arm, the first
    seed's normalized CAM (the run's method, Grad-CAM by default) of each image's first ground-truth class."""
    import jax  # only for the figure

    import gain_jax as gj
    import gain_jax.data as gd  # TensorFlow (no torch in this process)
    from gain_jax import checkpoint

    info = gd.dataset_info(args.dataset)
    seed = args.seeds[0]
    image_size = run_config_of(args.arms[0], seed, args).data.image_size  # None: the data set's own
    batch = next(gd.input_pipeline(args.dataset, "validation_unbiased", data_dir=args.data_dir, batch_size=64,
                                   image_size=image_size, train=False, autoaugment=False))
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
    maps = {}
    for arm in args.arms:
        config = run_config_of(arm, seed, args)
        model = gj.build_model(config.train.backbone, num_classes=info.num_classes, dropout_rate=0.0)
        checkpoint_dir = os.path.join(run_dir(arm, seed, args), "checkpoints")
        step = checkpoint.open_manager(checkpoint_dir).latest_step() if os.path.isdir(checkpoint_dir) else None
        if step is None:
            raise SystemExit(f"biased_shapes: no checkpoint in {run_dir(arm, seed, args)}/checkpoints")
        variables = checkpoint.restore_variables(checkpoint.open_manager(checkpoint_dir), step)
        _, cams = gj.class_cams(model, variables, jax.numpy.asarray(images), config.gain)  # the run's CAM method
        maps[arm] = np.asarray(cams)[np.arange(len(chosen)), classes]
    captions = [" + ".join(info.class_names[c] for c in np.flatnonzero(row > 0))
                for row in np.asarray(batch["labels"])[chosen]]
    return images, maps, [info.class_names[c] for c in classes], captions


def fraction_arms(args) -> tuple[list, list]:
    """(arms with a mask loss, as (ex_fraction, arm) sorted by fraction; the other arms): the mask-fraction
    curve's points and its reference lines."""
    curve, references = [], []
    for arm in args.arms:
        config = run_config_of(arm, args.seeds[0], args)
        # oversampled draws are another setting, not a point of the fraction curve
        if config.gain.ex_weight > 0 and config.gain.am_weight > 0 and not config.data.ex_oversample:
            curve.append((config.data.ex_fraction, arm))
        else:
            references.append(arm)
    return sorted(curve), references


def has_fraction_curve(curve: list) -> bool:
    """A curve needs two or more points, one per fraction (arms that differ in other settings at one fraction,
    as in the ablations, are not a curve)."""
    return len(curve) >= 2 and len({fraction for fraction, _ in curve}) == len(curve)


def save_palette_png(path: str) -> None:
    """Rewrite the PNG at `path` with a 256-colour palette: plots and heatmaps keep their look at about a
    third of the bytes (committed figures stay small)."""
    from PIL import Image

    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(colors=256)
    palette.save(path, optimize=True)


COMPARISON_TITLES = {"mAP": "test_unbiased mAP", "mAP_conflicting": "mAP, bias-conflicting images",
                     "PxAP": "CAM PxAP", "cam_mIoU": "CAM mIoU (validation threshold)",
                     "validation_mAP": "validation mAP (biased)"}


def test_figure(record: dict, selection: dict, args, path: str) -> int:
    """The `test` command's figure: per metric, every paired difference of `record["comparisons"]` (arm - its
    reference, mean over the seeds) with its 95% t-interval, zero and the targets' margins dashed; bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(record["comparisons"])
    keys = [key for key in COMPARISON_TITLES if all(key in record["comparisons"][pair] for pair in pairs)]
    margins = {}
    for target in selection["targets"].values():
        if target["arm"] and target["measure"][1] in keys:
            key = "validation_mAP" if target["measure"][0] == "validation" else target["measure"][1]
            margins[key] = target["margin"]
    figure, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys) + 3.2, 0.42 * len(pairs) + 1.4), dpi=80,
                                sharey=True, squeeze=False)
    positions = list(range(len(pairs)))[::-1]
    for axis, key in zip(axes[0], keys):
        for position, pair in zip(positions, pairs):
            interval = record["comparisons"][pair][key]
            low, high = interval.get("low", interval["mean"]), interval.get("high", interval["mean"])
            clears = pair.endswith(f" - {BASELINE_ARM}") and key in margins and low > margins[key]
            colour = "tab:green" if clears else "black"
            axis.errorbar(interval["mean"], position, xerr=[[interval["mean"] - low], [high - interval["mean"]]],
                          fmt="o", color=colour, capsize=3, markersize=4)
        axis.axvline(0.0, color="grey", linewidth=0.8)
        if key in margins:
            axis.axvline(margins[key], color="tab:red", linestyle="--", linewidth=0.8)
        axis.set_title(COMPARISON_TITLES[key], fontsize=9)
        axis.tick_params(labelsize=8)
    axes[0][0].set_yticks(positions, pairs, fontsize=8)
    figure.suptitle(f"gain_shapes {data_version(args.dataset)}, {args.name}: differences paired by seed "
                    f"{args.seeds}, mean and 95% t-interval (red dashed: a target's margin; green: an arm - baseline "
                    "interval whose lower bound clears it)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    save_palette_png(path)
    return os.path.getsize(path)


def make_figure(summary: dict, floors: dict, args, path: str) -> int:
    import matplotlib  # only for the figure (checked at the start)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gain_jax import viz

    images, maps, cam_classes, captions = example_heatmaps(args, args.heatmap_images)
    columns, panels = len(images), len(METRICS)
    curve, references = fraction_arms(args)
    with_curve = has_fraction_curve(curve)
    rows = 1 + len(args.arms)
    top = [2.4] + ([0.7, 2.2] if with_curve else []) + [0.7]  # spacers under the rotated arm names
    figure = plt.figure(figsize=(max(13.0, 1.35 * columns + 1.2), 1.2 + sum(top) + 1.35 * rows), dpi=80)
    grid = figure.add_gridspec(len(top) + rows, max(columns, panels), height_ratios=top + [1.0] * rows,
                               hspace=0.2, wspace=0.08, top=0.93, bottom=0.02, left=0.05, right=0.99)
    colours = matplotlib.colormaps["tab10"]
    floor_keys = {"cam_mIoU": "cam_mIoU", "cam_object_mIoU": "cam_object_mIoU", "pointing": "pointing_game"}
    bar_grid = grid[0, :].subgridspec(1, panels, wspace=0.5)
    for panel, (key, *_, title) in enumerate(METRICS):
        axis = figure.add_subplot(bar_grid[0, panel])
        means = [summary[a][key]["mean"] for a in args.arms]
        stds = [0.0 if math.isnan(summary[a][key]["std"]) else summary[a][key]["std"] for a in args.arms]
        axis.bar(range(len(args.arms)), means, yerr=stds, capsize=3,
                 color=[colours(i % 10) for i in range(len(args.arms))])
        for i, arm in enumerate(args.arms):  # every seed as a dot
            values = list(summary[arm][key]["per_seed"].values())
            axis.plot([i] * len(values), values, "k.", markersize=3)
        if key in floor_keys and floors:  # the best floor: what a map must beat
            axis.axhline(max(f[floor_keys[key]] for f in floors.values()), color="k", linestyle=":", linewidth=1)
        axis.set_xticks(range(len(args.arms)), args.arms, fontsize=6, rotation=60, ha="right")
        axis.set_title(title, fontsize=7)
        axis.tick_params(axis="y", labelsize=6)
        axis.set_ylim(0, 1)
    if with_curve:
        curve_grid = grid[2, :].subgridspec(1, panels, wspace=0.5)
        fractions = [fraction for fraction, _ in curve]
        for panel, (key, *_, title) in enumerate(METRICS):
            axis = figure.add_subplot(curve_grid[0, panel])
            means = np.array([summary[arm][key]["mean"] for _, arm in curve])
            stds = np.array([0.0 if math.isnan(summary[arm][key]["std"]) else summary[arm][key]["std"]
                             for _, arm in curve])
            axis.errorbar(fractions, means, yerr=stds, marker="o", markersize=3, capsize=2, linewidth=1)
            for fraction, arm in curve:
                values = list(summary[arm][key]["per_seed"].values())
                axis.plot([fraction] * len(values), values, "k.", markersize=2)
            for i, arm in enumerate(references):
                axis.axhline(summary[arm][key]["mean"], color=colours((i + 1) % 10), linestyle="--", linewidth=1,
                             label=arm)
            axis.set_xscale("log")
            axis.set_xlabel("ex_fraction (masks used)", fontsize=6)
            axis.set_title(title, fontsize=7)
            axis.tick_params(labelsize=6)
            axis.set_ylim(0, 1)
            if panel == 0 and references:
                axis.legend(fontsize=5)
    pictures = viz.denormalize(images)
    first_row = len(top)
    for column in range(columns):
        axis = figure.add_subplot(grid[first_row, column])
        axis.imshow(pictures[column], interpolation="nearest")
        axis.set_title(captions[column], fontsize=6)
        axis.set_xticks([]), axis.set_yticks([])
        if column == 0:
            axis.set_ylabel("input", fontsize=7)
        for row, arm in enumerate(args.arms):
            axis = figure.add_subplot(grid[first_row + 1 + row, column])
            axis.imshow(viz.overlay(pictures[column], maps[arm][column]), interpolation="nearest")
            axis.set_xticks([]), axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(arm, fontsize=6)
            if row == 0:
                axis.set_title(f"CAM: {cam_classes[column]}", fontsize=6)
    figure.suptitle(f"gain_shapes {data_version(args.dataset)}, small_cnn, {args.name}: mean ± std over seeds "
                    f"{args.seeds} "
                    f"(dots: seeds; dotted: the best floor); CAMs: seed {args.seeds[0]}, validation_unbiased images",
                    fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    save_palette_png(path)
    return os.path.getsize(path)


# ---------------------------------------------------------------------------------------------- select, test

class Target(typing.NamedTuple):  # not a dataclass: tests load this script without registering it as a module
    """A claim of issue 20: the chosen arm's `measure` minus the baseline's, paired by seed, >= `margin`."""

    name: str
    claim: str
    family: str  # which arms may be chosen (FAMILIES), or "same as <target name>"
    choose_on: str  # the validation_unbiased metric the arm is chosen on (highest mean over the seeds)
    measure: tuple  # (split, metric) the claim is measured on
    margin: float


def _mask_arm(config) -> bool:  # GAIN_ext with at most 10% of the masks
    return config.gain.am_weight > 0 and config.gain.ex_weight > 0 and config.data.ex_fraction <= 0.1


def _self_guided_arm(config) -> bool:  # GAIN: attention mining, no mask loss
    return config.gain.am_weight > 0 and config.gain.ex_weight == 0


FAMILIES = {"GAIN_ext (<= 10% masks)": _mask_arm, "GAIN (self-guided)": _self_guided_arm}
TARGETS = (  # issue 20, item 4: at most 10% of the training masks, each target's arm chosen on validation_unbiased
    Target("mAP", "GAIN_ext (<= 10% masks): test_unbiased mAP >= baseline + 0.10", "GAIN_ext (<= 10% masks)",
           "mAP", ("test_unbiased", "mAP"), 0.10),
    Target("conflicting mAP", "GAIN_ext (<= 10% masks): test_unbiased mAP of the bias-conflicting images >= "
           "baseline + 0.10", "GAIN_ext (<= 10% masks)", "mAP_conflicting", ("test_unbiased", "mAP_conflicting"),
           0.10),
    Target("PxAP", "GAIN_ext (<= 10% masks): test_unbiased CAM PxAP >= baseline + 0.15", "GAIN_ext (<= 10% masks)",
           "PxAP", ("test_unbiased", "PxAP"), 0.15),
    Target("CAM", "GAIN_ext: test_unbiased CAM mIoU (threshold chosen on validation) >= baseline + 0.15",
           "GAIN_ext (<= 10% masks)", "cam_mIoU", ("test_unbiased", "cam_mIoU"), 0.15),
    Target("validation cost", "the mAP target's arm: validation mAP no more than 0.02 below the baseline's",
           "same as mAP", "mAP", ("validation", "mAP"), -0.02),
    Target("self-guided CAM", "GAIN (no masks): test_unbiased CAM mIoU >= baseline + 0.05", "GAIN (self-guided)",
           "cam_mIoU", ("test_unbiased", "cam_mIoU"), 0.05),
)
# the arms of a study that no target may choose (baseline, controls: the mask loss alone, the oversampled draws
# without masks, every mask, the oracle): named in the selection file and evaluated on test beside the chosen arms
# (they were fixed before any number existed, so evaluating them chooses nothing)
CONTROL_PAIRS = (  # (arm, reference): differences paired by seed reported on test when both are in the study
    ("GAIN_ext:oversample", "ex_only:oversample"),  # does L_am add anything to the mask loss?
    ("GAIN_ext:oversample", "baseline:oversample"),  # is it the masks, or the oversampled draws?
    ("GAIN_ext", "ex_only"),
)
SELECTION_RULE = ("per arm, the CAM threshold with the highest mean over the seeds of validation_unbiased CAM mIoU "
                  "(grid 0.05..0.95, lowest on ties); per target, among the study's arms of its family, the arm with "
                  "the highest mean over the seeds of the target's validation_unbiased metric (first in study order "
                  "on ties); the arms no target may choose are the controls, evaluated on test as they are. No test "
                  "split is read.")
BASELINE_ARM = "baseline"
BOOTSTRAP_RESAMPLES = 1000
# train.py's default (--study default): simplest first; `select` moves from one arm to the next only when the next
# one's difference to the current choice, paired by seed, clears DEFAULT_GAIN_MARGIN on validation_unbiased mAP and
# DEFAULT_COST_MARGIN on biased validation mAP by the interval rule (lower bounds above the margins)
DEFAULT_CHAIN = ("baseline", "ex_only@100%", "GAIN_ext@100%")
DEFAULT_GAIN_MARGIN, DEFAULT_COST_MARGIN = 0.0, -0.02
DEFAULT_RULE = ("start from the baseline; move to the next arm of the chain (baseline -> ex_only@100% -> "
                "GAIN_ext@100%) only when its difference to the current choice, paired by seed, has a 95% t-interval "
                "on validation_unbiased mAP with its lower bound above 0 and one on biased validation mAP with its "
                "lower bound above -0.02; the last arm reached is train.py's default. No test split is read.")
# the closing table's "baseline trained as long" rows (gain_jax/train_loop/reference.py): these splits and metrics
REFERENCE_SPLITS = ("validation", "validation_unbiased")
REFERENCE_METRICS = ("mAP", "topk_accuracy", "cam_mIoU", "cam_object_mIoU", "pointing_game", "mAP_conflicting")


def selection_path(args) -> str:
    return os.path.join(args.out, f"{args.name}.selection.json")


def _finished_or_exit(args) -> dict:
    """{(arm, seed): metrics.json} of every run of the study; exits naming the first unfinished one."""
    results = {}
    for arm in args.arms:
        for seed in args.seeds:
            metrics = finished_metrics(arm, seed, args)
            if metrics is None:
                raise SystemExit(f"biased_shapes {args.command}: {arm} seed {seed} has no finished run matching these "
                                 f"settings in {args.logdir} (train the study first)")
            results[(arm, seed)] = metrics
    return results


def evaluate_run(arm: str, seed: int, split: str, args) -> dict:
    """`protocol.split_records` of the run's final checkpoint on `split` (its first --eval_examples images when
    the runs were evaluated on those only)."""
    import protocol

    import gain_jax as gj
    import gain_jax.data as gd

    config = run_config_of(arm, seed, args)
    info = gd.dataset_info(args.dataset)
    model = gj.build_model(config.train.backbone, num_classes=info.num_classes, dropout_rate=0.0)
    variables, _ = protocol.restore_run(run_dir(arm, seed, args))
    if config.eval.eval_examples:
        split = f"{split}[:{config.eval.eval_examples}]"
    batches = gd.input_pipeline(args.dataset, split, data_dir=args.data_dir, batch_size=64,
                                image_size=config.data.image_size, train=False, autoaugment=False)
    return protocol.split_records(model, variables, config.gain, batches, info.num_classes)


def select_main(args) -> int:
    """Choose each target's arm and each arm's CAM threshold on validation splits; write the selection file."""
    import protocol

    from gain_jax import stats

    if BASELINE_ARM not in args.arms:
        raise SystemExit(f"biased_shapes select: the study needs the {BASELINE_ARM} arm (targets are differences "
                         "to it)")
    results = _finished_or_exit(args)
    per_run, thresholds = {}, {}
    for arm in args.arms:
        curves = {}
        for seed in args.seeds:
            records = evaluate_run(arm, seed, "validation_unbiased", args)
            curves[seed] = protocol.cam_miou_by_threshold(records)
            summary = protocol.summarize_records(records, protocol.CAM_THRESHOLDS[0])
            per_run[run_name(arm, seed)] = {"arm": arm, "seed": seed, "records": records,
                                            "validation_mAP": float(results[(arm, seed)]["final"]["validation"]["mAP"]),
                                            "mAP": summary["mAP"], "PxAP": summary["PxAP"],
                                            "mAP_conflicting": summary.get("mAP_conflicting", float("nan"))}
        mean_curve = {t: float(np.mean([curves[seed][t] for seed in args.seeds])) for t in protocol.CAM_THRESHOLDS}
        thresholds[arm] = {"threshold": stats.choose_threshold(mean_curve), "mean_cam_mIoU_by_threshold": mean_curve}
        for seed in args.seeds:
            entry = per_run[run_name(arm, seed)]
            entry["cam_mIoU"] = float(curves[seed][thresholds[arm]["threshold"]])
            print(f"  {arm} seed {seed}: validation_unbiased mAP {entry['mAP']:.3f}, PxAP {entry['PxAP']:.3f}, "
                  f"CAM mIoU {entry['cam_mIoU']:.3f} at {thresholds[arm]['threshold']}", flush=True)

    def arm_mean(arm, metric):
        return float(np.mean([per_run[run_name(arm, seed)][metric] for seed in args.seeds]))

    configs = {arm: run_config_of(arm, args.seeds[0], args) for arm in args.arms}
    choices = {}
    for target in TARGETS:
        if target.family.startswith("same as "):
            chosen = choices.get(target.family[len("same as "):], {}).get("arm")
            candidates = [chosen] if chosen else []
        else:
            candidates = [arm for arm in args.arms if arm != BASELINE_ARM and FAMILIES[target.family](configs[arm])]
        values = {arm: arm_mean(arm, target.choose_on) for arm in candidates}
        arm = max(candidates, key=lambda a: values[a]) if candidates else None  # max keeps the first on ties
        choices[target.name] = {"claim": target.claim, "family": target.family, "arm": arm,
                                "chosen_on": f"validation_unbiased {target.choose_on}, mean over seeds {args.seeds}",
                                "candidates": values, "baseline_value": arm_mean(BASELINE_ARM, target.choose_on),
                                "measure": list(target.measure), "margin": target.margin}
        print(f"  target {target.name}: " + (f"{arm} ({values[arm]:.3f} vs the baseline's "
                                              f"{choices[target.name]['baseline_value']:.3f})" if arm
                                              else "no candidate arm in this study"), flush=True)
    candidates = {arm for family in FAMILIES.values() for arm in args.arms if family(configs[arm])}
    controls = [arm for arm in args.arms if arm != BASELINE_ARM and arm not in candidates]
    print(f"  controls (evaluated on test as they are): {', '.join(controls) or 'none'}", flush=True)
    default = default_choice(per_run, results, args) if set(DEFAULT_CHAIN) <= set(args.arms) else None
    record = {"study": args.name, "gain_shapes_version": data_version(args.dataset), "arms": args.arms,
              "seeds": args.seeds, "controls": controls,
              "settings": {key: value for key, value in vars(args).items()
                           if key not in ("logdir", "out", "arm_flags", "command")},
              "train_commands": {run_name(a, s): shlex.join(["python", "train.py"] + run_flags(a, s, args))
                                 for a in args.arms for s in args.seeds},
              "rule": SELECTION_RULE, "thresholds": thresholds, "targets": choices,
              **({"default_choice": default} if default else {}),
              "validation_unbiased": {name: {k: v for k, v in entry.items() if k != "records"}
                                      for name, entry in per_run.items()}}
    os.makedirs(args.out, exist_ok=True)
    with open(selection_path(args), "w") as handle:
        json.dump(record, handle, indent=1)
    print(f"selection: {selection_path(args)} (commit it before running `test`)")
    return 0


def default_choice(per_run: dict, results: dict, args) -> dict:
    """DEFAULT_RULE on the validation numbers of `select`: each step of the chain with its intervals, the arm
    chosen, and the baseline's means over the seeds on REFERENCE_SPLITS (the rows train.py's closing table shows
    as the baseline trained as long)."""
    from gain_jax import stats

    def by_seed(arm, key):
        return {seed: per_run[run_name(arm, seed)][key] for seed in args.seeds}

    chosen, steps = DEFAULT_CHAIN[0], []
    for arm in DEFAULT_CHAIN[1:]:
        gain = stats.t_interval(stats.paired_differences(by_seed(arm, "mAP"), by_seed(chosen, "mAP")))
        cost = stats.t_interval(stats.paired_differences(by_seed(arm, "validation_mAP"),
                                                         by_seed(chosen, "validation_mAP")))
        moves = gain.low > DEFAULT_GAIN_MARGIN and cost.low > DEFAULT_COST_MARGIN
        steps.append({"arm": arm, "against": chosen, "validation_unbiased_mAP": gain.as_dict(),
                      "validation_mAP": cost.as_dict(), "moves": moves})
        print(f"  default: {arm} - {chosen}: validation_unbiased mAP {_interval_text(gain.as_dict())}, validation "
              f"mAP {_interval_text(cost.as_dict())}: " + ("moves to it" if moves else "stays"), flush=True)
        if moves:
            chosen = arm
    print(f"  default: {chosen} (train.py's default configuration, by DEFAULT_RULE)", flush=True)
    baseline = {split: {metric: float(np.mean([results[(BASELINE_ARM, seed)]["final"][split][metric]
                                               for seed in args.seeds]))
                        for metric in REFERENCE_METRICS}
                for split in REFERENCE_SPLITS}
    return {"rule": DEFAULT_RULE, "chain": list(DEFAULT_CHAIN), "steps": steps, "default": chosen,
            "train_flags": arm_flags(chosen, args), "baseline_trained_as_long": baseline,
            "budget": {"epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "batch_size": args.batch_size,
                       "gain_shapes_version": data_version(args.dataset), "seeds": args.seeds}}


def _interval_text(interval: dict) -> str:
    return f"{interval['mean']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def test_main(args) -> int:
    """Evaluate the selected arms and the baseline on test_unbiased; paired t-intervals and bootstrap intervals."""
    import protocol

    from gain_jax import metrics, stats

    path = selection_path(args)
    if not os.path.isfile(path):
        raise SystemExit(f"biased_shapes test: no selection file {path}: run `select` first (choose on validation, "
                         "then look at test once)")
    with open(path) as handle:
        selection = json.load(handle)
    if (selection["arms"], selection["seeds"], selection["gain_shapes_version"]) != (
            args.arms, args.seeds, data_version(args.dataset)):
        raise SystemExit(f"biased_shapes test: {path} was made for arms {selection['arms']}, seeds "
                         f"{selection['seeds']}, gain_shapes {selection['gain_shapes_version']}, not these")
    results = _finished_or_exit(args)
    chosen = {t["arm"] for t in selection["targets"].values() if t["arm"]} | set(selection.get("controls", ()))
    arms = [arm for arm in args.arms if arm == BASELINE_ARM or arm in chosen]
    records = {(arm, seed): evaluate_run(arm, seed, "test_unbiased", args) for arm in arms for seed in args.seeds}
    per_run = {}
    for (arm, seed), rec in records.items():
        summary = protocol.summarize_records(rec, selection["thresholds"][arm]["threshold"])
        summary["validation_mAP"] = float(results[(arm, seed)]["final"]["validation"]["mAP"])
        per_run[(arm, seed)] = summary

    def value(arm, seed, split, metric):
        return per_run[(arm, seed)]["validation_mAP"] if split == "validation" else per_run[(arm, seed)][metric]

    num_images = len(records[(BASELINE_ARM, args.seeds[0])]["scores"])
    statistics = {"mAP": lambda rec, rows: metrics.mean_average_precision(rec["scores"][rows], rec["targets"][rows]),
                  "PxAP": lambda rec, rows: protocol.pxap_statistic(rec)(rows)}
    verdicts, lines = {}, []
    for name, target in selection["targets"].items():
        arm = target["arm"]
        if arm is None:
            continue
        split, metric = target["measure"]
        differences = stats.paired_differences({s: value(arm, s, split, metric) for s in args.seeds},
                                               {s: value(BASELINE_ARM, s, split, metric) for s in args.seeds})
        verdict = stats.target_verdict(differences, target["margin"]) if len(args.seeds) > 1 else {
            "verdict": "undecided (one seed: no interval)", "mean": float(differences[0])}
        verdicts[name] = {"claim": target["claim"], "arm": arm, **verdict}
        interval = _interval_text(verdict) if "low" in verdict else f"{verdict['mean']:+.3f}"
        lines.append(f"| {target['claim']} | {arm} | {interval} | {verdict['verdict']} |")
    comparison_keys = ("mAP", "mAP_conflicting", "PxAP", "cam_mIoU", "validation_mAP")
    pairs = [(arm, BASELINE_ARM) for arm in arms if arm != BASELINE_ARM]
    pairs += [pair for pair in CONTROL_PAIRS if set(pair) <= set(arms)]
    comparisons, comparison_lines = {}, []
    for arm, reference in pairs:  # every tested arm against the baseline, and the controls' pairs: no verdicts
        row = {}
        for key in comparison_keys:
            differences = stats.paired_differences({s: per_run[(arm, s)][key] for s in args.seeds},
                                                   {s: per_run[(reference, s)][key] for s in args.seeds})
            row[key] = (stats.t_interval(differences).as_dict() if len(args.seeds) > 1
                        else {"mean": float(differences[0])})
        comparisons[f"{arm} - {reference}"] = row
        comparison_lines.append(f"| {arm} - {reference} | " + " | ".join(
            _interval_text(row[key]) if "low" in row[key] else f"{row[key]['mean']:+.3f}" for key in comparison_keys)
            + " |")
    bootstrap = {}
    for arm in arms:  # lead rows: the mean over the seeds, images resampled (the same rows for every seed)
        bootstrap[arm] = {}
        for metric, statistic in statistics.items():
            def mean_over_seeds(rows, arm=arm, statistic=statistic):
                return float(np.mean([statistic(records[(arm, seed)], rows) for seed in args.seeds]))

            def difference(rows, arm=arm, statistic=statistic):
                return float(np.mean([statistic(records[(arm, seed)], rows) - statistic(records[(BASELINE_ARM, seed)],
                                                                                       rows) for seed in args.seeds]))
            bootstrap[arm][metric] = stats.bootstrap_interval(mean_over_seeds, num_images, seed=0,
                                                              resamples=BOOTSTRAP_RESAMPLES).as_dict()
            if arm != BASELINE_ARM:
                bootstrap[arm][f"{metric} - baseline"] = stats.bootstrap_interval(
                    difference, num_images, seed=0, resamples=BOOTSTRAP_RESAMPLES).as_dict()
    keys = ("mAP", "mAP_conflicting", "PxAP", "cam_mIoU", "cam_object_mIoU", "pointing_game")
    run_lines = [f"| {arm} | {seed} | {per_run[(arm, seed)]['cam_threshold']} | "
                 + " | ".join(f"{per_run[(arm, seed)].get(key, float('nan')):.3f}" for key in keys) + " |"
                 for arm in arms for seed in args.seeds]
    boot_lines = [f"| {arm} | {metric} | {b['mean']:.3f} [{b['low']:.3f}, {b['high']:.3f}] |"
                  for arm in arms for metric, b in bootstrap[arm].items()]
    text = (f"gain_shapes {data_version(args.dataset)}, study {args.name}, test_unbiased ({num_images} images), "
            f"seeds "
            f"{args.seeds}; arms chosen on validation ({os.path.basename(path)})\n\n"
            "| target | arm | arm - baseline, paired by seed: mean [95% t-interval] | verdict |\n|---|---|---|---|\n"
            + "\n".join(lines) + "\n\n'met' only when the interval's lower bound clears the margin.\n\n"
            "| difference, paired by seed: mean [95% t-interval] | " + " | ".join(comparison_keys)
            + " |\n|" + "---|" * (len(comparison_keys) + 1) + "\n" + "\n".join(comparison_lines) + "\n\n"
            "| arm | metric (mean over seeds) | 95% bootstrap interval over test images |\n|---|---|---|\n"
            + "\n".join(boot_lines) + "\n\n| arm | seed | CAM threshold (chosen on validation) | "
            + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 3) + "\n" + "\n".join(run_lines) + "\n")
    print(text)
    record = {"selection": os.path.basename(path), "verdicts": verdicts, "comparisons": comparisons,
              "bootstrap": bootstrap,
              "per_run": {run_name(a, s): {"arm": a, "seed": s, **v} for (a, s), v in per_run.items()}}
    with open(os.path.join(args.out, f"{args.name}.test.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    with open(os.path.join(args.out, f"{args.name}.test.md"), "w") as handle:
        handle.write(text)
    if importlib.util.find_spec("matplotlib") is not None:
        figure_path = os.path.join(args.out, f"{args.name}.test.png")
        print(f"figure: {figure_path} ({test_figure(record, selection, args, figure_path) / 1000:.0f} kB)")
    return 0


# ---------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    args.logdir = os.path.abspath(args.logdir)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # protocol.py beside this script
    if args.command == "select":
        return select_main(args)
    if args.command == "test":
        return test_main(args)
    if importlib.util.find_spec("matplotlib") is None:  # fail before the training, not after
        parser.error("matplotlib is needed for the figure: pip install -e \".[bench]\"")
    args.logdir = os.path.abspath(args.logdir)
    started = time.time()
    print(f"biased_shapes {args.name}: {len(args.arms)} arms x {len(args.seeds)} seeds on gain_shapes "
          f"{data_version(args.dataset)}, {machine_line()}")
    print(f"  {args.epochs} epochs x {args.steps_per_epoch} steps of {args.batch_size} (attention mining from "
          f"epoch {args.pretrain_epochs + 1}), lr {args.lr:g}; runs in {args.logdir}\n{arms_table(args)}",
          flush=True)
    results, seconds, cpu_seconds, sweeps = run_all(args)
    training_seconds = time.time() - started

    summary = summarize(results, args)
    floors = validation_floors(results)
    table = summary_table(summary, args)
    runs = per_run_table(results, seconds, cpu_seconds, args, sweeps)
    first = results[(args.arms[0], args.seeds[0])]["final"]["validation_unbiased"]
    print(f"\nper run (CAM metrics at pointing tolerance {first.get('pointing_tolerance_px')} px, CAM threshold "
          f"{first.get('cam_threshold')}; mAP conflicting: images whose texture is a non-label class's own"
          + ("; sweep/N: trained in a seed sweep of N runs, the sweep's time divided by N" if any(sweeps.values())
             else "") + "):")
    print(runs)
    print(f"\nmean ± std (ddof=1) over seeds {args.seeds} (choose configurations on validation_unbiased):")
    print(table)
    print(floors_line(floors))

    os.makedirs(args.out, exist_ok=True)
    figure_path = os.path.join(args.out, f"{args.name}.png")
    figure_bytes = make_figure(summary, floors, args, figure_path)
    total_seconds = time.time() - started
    print(f"\nfigure: {figure_path} ({figure_bytes / 1000:.0f} kB)"
          + (f"  WARNING: over {FIGURE_BYTES_LIMIT // 1000} kB" if figure_bytes > FIGURE_BYTES_LIMIT else ""))
    total_cpu = sum(c for c in cpu_seconds.values() if c is not None)
    print(f"wall time: {training_seconds:.0f} s training and evaluation ({len(results)} runs, "
          f"{sum(1 for s in seconds.values() if s is None)} reused), {total_seconds:.0f} s in all; "
          f"the runs used {total_cpu:.0f} CPU s (user + system; on an otherwise idle machine the runs' wall time "
          f"is about this divided by the cores they keep busy), load average now {os.getloadavg()[0]:.1f}")

    record = {
        "command": shlex.join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]) if argv is None else None,
        "name": args.name,
        "gain_shapes_version": data_version(args.dataset),
        "machine": machine_line(),
        "environment": provenance.environment_record(),  # library versions, git revision (as config.json's)
        "settings": {key: value for key, value in vars(args).items() if key not in ("logdir", "out", "arm_flags")},
        "arms": {arm: arm_flags(arm, args) for arm in args.arms},
        "train_commands": {run_name(a, s): shlex.join(["python", "train.py"] + run_flags(a, s, args))
                           for a in args.arms for s in args.seeds},
        "summary": summary,
        "floors_validation_unbiased": floors,
        "per_run": {run_name(a, s): {"arm": a, "seed": s, "seconds": seconds[(a, s)],
                                     "cpu_seconds": cpu_seconds[(a, s)], "trained_with_seeds": sweeps[(a, s)],
                                     **{key: metric_value(results[(a, s)], key)
                                        for key, *_ in METRICS}}
                    for a in args.arms for s in args.seeds},
        "wall_seconds": {"training": training_seconds, "total": total_seconds},
        "cpu_seconds_of_runs": total_cpu,
    }
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as handle:
        handle.write(f"gain_shapes {data_version(args.dataset)}, study {args.name}; mean ± std over seeds "
                     f"{args.seeds}\n\n"
                     f"{table}\n\n{floors_line(floors)}\n\narms\n\n{arms_table(args)}\n\nper run\n\n{runs}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
