"""Issue 21's study: does attention mining (GAIN's L_am) extend a classifier's attention from an object's
discriminative part to its body? On the embedded gain_parts benchmark (gain_jax/data/parts.py), several seeds,
configurations chosen on validation only, intervals against the baseline.

    # issue 21's study, pre-registered in two stages (experiments/README.md, "Pre-registration"):
    python experiments/parts_study.py --study screen --seeds 0 --budget full            # 11 arms, one seed
    python experiments/parts_study.py select --study screen --seeds 0 --budget full     # picks the self-guided arm
    python experiments/parts_study.py --study confirm --seeds 0,1,2,3,4 --budget full --reuse   # 4 arms, 5 seeds
    python experiments/parts_study.py select --study confirm --seeds 0,1,2,3,4 --budget full    # commit its file
    python experiments/parts_study.py test --study confirm --seeds 0,1,2,3,4 --budget full     # test, once
    python experiments/parts_study.py heldout --study confirm --seeds 0,1,2,3,4 --budget full --heldout_seed SEED
    python experiments/parts_study.py figure --study confirm --split test --seeds 0,1,2,3,4 --budget full
    python experiments/parts_study.py curves --study confirm --seeds 0,1,2,3,4 --budget full   # loss curves
    python experiments/parts_study.py dose --budget short                      # the 12 configs (one seed)
    python experiments/parts_study.py --study short --budget short --seeds 0   # a quick look: 4 arms
    python experiments/parts_study.py calibrate --budget full --seeds 0        # where the ceiling has room

Protocol (issue 20's, as experiments/biased_shapes.py): training (the default command) evaluates validation
only (a run's --test is refused). `select` evaluates the finished runs' final checkpoints on validation with
`gain_jax.part_metrics` and writes, without reading test, each target's arm to <out>/<name>.selection.json
(meant to be committed); `test` refuses to run without it and evaluates the baseline, the chosen arms and the
ceilings on test: per target the arm - baseline differences paired by seed with a 95% t-interval ("met" only when
its lower bound clears the margin; gain_jax.stats), per arm 95% bootstrap intervals over the test images.
`heldout`, after test (it refuses to run without the selection file and without <out>/<name>.test.json of the same
runs), checks the claims on data that is not in the repository: the same arms, evaluated the same way
(`evaluate_chosen`, shared with `test`), on --heldout_images (default 500) images of gain_parts' held-out stream of
--heldout_seed (a seed in [0, 2**32) chosen at evaluation time; `parts.heldout_split`), generated then from the seed
by the data set's own generator, seeded apart from every split, and stored nowhere. It writes
<out>/<name>.heldout.{json,md}: the seed, the number of images, the target table (paired by seed, 95% t-interval,
verdict), the per-run measures, the references, and the bootstrap intervals over the held-out images as test
has them (kept: at the confirm study's size, 4 arms x 5 seeds x 500 images, an estimated 90 CPU-s, 0.6 ms for each
of about 150,000 resampled summaries, against about 150 s to evaluate the 20 runs: not double the cost).

Measures (`gain_jax.part_metrics`, on the label class's Grad-CAM, the run's CAM method): the share of the map's
mass on the body (part excluded), "body share", the body coverage the issue's target is about; on the part;
body and part recall over thresholds 0.1-0.9; whole-object PxAP; mAP; the class's sigmoid probability on the
image and with its part erased (the generator's counterfactual). References beside the arms: the part-only
floor (a perfect part detector, at pixels and at the 8- and 4-px Grad-CAM cells) and the whole object.

Arms (ARMS: train.py flags after the common ones; `{epochs}`, `{am_weight}`, `{ex_weight}`, `{ex_fraction}`
stand for this script's flags): the baseline (classification only), GAIN with upstream's semantics, self-guided
GAIN (BatchNorm on the erased batch's statistics, each class's sigmoid as the score, the erased region filled
with the image rolled by half its size: background on gain_parts, no cue) and one variant per registry setting
(erase fill, mask and Grad-CAM gradient paths, score, BatchNorm mode, alpha), GAIN_ext with 10% of the masks,
and the ceilings: GAIN_ext and the mask loss alone with every mask. A study (STUDIES) is a list of arms.

Budgets (BUDGETS, `--budget`; each value can be overridden by its own flag): epochs, classification-only epochs,
steps per epoch, batch size, learning rate and the number of validation/test images evaluated (0: all; not
`heldout`'s, --heldout_images). `tiny` is for tests; `short` is the fine-grid probe's
(experiments/results/parts_probe/fine_grid/README.md); `full` the study's. Runs go to
<logdir>/<data set config>_<backbone>_<arm>_seed<seed>; training keeps a finished run with the same flags with
--reuse, `dose` always keeps it (and trains the missing ones), `select`, `test`, `heldout` and `figure` never train
(they refuse to run without every run finished). Runs are trained one at a time, or with --together each arm's
seeds to train as one seed sweep (train.py --seeds, `protocol.train_runs`: the same run folders and, to float32
rounding, the same results).

`dose`: the dose-response over gain_parts' 12 configs (part size x body reliability): --dose_arms (baseline,
GAIN, GAIN_ext@10% by default) trained on each config (--configs to choose), evaluated on its validation split;
body share, part share, the part's share of the object's area and the ratio of the two, PxAP, mAP, probability
kept without the part, per config and arm (mean over --seeds), to <out>/dose.{json,md}. `figure` draws the
first --figure_images images of a split (validation; test only once the selection file exists) with their
masks and each arm's map (first seed), below the map of an arm that trains L_am the images as its
attention-mining stream erases them, to <out>/<name>.<split>.png, and, when <out>/dose.json exists, body
share against the part-to-body area ratio per arm and reliability, to <out>/dose.png. `curves` tabulates each
arm's training losses (L_cl, L_am, L_ext) and validation mAP per epoch, mean over the seeds, from the runs'
records (no split read), to <out>/<name>.curves.md. `calibrate`: the baseline and the ceiling (ex_only@100%)
under CALIBRATION_SETTINGS (longer training, a heavier mask loss), cheapest first, validation only, until the
ceiling's PxAP clears the baseline's by CEILING_MARGIN, to <out>/calibration.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # protocol, biased_shapes, parts_probe

import biased_shapes  # noqa: E402
import parts_probe  # noqa: E402

from gain_jax import config as run_config  # noqa: E402
from gain_jax import part_metrics  # noqa: E402

# Every arm names the settings that train.py's defaults could change, so that it means the same whatever they are.
_SELF = "--am_weight {am_weight} --am_batchnorm batch --score sigmoid --cam_grad stop --mask_grad through"
_GAIN = _SELF + " --ex_weight 0 --ex_fraction 1"
_EXT = _SELF + " --erase shift --ex_weight {ex_weight}"
ARMS = {
    "baseline": "--am_weight 0 --ex_weight 0 --ex_fraction 1 --pretrain_epochs {epochs}",
    # upstream's semantics: alpha 1, frozen BatchNorm, softmax score, erased region filled with 0
    "GAIN_upstream": "--am_weight 1 --am_batchnorm frozen --score softmax --cam_grad stop --mask_grad through "
                     "--erase constant --fill 0 --ex_weight 0 --ex_fraction 1",
    # self-guided GAIN (gain_shapes' best self-guided variant: erase shift), then one registry setting changed
    "GAIN": _GAIN + " --erase shift",
    "GAIN:erase=constant": _GAIN + " --erase constant --fill 0",
    "GAIN:mask_grad=stop": _GAIN + " --erase shift --mask_grad stop",
    "GAIN:cam_grad=full": _GAIN + " --erase shift --cam_grad full",
    "GAIN:cam_grad=full,mask_grad=stop": _GAIN + " --erase shift --cam_grad full --mask_grad stop",
    "GAIN:score=softmax": _GAIN + " --erase shift --score softmax",
    "GAIN:am_batchnorm=frozen": _GAIN + " --erase shift --am_batchnorm frozen",
    "GAIN:am_weight=1": _GAIN + " --erase shift --am_weight 1",
    # a few masks
    "GAIN_ext@10%": _EXT + " --ex_fraction {ex_fraction}",
    # ceilings: every mask, with and without L_am
    "GAIN_ext@100%": _EXT + " --ex_fraction 1",
    "ex_only@100%": "--am_weight 0 --ex_weight {ex_weight} --ex_fraction 1",
}
STUDIES = {
    "main": tuple(ARMS),
    "short": ("baseline", "GAIN", "GAIN_ext@10%", "GAIN_ext@100%"),
    # issue 21's study in two stages (13 arms x 5 seeds would take about 6 CPU hours): the screen, one seed of every
    # arm that a target can choose, picks the self-guided arm on validation; the confirmation trains the baseline,
    # that arm, GAIN_ext@10% and the mask-supervised ceiling on 5 seeds (its arms: confirm_arms)
    "screen": tuple(arm for arm in ARMS if arm not in ("GAIN_ext@100%", "ex_only@100%")),
    "confirm": (),
}
CONFIRM_FIXED = ("GAIN_ext@10%", "ex_only@100%")  # besides the baseline and the screen's self-guided choice
BUDGETS = {
    "tiny": {"epochs": 2, "pretrain_epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "lr": 1e-3,
             "eval_examples": 8},
    "short": {"epochs": 2, "pretrain_epochs": 1, "steps_per_epoch": 100, "batch_size": 32, "lr": 2e-3,
              "eval_examples": 200},
    "full": {"epochs": 6, "pretrain_epochs": 2, "steps_per_epoch": 100, "batch_size": 32, "lr": 1e-3,
             "eval_examples": 0},
}
BASELINE_ARM = "baseline"
MAP_TOLERANCE = 0.02  # "at equal classification mAP": an arm may be chosen when its mean validation mAP is at
# most this far below the baseline's
COVERAGE_MARGIN = 0.10  # the target: body share (or whole-object PxAP) up by at least this
Target = biased_shapes.Target
TARGETS = (
    Target("self-guided body share", "GAIN (no masks): test body share >= baseline + 0.10", "GAIN (self-guided)",
           "pxap", ("test", "body_share"), COVERAGE_MARGIN),
    Target("self-guided PxAP", "the same arm: test whole-object PxAP >= baseline + 0.10",
           "same as self-guided body share", "pxap", ("test", "pxap"), COVERAGE_MARGIN),
    Target("self-guided cost", "the same arm: test mAP no more than 0.02 below the baseline's",
           "same as self-guided body share", "pxap", ("test", "mAP"), -MAP_TOLERANCE),
    Target("GAIN_ext body share", "GAIN_ext (<= 10% masks): test body share >= baseline + 0.10",
           "GAIN_ext (<= 10% masks)", "pxap", ("test", "body_share"), COVERAGE_MARGIN),
    Target("GAIN_ext PxAP", "the same arm: test whole-object PxAP >= baseline + 0.10", "same as GAIN_ext body share",
           "pxap", ("test", "pxap"), COVERAGE_MARGIN),
    Target("GAIN_ext cost", "the same arm: test mAP no more than 0.02 below the baseline's",
           "same as GAIN_ext body share", "pxap", ("test", "mAP"), -MAP_TOLERANCE),
)
# Whole-object PxAP, not body share, chooses: the blur of a part-centred map lies on the body, so body share barely
# tells it from a body-covering one, while PxAP (every threshold, background counted against) does
# (experiments/results/parts_probe/fine_grid/README.md).
SELECTION_RULE = (f"per target, among the study's arms of its family whose mean validation mAP over the seeds is at "
                  f"most {MAP_TOLERANCE} below the baseline's, the arm with the highest mean validation whole-object "
                  "PxAP (first in study order on ties); no test image is read")
DOSE_ARMS = ("baseline", "GAIN", "GAIN_ext@10%")
MEASURES = ("mAP", "body_share", "part_share", "body_recall@0.5", "pxap", "body_recall_mean", "part_recall_mean",
            "p_image", "p_part_erased")
BOOTSTRAP_MEASURES = ("body_share", "pxap", "mAP")
BOOTSTRAP_RESAMPLES = 1000
RECORD_FILE = "parts_study_run.json"
EVAL_BATCH = 50  # images per evaluation batch; the figure's images come from the first
COMMANDS = ("train", "select", "test", "heldout", "dose", "figure", "curves", "calibrate")
HELDOUT_IMAGES = 500  # `heldout`'s default --heldout_images: as many as the test split has
# `calibrate`: training settings tried for the ceiling, cheapest first (the budget's epochs times the factor, the
# mask loss's weight); fixed before any calibration run (experiments/README.md, "Calibrating the ceiling")
CALIBRATION_SETTINGS = {"epochs_x1_ex_weight_1": (1, 1.0), "epochs_x1_ex_weight_10": (1, 10.0),
                        "epochs_x3_ex_weight_1": (3, 1.0), "epochs_x3_ex_weight_10": (3, 10.0)}
CEILING_ARM = "ex_only@100%"
CEILING_MARGIN = 0.15  # the ceiling's validation PxAP over the baseline's that a setting must reach: room for the
# +0.10 targets below it


# ---------------------------------------------------------------------------------------------- flags

def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds wants comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds wants distinct seeds, got {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="train", choices=COMMANDS)
    p.add_argument("--study", default="main", choices=tuple(STUDIES),
                   help=("arms: " + "; ".join(f"{name}: {', '.join(arms)}" for name, arms in STUDIES.items()
                                               if arms) + f"; confirm: {BASELINE_ARM}, the self-guided arm chosen "
                         f"by the screen (<out>/screen.selection.json), {', '.join(CONFIRM_FIXED)}")
                   .replace("%", "%%"))
    p.add_argument("--arms", nargs="+", default=None, metavar="ARM", help="these arms instead of the study's")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS",
                   help="add or replace an arm: --arm 'GAIN:sigma=0.25=--am_weight 0.1 ... --sigma 0.25' (the "
                        "first '=' followed by '--' ends the name)")
    p.add_argument("--seeds", type=seed_list, default=[0], help="comma-separated, e.g. 0,1,2,3,4")
    p.add_argument("--budget", default="short", choices=tuple(BUDGETS),
                   help="; ".join(f"{name}: {budget}" for name, budget in BUDGETS.items()))
    for flag, kind in (("epochs", int), ("pretrain_epochs", int), ("steps_per_epoch", int), ("batch_size", int),
                       ("lr", float), ("eval_examples", int)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="overrides the budget's value")
    p.add_argument("--dataset", default="gain_parts",
                   choices=[d for d in run_config.DATASETS if d.startswith("gain_parts")])
    p.add_argument("--backbone", default="small_cnn_fine", choices=parts_probe.BACKBONES)
    p.add_argument("--am_weight", type=float, default=0.1, help="alpha of the self-guided arms")
    p.add_argument("--ex_weight", type=float, default=1.0, help="weight of the mask loss (GAIN_ext, ex_only)")
    p.add_argument("--ex_fraction", type=float, default=0.1, help="GAIN_ext@10%%'s share of the training masks")
    p.add_argument("--configs", nargs="+", default=None, metavar="CONFIG",
                   help="dose: these gain_parts configs (default: all 12)")
    p.add_argument("--dose_arms", nargs="+", default=list(DOSE_ARMS), metavar="ARM")
    p.add_argument("--figure_images", type=int, default=8)
    p.add_argument("--split", default="validation", choices=("validation", "test"), help="figure: which images")
    p.add_argument("--heldout_seed", type=int, default=None, metavar="SEED",
                   help="heldout (required there, refused elsewhere): the held-out stream's seed, an int in "
                        "[0, 2**32), chosen at evaluation time; its images are generated from it (gain_parts' "
                        "generator, seeded apart from every split) and stored nowhere")
    p.add_argument("--heldout_images", type=int, default=None, metavar="N",
                   help=f"heldout: how many images of the stream (its indices 0..N-1), N in [2, 10**6]; default "
                        f"{HELDOUT_IMAGES}. --eval_examples does not apply to them")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--logdir", default=os.path.join(REPO_ROOT, "runs", "parts_study"))
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "experiments", "results", "parts_study"))
    p.add_argument("--reuse", action="store_true", help="train: keep finished runs with the same flags")
    p.add_argument("--together", action="store_true",
                   help="train and dose: each arm's seeds to train as one seed sweep in one program (train.py "
                        "--seeds): the same run folders, results equal to float32 rounding; a run's wall time is "
                        "the sweep's divided by its seeds. Off by default: on the 2-core CPU 5 seeds of train.py's "
                        "default gain 7%% (bench/README.md, sweep_throughput.py)")
    p.add_argument("--train_arg", action="append", default=[], metavar="FLAG",
                   help="extra train.py flag for every run, before the arm's (repeat)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in BUDGETS[args.budget].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.epochs, args.steps_per_epoch, args.batch_size) < 1 or args.eval_examples < 0:
        parser.error("--epochs, --steps_per_epoch and --batch_size must be >= 1, --eval_examples >= 0")
    if not 1 <= args.figure_images <= EVAL_BATCH:
        parser.error(f"--figure_images must be in [1, {EVAL_BATCH}], got {args.figure_images}")
    if not 0.0 < args.ex_fraction <= 1.0:
        parser.error(f"--ex_fraction must be in (0, 1], got {args.ex_fraction}")
    if not 0 <= args.pretrain_epochs < args.epochs:
        parser.error(f"--pretrain_epochs must be in [0, --epochs={args.epochs}), got {args.pretrain_epochs}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir} does not exist")
    args.arm_flags = dict(ARMS)
    for text in args.arm:
        name, sep, flags = text.partition("=--")
        if not sep or not name.strip():
            parser.error(f"--arm wants NAME=FLAGS (flags starting with --), got {text!r}")
        args.arm_flags[name.strip()] = "--" + flags
    if args.arms:
        args.arms = list(args.arms)
    elif args.study == "confirm":
        args.arms = confirm_arms(args.out, parser)
    else:
        args.arms = list(STUDIES[args.study])
    from gain_jax.data import parts

    heldout_flags = args.heldout_seed is not None or args.heldout_images is not None
    if args.command != "heldout" and heldout_flags:
        parser.error("--heldout_seed and --heldout_images are for the heldout command")
    if args.command == "heldout":
        if args.heldout_seed is None:
            parser.error("heldout needs --heldout_seed SEED (an int in [0, 2**32), chosen now)")
        if not 0 <= args.heldout_seed < parts.HELDOUT_SEEDS:
            parser.error(f"--heldout_seed must be in [0, 2**32), got {args.heldout_seed}")
        args.heldout_images = HELDOUT_IMAGES if args.heldout_images is None else args.heldout_images
        if not 2 <= args.heldout_images <= parts.HELDOUT_MAX_IMAGES:
            parser.error(f"--heldout_images must be in [2, {parts.HELDOUT_MAX_IMAGES}], got {args.heldout_images}")
    if "/" not in args.dataset:  # one name per config, so that the study's and dose's runs of it are the same
        args.dataset = f"{args.dataset}/{parts.DEFAULT_CONFIG}"
    args.configs = args.configs or list(parts.CONFIG_NAMES)
    unknown = [c for c in args.configs if c not in parts.CONFIG_NAMES]
    if unknown:
        parser.error(f"unknown gain_parts config(s) {unknown}; configs: {', '.join(parts.CONFIG_NAMES)}")
    arms = args.dose_arms if args.command == "dose" else args.arms
    unknown = [arm for arm in arms if arm not in args.arm_flags]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; arms: {', '.join(args.arm_flags)}")
    if len(set(arms)) < len(arms):
        parser.error(f"an arm is named twice in {arms}")
    if args.command in ("select", "test", "heldout") and BASELINE_ARM not in args.arms:
        parser.error(f"{args.command} needs the {BASELINE_ARM} arm (targets are differences to it)")
    for arm in arms:
        try:
            config = run_config_of(arm, args.seeds[0], args)
        except (run_config.ConfigError, argparse.ArgumentError, KeyError, IndexError, ValueError) as error:
            parser.error(f"arm {arm} ({args.arm_flags[arm]!r}): {error}")
        if config.eval.test:
            parser.error(f"arm {arm}: --test in a run's flags; the study trains blind to test (`test` reads it)")
    study_arms = confirm_arms(args.out, None) if args.study == "confirm" else list(STUDIES[args.study])
    args.name = args.study if args.arms == study_arms else "arms-" + "+".join(
        biased_shapes._safe(arm) for arm in args.arms)
    args.logdir = os.path.abspath(args.logdir)
    return args


def confirm_arms(out: str, parser: argparse.ArgumentParser | None) -> list[str]:
    """The confirmation's arms: the baseline, the self-guided arm that the screen's selection file chose (none when
    no self-guided arm was eligible), then CONFIRM_FIXED. Without that file: the parser's error (or [])."""
    path = os.path.join(out, "screen.selection.json")
    try:
        with open(path) as handle:
            chosen = json.load(handle)["targets"][TARGETS[0].name]["arm"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        if parser is None:
            return []
        parser.error(f"--study confirm reads the screen's choice from {path}, which is missing or unreadable: run "
                     "the screen and its `select` first")
    return [BASELINE_ARM, *([chosen] if chosen else []), *CONFIRM_FIXED]


# ---------------------------------------------------------------------------------------------- runs

def run_flags(arm: str, seed: int, args, dataset: str | None = None) -> list[str]:
    """The train.py flags of one run (on `dataset`, --dataset by default)."""
    dataset = dataset or args.dataset
    text = args.arm_flags[arm].format(epochs=args.epochs, am_weight=f"{args.am_weight:g}",
                                      ex_weight=f"{args.ex_weight:g}", ex_fraction=f"{args.ex_fraction:g}")
    flags = ["--dataset", dataset, "--backbone", args.backbone, "--seed", str(seed), "--epochs", str(args.epochs),
             "--pretrain_epochs", str(args.pretrain_epochs), "--steps_per_epoch", str(args.steps_per_epoch),
             "--batch_size", str(args.batch_size), "--lr", f"{args.lr:g}", "--logdir", args.logdir,
             "--run_name", run_name(arm, seed, args, dataset), "--checkpoint_every", str(args.epochs), "--keep", "1",
             "--num_heatmaps", "0"]  # no --test: training reads validation only
    if args.eval_examples:
        flags += ["--eval_examples", str(args.eval_examples)]
    if args.data_dir:
        flags += ["--data_dir", args.data_dir]
    return flags + list(args.train_arg) + shlex.split(text)


def run_config_of(arm: str, seed: int, args, dataset: str | None = None) -> run_config.Config:
    namespace, unknown = biased_shapes.flags_parser().parse_known_args(run_flags(arm, seed, args, dataset))
    if unknown:
        raise run_config.ConfigError(f"not train.py config flags: {unknown}")
    return run_config.config_from_flags(namespace)


def config_name(dataset: str) -> str:
    return dataset.split("/", 1)[1]


def run_name(arm: str, seed: int, args, dataset: str | None = None) -> str:
    return f"{config_name(dataset or args.dataset)}_{args.backbone}_{biased_shapes._safe(arm)}_seed{seed}"


def run_dir(arm: str, seed: int, args, dataset: str | None = None) -> str:
    return os.path.join(args.logdir, run_name(arm, seed, args, dataset))


def data_version() -> str:
    from gain_jax.data.parts import GainParts

    return str(GainParts.VERSION)


def run_record(arm: str, seed: int, args, dataset: str | None = None) -> dict:
    return {"arm": arm, "flags": run_flags(arm, seed, args, dataset), "gain_parts_version": data_version()}


def finished(arm: str, seed: int, args, dataset: str | None = None) -> dict | None:
    """The run's metrics.json when it finished with exactly these flags on this gain_parts version, else None."""
    directory = run_dir(arm, seed, args, dataset)
    try:
        with open(os.path.join(directory, RECORD_FILE)) as handle:
            record = json.load(handle)
        with open(os.path.join(directory, "metrics.json")) as handle:
            metrics = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    if record != run_record(arm, seed, args, dataset) or metrics.get("status") != "finished":
        return None
    return metrics


def train_arm(arm: str, seeds: list[int], args, dataset: str | None = None) -> float:
    """Train the arm's runs of `seeds` in this process (`protocol.train_runs`: one run, or several as one seed
    sweep; each run's output in <logdir>/<run name>.log) and write each one's RECORD_FILE; wall seconds of them all."""
    import protocol

    _, wall, _ = protocol.train_runs({seed: run_config_of(arm, seed, args, dataset) for seed in seeds},
                                     {seed: run_flags(arm, seed, args, dataset) for seed in seeds},
                                     f"parts_study: {arm}")
    for seed in seeds:
        with open(os.path.join(run_dir(arm, seed, args, dataset), RECORD_FILE), "w") as handle:
            json.dump(run_record(arm, seed, args, dataset), handle, indent=1)
    return wall


def ensure_runs(arms, args, dataset: str | None = None, retrain: bool = False) -> dict:
    """{(arm, seed): wall seconds, None when reused}: every run trained unless a finished one with the same flags
    is there (and not `retrain`); one at a time, or with --together each arm's seeds to train as one seed sweep,
    whose runs are each given its wall time divided by their number."""
    import protocol

    seconds = {}
    for arm, seeds in protocol.run_groups(arms, args.seeds, args.together):
        pending = []
        for seed in seeds:
            if retrain or finished(arm, seed, args, dataset) is None:
                pending.append(seed)
                continue
            print(f"  reusing {run_dir(arm, seed, args, dataset)}", flush=True)
            seconds[(arm, seed)] = None
        for batch in protocol.sweep_batches(arm, pending, run_config_of(arm, seeds[0], args, dataset)):
            flags = run_flags(arm, batch[0], args, dataset)
            if len(batch) == 1:
                print(f"  training {arm}, seed {batch[0]}: train.py {shlex.join(flags)}", flush=True)
            else:
                print(f"  training {arm}, seeds {','.join(map(str, batch))} together as one seed sweep: train.py "
                      f"{shlex.join(protocol.sweep_flags(flags, batch))}", flush=True)
            wall = train_arm(arm, batch, args, dataset)
            for seed in batch:
                seconds[(arm, seed)] = wall / len(batch)
            print(f"  done in {wall:.0f} s" + (f" ({wall / len(batch):.0f} s per run)" if len(batch) > 1 else ""),
                  flush=True)
    return seconds


def existing_runs(arms, args, command: str, dataset: str | None = None) -> None:
    for arm in arms:
        for seed in args.seeds:
            if finished(arm, seed, args, dataset) is None:
                raise SystemExit(f"parts_study {command}: {arm} seed {seed} has no finished run with these settings "
                                 f"in {args.logdir} (train it first)")


# ---------------------------------------------------------------------------------------------- evaluation

def split_batches(split: str, args, dataset: str | None = None):
    import gain_jax.data as gd

    if args.eval_examples:
        split = f"{split}[:{args.eval_examples}]"
    return gd.input_pipeline(dataset or args.dataset, split, data_dir=args.data_dir, batch_size=EVAL_BATCH, train=False)


def heldout_batches(args, dataset: str | None = None) -> list:
    """The first --heldout_images images of the held-out stream of --heldout_seed (`parts.heldout_split`) of the data
    set's config, generated now by gain_parts' generator (stored nowhere), as the evaluation pipeline's batches of
    EVAL_BATCH (`pipeline.parts_evaluation_batches`): a list, read again by each run."""
    from gain_jax.data import parts, pipeline

    config = next(c for c in parts.BUILDER_CONFIGS if c.name == config_name(dataset or args.dataset))
    return list(pipeline.parts_evaluation_batches(parts.heldout_split(args.heldout_seed), range(args.heldout_images),
                                                  config.part_fraction, config.body_reliability,
                                                  batch_size=EVAL_BATCH))


def batches_of(source, args, dataset: str | None = None):
    """The evaluation batches of `source`: a split's name (its first --eval_examples images, `split_batches`) or the
    batches themselves (an iterable read once per call, e.g. `heldout_batches`'s list)."""
    return split_batches(source, args, dataset) if isinstance(source, str) else source


def evaluate_run(arm: str, seed: int, source, args, dataset: str | None = None, keep_maps: int = 0) -> dict:
    """The run's final checkpoint on `source` (a split's name or batches, `batches_of`): `part_metrics.image_records`
    plus "scores"/"targets" [N, C] (mAP), and the first `keep_maps` label maps as "maps"."""
    import jax
    import protocol
    import tensorflow_datasets as tfds

    import gain_jax as gj
    import gain_jax.data as gd

    dataset = dataset or args.dataset
    config = run_config_of(arm, seed, args, dataset)
    info = gd.dataset_info(dataset)
    parts_config = tfds.builder(dataset, data_dir=args.data_dir).builder_config
    model = gj.build_model(config.train.backbone, info.num_classes, dropout_rate=0.0)
    variables, _ = protocol.restore_run(run_dir(arm, seed, args, dataset))
    cams_of = jax.jit(lambda images: gj.class_cams(model, variables, images, config.gain))
    batches, scores, targets, maps_kept = [], [], [], []
    for batch in batches_of(source, args, dataset):
        labels = np.asarray(batch["labels"])
        classes, rows = np.argmax(labels, axis=1), np.arange(len(labels))
        logits, cams = cams_of(jax.numpy.asarray(batch["image"]))
        erased_logits, _ = cams_of(jax.numpy.asarray(parts_probe.part_erased_images(batch["filename"], parts_config,
                                                                                   info.image_size)))
        maps = part_metrics.label_maps(np.asarray(cams), labels)
        batches.append(part_metrics.image_records(
            maps, batch["body_mask"], batch["part_mask"], batch["mask"],
            p_image=np.asarray(jax.nn.sigmoid(logits))[rows, classes],
            p_part_erased=np.asarray(jax.nn.sigmoid(erased_logits))[rows, classes]))
        scores.append(np.asarray(logits))
        targets.append(labels)
        if sum(len(m) for m in maps_kept) < keep_maps:
            maps_kept.append(maps)
    records = part_metrics.concatenate_records(batches)
    records.update(scores=np.concatenate(scores), targets=np.concatenate(targets))
    if keep_maps:
        records["maps"] = np.concatenate(maps_kept)[:keep_maps]
    return records


def erased_images(arm: str, seed: int, images: np.ndarray, labels: np.ndarray, args) -> np.ndarray:
    """What the run's attention-mining stream sees: `images` [N,H,W,3] erased by its own soft mask of the label
    class (gain_forward in evaluation mode, the run's erase fill), [N,H,W,3] in the network's normalization."""
    import jax
    import protocol

    import gain_jax as gj
    import gain_jax.data as gd

    config = run_config_of(arm, seed, args)
    model = gj.build_model(config.train.backbone, gd.dataset_info(args.dataset).num_classes, dropout_rate=0.0)
    variables, _ = protocol.restore_run(run_dir(arm, seed, args))
    out = gj.gain_forward(model, variables, jax.numpy.asarray(images), jax.numpy.asarray(labels), config.gain,
                          train=False, attention_mining=False)
    return np.asarray(out.masked_images)[:, 0]  # union mode: one erased image per image


def reference_records(source, args, dataset: str | None = None) -> dict:
    """{reference: image_records} of the maps that know the masks on `source` (a split's name or batches,
    `batches_of`): part-only (pixels, 8- and 4-px cells) and the whole object."""
    totals = {"part_only_pixels": [], **{f"part_only_grid{cell}": [] for cell in parts_probe.GRID_CELLS},
              "whole_object": []}
    for batch in batches_of(source, args, dataset):
        body, part, gt = (np.asarray(batch[key]) for key in ("body_mask", "part_mask", "mask"))
        for name in totals:
            if name == "whole_object":
                maps = ((body | part) > 0).astype(np.float32)
            else:
                maps = part_metrics.part_only_maps(part, None if name == "part_only_pixels" else
                                                   int(name[len("part_only_grid"):]))
            totals[name].append(part_metrics.image_records(maps, body, part, gt))
    return {name: part_metrics.concatenate_records(batches) for name, batches in totals.items()}


def summarize(records: dict, rows=None) -> dict:
    """part_metrics' summary of the records (of `rows`), with mAP when the records have scores."""
    from gain_jax import metrics

    summary = part_metrics.summarize_records(records, rows=rows)
    if "scores" in records:
        rows = slice(None) if rows is None else rows
        summary["mAP"] = metrics.mean_average_precision(records["scores"][rows], records["targets"][rows])
    area = records["part_pixels"].sum() / max(int(records["part_pixels"].sum() + records["body_pixels"].sum()), 1)
    summary["part_area_share"] = float(area)
    # what separates a part-centred map from a body-covering one where body share cannot (the blur around the part
    # lies on the body: experiments/results/parts_probe/fine_grid/README.md)
    summary["body_recall@0.5"] = summary["body_recall"][0.5]
    return summary


def flat(summary: dict) -> dict:
    """The summary's numbers (recall dicts left out)."""
    return {key: value for key, value in summary.items() if not isinstance(value, dict)}


def table(rows: dict, keys=MEASURES, first: str = "map") -> str:
    """A Markdown table, a line per {name: row}; numbers to 3 decimals, counts (int) as they are."""
    lines = [f"| {first} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in rows.items():
        cells = ["" if row.get(key) is None else str(row[key]) if isinstance(row[key], int) else f"{row[key]:.3f}"
                 for key in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- commands

def train_main(args) -> int:
    print(f"parts_study {args.name}: {len(args.arms)} arms x seeds {args.seeds} on {args.dataset} "
          f"{data_version()}, {args.backbone}, budget {args.budget}; {biased_shapes.machine_line()}", flush=True)
    seconds = ensure_runs(args.arms, args, retrain=not args.reuse)
    lines = ["| arm | seed | validation mAP (train loop) | wall s |", "|---|---|---|---|"]
    for (arm, seed), wall in seconds.items():
        value = finished(arm, seed, args)["final"]["validation"]["mAP"]
        lines.append(f"| {arm} | {seed} | {value:.3f} | {'reused' if wall is None else f'{wall:.0f}'} |")
    if args.together:
        lines.append("\n(--together: each arm's seeds trained as one seed sweep; a run's wall s is the sweep's "
                     "divided by its runs)")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.train.md"), "w") as handle:
        handle.write(f"{args.dataset} {data_version()}, {args.backbone}, budget {args.budget}, seeds {args.seeds}\n\n"
                     f"{text}\n")
    return 0


def family_of(config) -> str | None:
    gain = config.gain
    if gain.am_weight > 0 and gain.ex_weight == 0:
        return "GAIN (self-guided)"
    if gain.am_weight > 0 and gain.ex_weight > 0 and config.data.ex_fraction <= 0.1:
        return "GAIN_ext (<= 10% masks)"
    return None


def selection_path(args) -> str:
    return os.path.join(args.out, f"{args.name}.selection.json")


def select_main(args) -> int:
    existing_runs(args.arms, args, "select")
    per_run = {}
    for arm in args.arms:
        for seed in args.seeds:
            per_run[(arm, seed)] = flat(summarize(evaluate_run(arm, seed, "validation", args)))
            print(f"  {arm} seed {seed}: " + ", ".join(f"{k} {per_run[(arm, seed)][k]:.3f}" for k in MEASURES),
                  flush=True)

    def mean(arm, key):
        return float(np.mean([per_run[(arm, seed)][key] for seed in args.seeds]))

    families = {arm: family_of(run_config_of(arm, args.seeds[0], args)) for arm in args.arms}
    choices = {}
    for target in TARGETS:
        if target.family.startswith("same as "):
            chosen = choices[target.family[len("same as "):]]["arm"]
            candidates = [chosen] if chosen else []
        else:
            candidates = [arm for arm in args.arms if families[arm] == target.family
                          and mean(arm, "mAP") >= mean(BASELINE_ARM, "mAP") - MAP_TOLERANCE]
        values = {arm: mean(arm, target.choose_on) for arm in candidates}
        arm = max(candidates, key=lambda a: values[a]) if candidates else None
        choices[target.name] = {"claim": target.claim, "family": target.family, "arm": arm, "candidates": values,
                                "baseline_value": mean(BASELINE_ARM, target.choose_on),
                                "measure": list(target.measure), "margin": target.margin}
        print(f"  target {target.name}: {arm or 'no eligible arm'}", flush=True)
    record = {"study": args.name, "gain_parts_version": data_version(), "dataset": args.dataset, "arms": args.arms,
              "seeds": args.seeds, "budget": args.budget, "rule": SELECTION_RULE, "targets": choices,
              "train_commands": {run_name(a, s, args): shlex.join(["python", "train.py"] + run_flags(a, s, args))
                                 for a in args.arms for s in args.seeds},
              "validation": {run_name(a, s, args): {"arm": a, "seed": s, **v} for (a, s), v in per_run.items()}}
    os.makedirs(args.out, exist_ok=True)
    with open(selection_path(args), "w") as handle:
        json.dump(record, handle, indent=1)
    print(f"selection: {selection_path(args)} (commit it before running `test`)")
    return 0


def read_selection(args, command: str) -> dict:
    path = selection_path(args)
    if not os.path.isfile(path):
        raise SystemExit(f"parts_study {command}: no selection file {path}: run `select` first (choose on "
                         "validation, then look at test once)")
    with open(path) as handle:
        selection = json.load(handle)
    made_for = (selection["arms"], selection["seeds"], selection["gain_parts_version"], selection["dataset"])
    if made_for != (args.arms, args.seeds, data_version(), args.dataset):
        raise SystemExit(f"parts_study {command}: {path} was made for arms, seeds, gain_parts version, data set "
                         f"{made_for}, not these")
    return selection


def ceiling_arms(args) -> list[str]:
    return [arm for arm in args.arms if run_config_of(arm, args.seeds[0], args).data.ex_fraction == 1
            and run_config_of(arm, args.seeds[0], args).gain.ex_weight > 0]


def chosen_arms(args, selection: dict) -> list[str]:
    """The arms `test` and `heldout` evaluate: the baseline, the arms the selection chose, the ceilings."""
    chosen = {t["arm"] for t in selection["targets"].values() if t["arm"]}
    return [arm for arm in args.arms if arm == BASELINE_ARM or arm in chosen or arm in ceiling_arms(args)]


def evaluate_chosen(args, selection: dict, source, images: str, note: str = "") -> tuple[dict, str]:
    """`chosen_arms` evaluated on `source` (a split's name or batches, `batches_of`), every seed: per target the arm -
    baseline differences paired by seed with a 95% t-interval and its verdict, per arm 95% bootstrap intervals over
    the images, the means over seeds and the reference maps. Returns (record, Markdown text); `images` names the
    images in the text ("test"), `note` is a paragraph after its first line."""
    from gain_jax import stats

    arms = chosen_arms(args, selection)
    records = {(arm, seed): evaluate_run(arm, seed, source, args) for arm in arms for seed in args.seeds}
    per_run = {key: flat(summarize(rec)) for key, rec in records.items()}
    lines, verdicts = [], {}
    for name, target in selection["targets"].items():
        arm = target["arm"]
        if arm is None:
            lines.append(f"| {target['claim']} | none eligible | | |")
            continue
        _, measure = target["measure"]
        differences = stats.paired_differences({s: per_run[(arm, s)][measure] for s in args.seeds},
                                               {s: per_run[(BASELINE_ARM, s)][measure] for s in args.seeds})
        verdict = stats.target_verdict(differences, target["margin"]) if len(args.seeds) > 1 else {
            "verdict": "undecided (one seed: no interval)", "mean": float(differences[0])}
        verdicts[name] = {"claim": target["claim"], "arm": arm, **verdict}
        interval = biased_shapes._interval_text(verdict) if "low" in verdict else f"{verdict['mean']:+.3f}"
        lines.append(f"| {target['claim']} | {arm} | {interval} | {verdict['verdict']} |")
    num_images = len(records[(BASELINE_ARM, args.seeds[0])]["scores"])
    bootstrap = {}
    for arm in arms:  # the mean over the seeds, the same images resampled for every seed
        bootstrap[arm] = {}
        for measure in BOOTSTRAP_MEASURES:
            def mean_over_seeds(rows, arm=arm, measure=measure):
                return float(np.mean([summarize(records[(arm, s)], rows)[measure] for s in args.seeds]))

            def difference(rows, arm=arm, measure=measure):
                return float(np.mean([summarize(records[(arm, s)], rows)[measure]
                                      - summarize(records[(BASELINE_ARM, s)], rows)[measure] for s in args.seeds]))
            bootstrap[arm][measure] = stats.bootstrap_interval(mean_over_seeds, num_images, seed=0,
                                                               resamples=BOOTSTRAP_RESAMPLES).as_dict()
            if arm != BASELINE_ARM:
                bootstrap[arm][f"{measure} - baseline"] = stats.bootstrap_interval(
                    difference, num_images, seed=0, resamples=BOOTSTRAP_RESAMPLES).as_dict()
    references = {name: flat(summarize(rec)) for name, rec in reference_records(source, args).items()}
    means = {arm: {key: float(np.mean([per_run[(arm, s)][key] for s in args.seeds])) for key in MEASURES}
             for arm in arms}
    boot_lines = [f"| {arm} | {measure} | {b['mean']:.3f} [{b['low']:.3f}, {b['high']:.3f}] |"
                  for arm in arms for measure, b in bootstrap[arm].items()]
    text = (f"{args.dataset} {data_version()}, {args.backbone}, study {args.name}, budget {args.budget}, {images} "
            f"({num_images} images), seeds {args.seeds}; arms chosen on validation "
            f"({os.path.basename(selection_path(args))})\n\n" + (f"{note}\n\n" if note else "")
            + "| target | arm | arm - baseline, paired by seed: mean [95% t-interval] | verdict |\n|---|---|---|---|\n"
            + "\n".join(lines) + "\n\n'met' only when the interval's lower bound clears the margin.\n\n"
            f"| arm | measure (mean over seeds) | 95% bootstrap interval over {images} images |\n|---|---|---|\n"
            + "\n".join(boot_lines) + "\n\nmeans over seeds, and the reference maps\n\n"
            + table({**means, **references}))
    record = {"selection": os.path.basename(selection_path(args)), "verdicts": verdicts, "bootstrap": bootstrap,
              "references": references,
              "per_run": {run_name(a, s, args): {"arm": a, "seed": s, **v} for (a, s), v in per_run.items()}}
    return record, text


def test_main(args) -> int:
    selection = read_selection(args, "test")
    existing_runs(args.arms, args, "test")
    record, text = evaluate_chosen(args, selection, "test", "test")
    write_result(args.out, f"{args.name}.test", record, text)
    return 0


def heldout_main(args) -> int:
    """The test's evaluation again, after it, on images no split holds: --heldout_images of the held-out stream of
    --heldout_seed, generated now from the seed (`heldout_batches`); <out>/<name>.heldout.{json,md}."""
    from gain_jax.data import parts

    selection = read_selection(args, "heldout")
    tested = os.path.join(args.out, f"{args.name}.test.json")
    try:
        with open(tested) as handle:
            tested_runs = set(json.load(handle)["per_run"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise SystemExit(f"parts_study heldout: no test result {tested} (or unreadable): run `test` first (the "
                         "held-out check comes after test)") from None
    arms = chosen_arms(args, selection)
    runs = {run_name(arm, seed, args) for arm in arms for seed in args.seeds}
    if tested_runs != runs:
        raise SystemExit(f"parts_study heldout: {tested} holds the runs {sorted(tested_runs)}, not these: "
                         f"{sorted(runs)}")
    existing_runs(args.arms, args, "heldout")
    stream = parts.heldout_split(args.heldout_seed)
    note = (f"Held-out images: indices 0-{args.heldout_images - 1} of gain_parts' held-out stream {stream} of "
            f"{config_name(args.dataset)} (--heldout_seed {args.heldout_seed}), generated at evaluation time from the "
            "seed by the data set's generator and stored nowhere (no split holds them). The targets' claims say "
            "test, as registered: here they are checked on these images. The same runs' test result: "
            f"{os.path.basename(tested)}.")
    record, text = evaluate_chosen(args, selection, heldout_batches(args), "held-out", note)
    record = {"heldout": {"seed": args.heldout_seed, "stream": stream, "images": args.heldout_images,
                          "dataset": args.dataset, "gain_parts_version": data_version(), "arms": arms,
                          "test_result": os.path.basename(tested), "note": note}, **record}
    write_result(args.out, f"{args.name}.heldout", record, text)
    return 0


DOSE_KEYS = ("part_fraction", "body_reliability", "part_area_share", "body_share", "part_share",
             "part_share_over_area", "body_recall@0.5", "pxap", "mAP", "p_kept_without_part")


def grid_floor(args) -> str:
    """The part-only reference at the backbone's Grad-CAM cells (gain_parts' 112 px)."""
    from gain_jax.data import parts
    from gain_jax.models import cam_layer_size

    return f"part_only_grid{parts.IMAGE_SIZE // cam_layer_size(args.backbone, parts.IMAGE_SIZE)}"


def dose_main(args) -> int:
    """Train (or reuse) --dose_arms on each config, evaluate on validation: body coverage against the part's
    size and the body's reliability."""
    from gain_jax.data import parts

    rows, started = [], time.time()
    for config in args.configs:
        dataset = f"gain_parts/{config}"
        ensure_runs(args.dose_arms, args, dataset)
        references = reference_records("validation", args, dataset)
        part_config = next(c for c in parts.BUILDER_CONFIGS if c.name == config)
        for arm in [*args.dose_arms, grid_floor(args), "whole_object"]:
            if arm in references:
                summaries = [flat(summarize(references[arm]))]
            else:
                summaries = [flat(summarize(evaluate_run(arm, seed, "validation", args, dataset)))
                             for seed in args.seeds]
            row = {key: float(np.mean([s[key] for s in summaries])) for key in summaries[0]}
            row.update(config=config, arm=arm, part_fraction=part_config.part_fraction,
                       body_reliability=part_config.body_reliability,
                       part_share_over_area=row["part_share"] / row["part_area_share"])
            rows.append(row)
            print(f"  {config} {arm}: body share {row['body_share']:.3f}, part share {row['part_share']:.3f} "
                  f"({row['part_share_over_area']:.1f}x its area share {row['part_area_share']:.3f}), PxAP "
                  f"{row['pxap']:.3f}", flush=True)
    lines = ["| config | arm | " + " | ".join(DOSE_KEYS) + " |", "|---" * (len(DOSE_KEYS) + 2) + "|"]
    lines += [f"| {row['config']} | {row['arm']} | " + " | ".join(
        "" if row.get(key) is None else f"{row[key]:.3f}" for key in DOSE_KEYS) + " |" for row in rows]
    text = (f"gain_parts {data_version()} dose-response, {args.backbone}, budget {args.budget}, seeds {args.seeds}, "
            f"validation; means over seeds; part_share_over_area: part share / the part's share of the object's "
            f"area (1: no preference for the part). {(time.time() - started) / 60:.1f} min.\n\n" + "\n".join(lines))
    write_result(args.out, "dose", {"settings": {k: v for k, v in vars(args).items() if k != "arm_flags"},
                                    "rows": rows}, text)
    return 0


def write_result(out: str, stem: str, record: dict, text: str) -> None:
    """Print the table and write it to <out>/<stem>.md, the record to <out>/<stem>.json."""
    print(text)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as handle:
        handle.write(text + "\n")


def dose_figure(rows: list, path: str) -> None:
    """Body share and whole-object PxAP against the part-to-body area ratio (top row, a line per body reliability)
    and against the body's reliability (bottom row, a line per part size), a colour per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(row["arm"] for row in rows))
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=80)
    colours = matplotlib.colormaps["tab10"]
    styles = ["-", "--", ":", "-."]
    sweeps = (  # (x of a row, what a line holds fixed, the row's axes, the x label)
        (lambda row: row["part_area_share"] / (1 - row["part_area_share"]), "body_reliability", axes[0],
         "part / body area (a line style per body reliability)"),
        (lambda row: row["body_reliability"], "part_fraction", axes[1],
         "body reliability (a line style per part size)"))
    for x_of, fixed, row_axes, x_label in sweeps:
        levels = sorted({row[fixed] for row in rows})
        for index, arm in enumerate(arms):
            label = arm  # on the arm's first line drawn, whichever level that is
            for k, level in enumerate(levels):
                points = sorted((x_of(row), row["body_share"], row["pxap"])
                                for row in rows if row["arm"] == arm and row[fixed] == level)
                if not points:
                    continue
                x, body, pxap = zip(*points)
                row_axes[0].plot(x, body, styles[k % 4], marker="o", color=colours(index % 10), label=label)
                row_axes[1].plot(x, pxap, styles[k % 4], marker="o", color=colours(index % 10), label=label)
                label = None
        for axis, title in zip(row_axes, ("body share (CAM mass on the body)", "whole-object PxAP")):
            axis.set_xlabel(x_label, fontsize=8)
            axis.set_title(title, fontsize=9)
            axis.set_ylim(0, 1.02)
    axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def figure_main(args) -> int:
    if args.split == "test":
        read_selection(args, "figure")  # test images only once the choice is recorded
    existing_runs(args.arms, args, "figure")
    os.makedirs(args.out, exist_ok=True)
    seed = args.seeds[0]
    figure = {}
    for arm in args.arms:
        figure[arm] = evaluate_run(arm, seed, args.split, args, keep_maps=args.figure_images)["maps"]
    batch = next(iter(split_batches(args.split, args)))
    figure["images"] = np.asarray(batch["image"])[:args.figure_images]
    figure["masks"] = (np.asarray(batch["body_mask"]) + 2 * np.asarray(batch["part_mask"]))[:args.figure_images]
    erased = {}
    for arm in args.arms:
        if run_config_of(arm, seed, args).gain.am_weight > 0:
            erased[arm] = erased_images(arm, seed, figure["images"], np.asarray(batch["labels"])[:args.figure_images],
                                        args)
    path = os.path.join(args.out, f"{args.name}.{args.split}.png")
    parts_probe.save_figure(path, figure, args.arms, erased=erased)
    print(f"figure: {path}")
    dose_path = os.path.join(args.out, "dose.json")
    if os.path.isfile(dose_path):
        with open(dose_path) as handle:
            dose_figure(json.load(handle)["rows"], os.path.join(args.out, "dose.png"))
        print(f"figure: {os.path.join(args.out, 'dose.png')}")
    return 0


def curves_main(args) -> int:
    """Per epoch, each arm's training losses and validation figures from its runs' records, mean over the seeds:
    did L_am fall, and did the maps move while it did? Reads no split."""
    import train_curves

    existing_runs(args.arms, args, "curves")
    tables = []
    for arm in args.arms:
        histories = []
        for seed in args.seeds:
            with open(os.path.join(run_dir(arm, seed, args), "metrics.json")) as handle:
                histories.append(json.load(handle))
        tables.append(train_curves.table(arm, histories))
    text = (f"{args.dataset} {data_version()}, {args.backbone}, study {args.name}, budget {args.budget}, seeds "
            f"{args.seeds}: training losses (unweighted; in the epochs where L_am weighs 0 it is computed by runs "
            "trained before the loop left the attention-mining stream out of them, nan in later ones) and the "
            "train loop's validation figures per epoch\n\n" + "\n\n".join(tables))
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.curves.md"), "w") as handle:
        handle.write(text + "\n")
    return 0


def calibration_args(args, epochs_factor: int, ex_weight: float, name: str, arm: str) -> argparse.Namespace:
    """The study's settings with the budget's epochs times `epochs_factor` and the mask loss's weight; each arm's
    runs in their own folder under <logdir>/calibration (the baseline's shared by the settings of one length, which
    do not change it)."""
    epochs = args.epochs * epochs_factor
    folder = f"epochs{epochs}" if arm == BASELINE_ARM else name
    return argparse.Namespace(**{**vars(args), "epochs": epochs, "ex_weight": ex_weight,
                                 "logdir": os.path.join(args.logdir, "calibration", folder)})


def calibrate_main(args) -> int:
    """Train the baseline and the ceiling (every mask) under CALIBRATION_SETTINGS, cheapest first, on validation
    only, until the ceiling's PxAP clears the baseline's by CEILING_MARGIN: the setting where the benchmark has room
    for the study's targets. Writes <out>/calibration.{json,md}; the study is then run at the chosen setting."""
    rows, chosen, started = [], None, time.time()
    evaluated = {}  # run folder -> its seeds' validation summaries: the baseline's serves both weights of a length
    for name, (epochs_factor, ex_weight) in CALIBRATION_SETTINGS.items():
        row = {"setting": name, "epochs": args.epochs * epochs_factor, "steps": args.epochs * epochs_factor
               * args.steps_per_epoch, "ex_weight": ex_weight}
        for arm in (BASELINE_ARM, CEILING_ARM):
            arm_args = calibration_args(args, epochs_factor, ex_weight, name, arm)
            ensure_runs([arm], arm_args)
            if arm_args.logdir not in evaluated:
                evaluated[arm_args.logdir] = [flat(summarize(evaluate_run(arm, seed, "validation", arm_args)))
                                              for seed in args.seeds]
            summaries = evaluated[arm_args.logdir]
            for key in ("pxap", "body_share", "body_recall@0.5", "mAP"):
                row[f"{arm} {key}"] = float(np.mean([summary[key] for summary in summaries]))
        row["headroom"] = row[f"{CEILING_ARM} pxap"] - row[f"{BASELINE_ARM} pxap"]
        rows.append(row)
        print(f"  {name}: ceiling PxAP {row[f'{CEILING_ARM} pxap']:.3f} - baseline {row[f'{BASELINE_ARM} pxap']:.3f}"
              f" = {row['headroom']:+.3f} (needed {CEILING_MARGIN:+.2f})", flush=True)
        if row["headroom"] >= CEILING_MARGIN:
            chosen = name
            break
    verdict = (f"chosen: {chosen} (the cheapest setting whose ceiling clears the baseline's validation PxAP by "
               f"{CEILING_MARGIN:+.2f})" if chosen else
               f"no setting's ceiling clears the baseline's validation PxAP by {CEILING_MARGIN:+.2f}")
    text = (f"{args.dataset} {data_version()}, {args.backbone}, calibration of the ceiling ({CEILING_ARM}) against "
            f"the baseline, budget {args.budget}, seeds {args.seeds}, validation; {verdict}. "
            f"{(time.time() - started) / 60:.1f} min.\n\n"
            + table({row["setting"]: row for row in rows}, [key for key in rows[0] if key != "setting"], "setting"))
    write_result(args.out, "calibration", {"dataset": args.dataset, "gain_parts_version": data_version(),
                                           "budget": args.budget, "seeds": args.seeds, "margin": CEILING_MARGIN,
                                           "chosen": chosen, "rows": rows}, text)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    command = {"train": train_main, "select": select_main, "test": test_main, "heldout": heldout_main,
               "dose": dose_main, "figure": figure_main, "curves": curves_main,
               "calibrate": calibrate_main}[args.command]
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
