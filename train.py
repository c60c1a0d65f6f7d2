#!/usr/bin/env python
"""Train GAIN (Guided Attention Inference Network) with gain_jax.

    python train.py                          # GAIN on the embedded gain_shapes set, small_cnn, a few minutes on CPU
    python train.py --dataset gain_voc2012 --manual_dir ~/VOC --backbone vgg19 --init vgg19-dcbb9e9d.pth \
        --image_size 224 --batch_size 8 --lr 1e-4 --epochs 50 --pretrain_epochs 5

Every flag is listed by `python train.py --help` and in docs/train.md. A run writes, under
<logdir>/<run_name>/: config.json, metrics.json (per-step losses, per-epoch evaluations, final results),
TensorBoard events, heatmaps/*.png and (by default) checkpoints/.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import sys
import time
import zlib

import numpy as np

# splits evaluated at the end of a run (validation is also evaluated after every epoch)
FINAL_SPLITS = {"gain_shapes": ("validation", "test_unbiased"), "gain_voc2012": ("validation",)}
# A resumed run must rebuild the same model and the same batches.
RESUME_MUST_MATCH = ("dataset", "backbone", "image_size", "batch_size", "mode", "max_labels", "seed", "autoaugment")
EXIT_INTERRUPTED = 130


class RunError(Exception):
    """A clear, one-line reason to stop; main() prints it and exits non-zero."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (the help text then says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="Train GAIN (Guided Attention Inference Network, CVPR 2018) with gain_jax.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="gain_shapes", choices=sorted(FINAL_SPLITS),
                   help="tfds builder: the embedded synthetic set, or VOC 2012 from local files")
    g.add_argument("--data_dir", default=None,
                   help="tfds data dir (must exist; the prepared data set is written there). "
                        "Default: tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR)")
    g.add_argument("--manual_dir", default=None,
                   help="gain_voc2012: folder with VOCtrainval_11-May-2012.tar or VOCdevkit/VOC2012")
    g.add_argument("--image_size", type=int, default=None,
                   help="square input size; default 64 for gain_shapes, 224 for gain_voc2012")
    g.add_argument("--autoaugment", action=argparse.BooleanOptionalAction, default=False,
                   help="AutoAugment (torchvision's CIFAR10 policy, as upstream) + horizontal flip on training images")
    g.add_argument("--ex_fraction", type=float, default=1.0,
                   help="fraction of training images whose masks feed the extra-supervision loss (GAIN_ext); "
                        "selected per image from a hash of (seed, filename), the same in every epoch")

    g = p.add_argument_group("model and optimizer")
    g.add_argument("--backbone", default="small_cnn",
                   help="vgg16, vgg19, resnet18, resnet50 or small_cnn")
    g.add_argument("--dropout", type=float, default=0.5, help="dropout rate of the classifier head (VGG, small_cnn)")
    g.add_argument("--init", default=None, metavar="PTH",
                   help="torchvision state dict (.pth) to start from, e.g. ImageNet VGG19 weights for upstream's "
                        "fine-tuning; a final layer with another class count is re-initialized")
    g.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (upstream: 1e-5 at batch size 1, 1e-4 for larger batches, fine-tuning "
                        "VGG19; the default suits small_cnn from scratch)")
    g.add_argument("--batch_size", type=int, default=32, help="global batch size, split over all devices")
    g.add_argument("--epochs", type=int, default=5, help="epochs in total, pre-training included")
    g.add_argument("--steps_per_epoch", type=int, default=None,
                   help="train steps per epoch; default: one pass over the train split")
    g.add_argument("--pretrain_epochs", type=int, default=2,
                   help="epochs of classification alone before attention mining (and GAIN_ext) switch on")
    g.add_argument("--seed", type=int, default=0, help="seed of initialization, dropout and data order")

    g = p.add_argument_group("GAIN")
    g.add_argument("--mode", default="union", choices=("union", "per_label"),
                   help="union: one attention map per image from all its labels (any batch size); "
                        "per_label: one map per label, up to --max_labels")
    g.add_argument("--max_labels", type=int, default=4, help="label slots per image in per_label mode")
    g.add_argument("--cl_weight", type=float, default=1.0, help="weight of the classification loss")
    g.add_argument("--am_weight", type=float, default=1.0, help="weight of the attention-mining loss (alpha)")
    g.add_argument("--ex_weight", type=float, default=0.0,
                   help="weight of the extra-supervision (mask) loss of GAIN_ext; 0 = off")
    g.add_argument("--sigma", type=float, default=0.5, help="soft-mask threshold")
    g.add_argument("--omega", type=float, default=10.0, help="soft-mask sharpness")
    g.add_argument("--fill", default="0",
                   help="value of the erased region in normalized image space: one number or three, comma separated")
    g.add_argument("--grads_off", action=argparse.BooleanOptionalAction, default=False,
                   help="attention-mining loss reaches the weights only through the mask (no gradient through "
                        "the second forward's weights)")
    g.add_argument("--cam_grad", default="stop", choices=("stop", "full"),
                   help="stop: Grad-CAM channel weights are constants for the loss gradient (upstream); "
                        "full: differentiate through them (second order)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--test_first", action=argparse.BooleanOptionalAction, default=False,
                   help="evaluate on the validation split before training")
    g.add_argument("--eval_examples", type=int, default=0,
                   help="evaluate on the first N examples of each split only (quick runs); 0 = the whole split")
    g.add_argument("--cam_threshold", type=float, default=0.5,
                   help="CAM mIoU: a pixel is background where the largest ground-truth class map is below this")
    g.add_argument("--pointing_tolerance", type=float, default=None,
                   help="pointing game tolerance in input pixels; default 15 px at 224 (the literature's), "
                        "scaled to --image_size")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--logdir", default="runs", help="root of the run folders")
    g.add_argument("--run_name", default=None,
                   help="run folder name under --logdir; default <dataset>_<backbone>_<date-time>")
    g.add_argument("--checkpoint_dir", default=None, help="default: <logdir>/<run_name>/checkpoints")
    g.add_argument("--checkpoint_every", type=int, default=1, help="save a checkpoint every N epochs (and at the end)")
    g.add_argument("--keep", type=int, default=3, help="keep the newest N checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue the run from its newest checkpoint (same --run_name or --checkpoint_dir); "
                        "losses match an uninterrupted run")
    g.add_argument("--stop_after", type=int, default=0,
                   help="save a checkpoint and exit after N train steps of this invocation (time-limited jobs; "
                        "--resume continues); 0 = run to the end")
    g.add_argument("--heatmap_every", type=int, default=0,
                   help="record heatmap grids every N train steps; 0 = at the end of every epoch")
    g.add_argument("--num_heatmaps", type=int, default=8,
                   help="validation images per heatmap grid (at most --batch_size); 0 = none")

    g = p.add_argument_group("multi-host (jax.distributed.initialize)")
    g.add_argument("--coordinator_address", default=None, help="host:port of process 0; set to run multi-host")
    g.add_argument("--num_processes", type=int, default=None, help="number of processes (hosts)")
    g.add_argument("--process_id", type=int, default=None, help="index of this process")
    return p


# ---------------------------------------------------------------------------------------------- checks

def parse_fill(text: str):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise RunError(f"--fill {text!r}: expected one number or three comma-separated numbers") from None
    if len(values) not in (1, 3):
        raise RunError(f"--fill {text!r}: expected one number or three comma-separated numbers")
    return values[0] if len(values) == 1 else tuple(values)


def check_flags(args, model_names, device_count: int, process_count: int) -> None:
    """Everything that can be checked before any file is written."""
    if args.backbone not in model_names:
        raise RunError(f"unknown backbone {args.backbone!r}; choose from {', '.join(model_names)}")
    for flag in ("batch_size", "epochs", "max_labels", "keep", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise RunError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("pretrain_epochs", "heatmap_every", "num_heatmaps", "eval_examples", "stop_after"):
        if getattr(args, flag) < 0:
            raise RunError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        raise RunError(f"--steps_per_epoch must be >= 1, got {args.steps_per_epoch}")
    if args.image_size is not None and args.image_size < 8:
        raise RunError(f"--image_size must be >= 8, got {args.image_size}")
    if not 0.0 <= args.ex_fraction <= 1.0:
        raise RunError(f"--ex_fraction must be in [0, 1], got {args.ex_fraction}")
    if args.batch_size % device_count or args.batch_size % process_count:
        raise RunError(f"--batch_size {args.batch_size} is not divisible by the {device_count} devices "
                       f"(data parallelism splits the batch evenly)")
    if args.num_heatmaps > args.batch_size:
        raise RunError(f"--num_heatmaps {args.num_heatmaps} exceeds --batch_size {args.batch_size}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise RunError(f"data dir {args.data_dir} does not exist (--data_dir)")
    if args.manual_dir is not None and not os.path.isdir(args.manual_dir):
        raise RunError(f"manual dir {args.manual_dir} does not exist (--manual_dir)")
    if args.dataset == "gain_voc2012" and args.manual_dir is None and args.data_dir is None:
        raise RunError("gain_voc2012 needs --manual_dir (the VOC 2012 files) or a --data_dir where it is prepared")
    if args.init is not None and not os.path.isfile(args.init):
        raise RunError(f"--init file {args.init} does not exist")
    if args.resume and args.run_name is None and args.checkpoint_dir is None:
        raise RunError("--resume needs the --run_name (or --checkpoint_dir) of the run to continue")


def load_torch_state_dict(path: str) -> dict:
    """The .pth as numpy arrays. Imports torch, which must happen before TensorFlow is imported."""
    import torch  # noqa: PLC0415 - only with --init, and before gain_jax.data (TensorFlow)

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle, zip or format error: all mean "not a state dict file"
        raise RunError(f"--init file {path} is not a readable torch state dict: {error}".splitlines()[0]) from None
    if not isinstance(loaded, dict) or not all(hasattr(v, "detach") for v in loaded.values()):
        raise RunError(f"--init file {path} holds no state dict (a mapping of parameter names to tensors)")
    return {key: value.detach().cpu().numpy() for key, value in loaded.items()}


# ---------------------------------------------------------------------------------------------- helpers

def write_json_atomic(path: str, payload) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=1, allow_nan=True)
    os.replace(temporary, path)


def selected_for_extra_supervision(filenames, seed: int, fraction: float) -> np.ndarray:
    """Deterministic per-image choice: the same images in every epoch, run and process."""
    if fraction >= 1.0:
        return np.ones(len(filenames), bool)
    hashes = [zlib.crc32(f"{seed}:{name}".encode()) / 2.0 ** 32 for name in filenames]
    return np.asarray(hashes) < fraction


def as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def mean_or_nan(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks between steps, so the state is never caught mid-update
    (the train step donates its input state); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal_name = None

    def __call__(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def install(self):
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


# ---------------------------------------------------------------------------------------------- the run

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except RunError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train.py: interrupted before training started; nothing saved", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(args) -> int:
    import jax  # noqa: PLC0415

    if args.coordinator_address:
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.num_processes not in (None, 1):
        raise RunError("--num_processes > 1 needs --coordinator_address")
    if jax.process_count() > 1 and args.run_name is None:
        raise RunError("multi-host runs need an explicit --run_name (every process must write to the same run)")

    import gain_jax as gj  # noqa: PLC0415
    from gain_jax.models import MODEL_NAMES  # noqa: PLC0415

    check_flags(args, MODEL_NAMES, jax.device_count(), jax.process_count())
    try:
        gain_cfg = gj.GainConfig(mode=args.mode, sigma=args.sigma, omega=args.omega, fill=parse_fill(args.fill),
                                 cam_grad=args.cam_grad, grads_off=args.grads_off, max_labels=args.max_labels,
                                 cl_weight=args.cl_weight, am_weight=args.am_weight, ex_weight=args.ex_weight)
    except ValueError as error:
        raise RunError(str(error)) from None
    # torch before TensorFlow (gain_jax.data): the other order segfaults with these wheels
    torch_state_dict = load_torch_state_dict(args.init) if args.init else None
    return Trainer(args, gain_cfg, torch_state_dict).train()


class Trainer:
    """One training run: data, model, state, logs, checkpoints. Built only after the flags are checked."""

    def __init__(self, args, gain_cfg, torch_state_dict):
        import jax  # noqa: PLC0415
        import optax  # noqa: PLC0415
        from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: PLC0415

        import gain_jax as gj  # noqa: PLC0415
        import gain_jax.data as gd  # noqa: PLC0415 - TensorFlow: after torch
        from gain_jax import checkpoint  # noqa: PLC0415

        self.jax, self.gj, self.gd, self.checkpoint = jax, gj, gd, checkpoint
        self.args, self.gain_cfg = args, gain_cfg
        self.is_main = jax.process_index() == 0
        self.started = time.time()

        # data set facts; preparing the tfds set (a build on first use) also checks the VOC files
        info = gd.dataset_info(args.dataset)
        self.class_names = list(info.class_names)
        self.num_classes = info.num_classes
        if args.image_size is None:
            args.image_size = info.image_size
        self.split_sizes = self.prepare_dataset()
        if args.steps_per_epoch is None:
            args.steps_per_epoch = max(1, self.split_sizes["train"] // args.batch_size)
        self.pointing_tolerance = (args.pointing_tolerance if args.pointing_tolerance is not None
                                   else round(15 * args.image_size / 224))

        # model and initial variables
        self.model = gj.build_model(args.backbone, num_classes=self.num_classes, dropout_rate=args.dropout)
        root_key = jax.random.PRNGKey(args.seed)
        init_key, head_key, self.dropout_key = jax.random.split(root_key, 3)
        if torch_state_dict is not None:
            try:
                variables = gj.from_torchvision(args.backbone, torch_state_dict, self.num_classes, rng=head_key)
            except ValueError as error:
                raise RunError(f"--init file {args.init} does not fit backbone {args.backbone}: {error}") from None
        else:
            dummy = np.zeros((1, args.image_size, args.image_size, 3), np.float32)
            variables = jax.jit(lambda key: self.model.init(key, dummy, train=False))(init_key)
        self.tx = optax.adam(args.lr)

        # data parallelism: the batch is split over every device of every process, the state replicated
        self.mesh = Mesh(np.asarray(jax.devices()), ("batch",))
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.state = jax.device_put(gj.create_train_state(variables, self.tx), self.replicated)
        self.train_step = gj.make_train_step(self.model, gain_cfg)
        self.eval_step = gj.make_eval_step(self.model, gain_cfg)

        # run folders; a fresh run refuses a checkpoint dir that already holds checkpoints
        if args.run_name is None:
            args.run_name = f"{args.dataset}_{args.backbone}_{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = os.path.join(args.logdir, args.run_name)
        self.checkpoint_dir = args.checkpoint_dir or os.path.join(self.run_dir, "checkpoints")
        self.heatmap_dir = os.path.join(self.run_dir, "heatmaps")
        self.metrics_path = os.path.join(self.run_dir, "metrics.json")
        if not args.resume and os.path.isdir(self.checkpoint_dir) and any(
                name.isdigit() for name in os.listdir(self.checkpoint_dir)):
            raise RunError(f"checkpoint dir {self.checkpoint_dir} already holds checkpoints: pass --resume to "
                           f"continue that run, or choose another --run_name / --checkpoint_dir")
        self.config = self.make_config()
        self.history = {"steps": [], "epochs": []}
        self.start_epoch, self.start_step_in_epoch, self.global_step = 0, 0, 0

        self.manager = checkpoint.open_manager(self.checkpoint_dir, max_to_keep=args.keep)
        if args.resume:
            self.restore()
        if self.is_main:
            os.makedirs(self.heatmap_dir, exist_ok=True)
            write_json_atomic(os.path.join(self.run_dir, "config.json"), self.config)
        self.writer = self.open_writer()
        self.heatmap_batch = None

    # ------------------------------------------------------------------ setup pieces

    def make_config(self) -> dict:
        jax = self.jax
        config = {key: value for key, value in vars(self.args).items()
                  if key not in ("coordinator_address", "process_id", "resume", "stop_after")}
        config.update(num_classes=self.num_classes, class_names=self.class_names, device_count=jax.device_count(),
                      process_count=jax.process_count(), pointing_tolerance_px=self.pointing_tolerance,
                      image_mean=list(self.gd.IMAGENET_MEAN), image_std=list(self.gd.IMAGENET_STD))
        return config

    def open_writer(self):
        if not self.is_main:
            return None
        import tensorflow as tf  # noqa: PLC0415 - already loaded by gain_jax.data

        return tf.summary.create_file_writer(self.run_dir)

    def restore(self) -> None:
        step = self.manager.latest_step()
        if step is None:
            print(f"--resume: no checkpoint in {self.checkpoint_dir}; starting from scratch", flush=True)
            return
        meta = self.checkpoint.read_meta(self.manager, step)
        saved = meta.get("config", {})
        for key in RESUME_MUST_MATCH:
            if key in saved and saved[key] != self.config[key]:
                raise RunError(f"--resume: checkpoint {self.checkpoint_dir} was trained with --{key} "
                               f"{saved[key]!r}, this run has {self.config[key]!r}")
        self.state, meta = self.checkpoint.restore(self.manager, step, self.state)
        self.start_epoch = int(meta["epoch"])
        self.start_step_in_epoch = int(meta["step_in_epoch"])
        self.global_step = int(meta["global_step"])
        self.dropout_key = self.checkpoint.key_from_json(meta["dropout_key"])
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path) as handle:
                previous = json.load(handle)
            # records past the checkpoint belong to steps the resumed run repeats
            self.history["steps"] = [r for r in previous.get("steps", []) if r["step"] <= self.global_step]
            self.history["epochs"] = [r for r in previous.get("epochs", []) if r["epoch"] <= self.start_epoch]
        print(f"resumed {self.checkpoint_dir} at step {self.global_step} (epoch {self.start_epoch + 1}, "
              f"{self.start_step_in_epoch} steps into it)", flush=True)

    def save(self, epoch: int, step_in_epoch: int) -> None:
        """Checkpoint the state after `step_in_epoch` steps of epoch index `epoch` (0-based)."""
        if self.manager.latest_step() == self.global_step:
            return  # this very state is saved already (e.g. stopped right after an epoch's checkpoint)
        meta = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": self.global_step,
                "dropout_key": self.checkpoint.key_to_json(self.dropout_key), "config": self.config}
        self.checkpoint.save(self.manager, self.global_step, self.state, meta)

    # ------------------------------------------------------------------ data

    def prepare_dataset(self) -> dict:
        """Build the tfds set if needed; {split: number of examples}."""
        import tensorflow_datasets as tfds  # noqa: PLC0415

        args = self.args
        try:
            self.gd.make_dataset(args.dataset, "train", data_dir=args.data_dir, manual_dir=args.manual_dir,
                                 batch_size=1, train=False)
        except (FileNotFoundError, ValueError) as error:
            raise RunError(str(error).splitlines()[0]) from None
        splits = tfds.builder(args.dataset, data_dir=args.data_dir).info.splits
        return {name: splits[name].num_examples for name in splits.keys()}

    def pipeline(self, split: str, train: bool, seed: int):
        """Training: this process's share of the split, in batches of its share of the global batch.
        Evaluation: every process reads the whole split in global batches (see `to_device`)."""
        args, jax = self.args, self.jax
        sharding = {} if train else {"process_index": 0, "process_count": 1}
        batch_size = args.batch_size // jax.process_count() if train else args.batch_size
        return self.gd.input_pipeline(args.dataset, split, data_dir=args.data_dir, manual_dir=args.manual_dir,
                                      image_size=args.image_size, batch_size=batch_size, train=train,
                                      seed=seed, autoaugment=args.autoaugment and train, **sharding)

    def train_batches(self, epoch: int, skip: int):
        """The epoch's batches (an endless stream), re-created from seed + epoch so that a resumed run
        sees the same ones after skipping those already trained on."""
        return itertools.islice(self.pipeline("train", train=True, seed=self.args.seed + epoch), skip, None)

    def to_device(self, batch: dict, global_rows: bool = False) -> dict:
        """Host batch -> global arrays sharded over the batch axis. A training batch holds this process's
        rows; an evaluation batch (`global_rows`) holds every row, and each process gives its slice."""
        jax = self.jax
        count, index = jax.process_count(), jax.process_index()
        device_batch = {}
        for key in ("image", "labels", "mask", "has_mask"):
            rows = np.asarray(batch[key])
            if global_rows and count > 1:
                per_process = rows.shape[0] // count
                rows = rows[index * per_process:(index + 1) * per_process]
            device_batch[key] = jax.make_array_from_process_local_data(self.batch_sharding, rows)
        return device_batch

    def local_rows(self, array) -> np.ndarray:
        """This process's rows of a batch-sharded global array (all rows with one process)."""
        if self.jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            array = multihost_utils.global_array_to_host_local_array(array, self.mesh, self.batch_sharding.spec)
        return np.asarray(array)

    def to_host(self, array) -> np.ndarray:
        if self.jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            return np.asarray(multihost_utils.process_allgather(array, tiled=True))
        return np.asarray(array)

    def prepare_train_batch(self, batch: dict) -> dict:
        filenames = [as_text(name) for name in batch["filename"]]
        if self.gain_cfg.mode == "per_label":
            try:
                self.gj.check_max_labels(np.asarray(batch["labels"]), self.gain_cfg.max_labels, filenames)
            except ValueError as error:
                raise RunError(f"{error} (--max_labels)") from None
        batch = dict(batch)
        selected = selected_for_extra_supervision(filenames, self.args.seed, self.args.ex_fraction)
        batch["has_mask"] = np.asarray(batch["has_mask"], bool) & selected
        return batch

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, split: str, stop: StopRequest | None = None) -> dict | None:
        """Loss terms, mAP, top-k accuracy, CAM mIoU and pointing game over a split (None if stopped)."""
        from tqdm import tqdm  # noqa: PLC0415

        from gain_jax import metrics  # noqa: PLC0415

        device_count = self.jax.device_count()
        term_sums = dict.fromkeys(("loss", "cl", "am", "ex"), 0.0)
        scores, targets = [], []
        intersection = union = 0
        hits = trials = 0
        num_examples = 0
        size = self.split_sizes[split]
        if self.args.eval_examples:
            size = min(size, self.args.eval_examples)
        batches = tqdm(self.pipeline(f"{split}[:{size}]", train=False, seed=0), desc=f"eval {split}",
                       leave=False, total=math.ceil(size / self.args.batch_size), disable=not self.is_main)
        for batch in batches:
            if stop is not None and stop.signal_name:
                return None
            valid = len(batch["labels"])
            # The last batch runs at its own size (one more compile, exact means), rounded up to a device
            # multiple with copies of its last row when several devices share it.
            padded_size = -(-valid // device_count) * device_count
            if padded_size != valid:
                batch = {key: np.concatenate([value, np.repeat(value[-1:], padded_size - valid, axis=0)])
                         for key, value in batch.items()}
            out = self.eval_step(self.state, self.to_device(batch, global_rows=True))
            for key in term_sums:
                term_sums[key] += float(out[key]) * valid
            logits = self.to_host(out["logits"])[:valid]
            labels = np.asarray(batch["labels"])[:valid]
            scores.append(logits)
            targets.append(labels)
            num_examples += valid
            with_mask = np.asarray(batch["has_mask"], bool)[:valid]
            if with_mask.any():
                cams = self.to_host(out["class_cams"])[:valid][with_mask]
                gt_masks = np.asarray(batch["mask"])[:valid][with_mask]
                predicted = metrics.cam_segmentation(cams, labels[with_mask], self.args.cam_threshold)
                batch_intersection, batch_union = metrics.iou_counts(predicted, gt_masks, self.num_classes)
                intersection = intersection + batch_intersection
                union = union + batch_union
                batch_hits, batch_trials = metrics.pointing_game(cams, labels[with_mask], gt_masks,
                                                                 self.pointing_tolerance)
                hits, trials = hits + batch_hits, trials + batch_trials
        scores, targets = np.concatenate(scores), np.concatenate(targets)
        result = {key: value / num_examples for key, value in term_sums.items()}
        result.update(
            num_examples=num_examples,
            mAP=metrics.mean_average_precision(scores, targets),
            topk_accuracy=metrics.topk_accuracy(scores, targets),
            ap_per_class=dict(zip(self.class_names, metrics.average_precision_per_class(scores, targets).tolist())),
            cam_threshold=self.args.cam_threshold,
            pointing_tolerance_px=self.pointing_tolerance,
        )
        if trials:
            ious = metrics.per_class_iou(intersection, union)
            result.update(cam_mIoU=metrics.mean_iou(intersection, union),
                          iou_per_class=dict(zip(["background"] + self.class_names, ious.tolist())),
                          pointing_game=hits / trials, pointing_hits=int(hits), pointing_trials=int(trials))
        else:
            result.update(cam_mIoU=float("nan"), pointing_game=float("nan"), pointing_hits=0, pointing_trials=0)
        return result

    # ------------------------------------------------------------------ logging

    def log_scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is None:
            return
        import tensorflow as tf  # noqa: PLC0415

        with self.writer.as_default(step=step):
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    tf.summary.scalar(f"{prefix}/{key}", value)

    def record_heatmaps(self, epoch: int) -> None:
        """Input, heatmap overlay and masked image of the first validation images, as a PNG and in TensorBoard."""
        if not self.args.num_heatmaps:
            return
        from gain_jax import viz  # noqa: PLC0415

        if self.heatmap_batch is None:
            self.heatmap_batch = next(self.pipeline(f"validation[:{self.args.batch_size}]", train=False, seed=0))
        batch = self.heatmap_batch
        count = min(self.args.num_heatmaps, len(batch["labels"]))
        if len(batch["labels"]) % self.jax.device_count():
            return  # a validation split smaller than one sharded batch: nothing to show
        out = self.eval_step(self.state, self.to_device(batch, global_rows=True))
        logits = self.to_host(out["logits"])[:count]
        scaled = self.to_host(out["scaled"])[:count, 0]
        masked = self.to_host(out["masked_images"])[:count, 0]
        images = np.asarray(batch["image"])[:count]
        probabilities = 1.0 / (1.0 + np.exp(-logits))
        captions = []
        for labels, probs in zip(np.asarray(batch["labels"])[:count], probabilities):
            truth = [self.class_names[c] for c in np.flatnonzero(labels > 0)]
            top = np.argsort(-probs, kind="stable")[:max(1, len(truth))]
            predicted = [f"{self.class_names[c]} {probs[c]:.2f}" for c in top]
            captions.append(f"gt: {', '.join(truth)} | cam: {self.class_names[top[0]]}\npred: {', '.join(predicted)}")
        picture = viz.grid(viz.attention_rows(images, scaled, masked), captions=captions,
                           scale=max(1, 128 // self.args.image_size))
        if not self.is_main:
            return
        viz.save_png(os.path.join(self.heatmap_dir, f"step_{self.global_step:07d}.png"), picture)
        import tensorflow as tf  # noqa: PLC0415

        with self.writer.as_default(step=self.global_step):
            tf.summary.image("heatmaps/validation (input, overlay, masked)", picture[None], max_outputs=1)
            tf.summary.text("heatmaps/validation captions", "\n\n".join(
                f"{row}: {caption}" for row, caption in enumerate(captions)))

    def write_metrics(self, status: str, final: dict | None = None) -> None:
        if not self.is_main:
            return
        payload = {"status": status, "config": self.config, "steps": self.history["steps"],
                   "epochs": self.history["epochs"], "final": final or {},
                   "paths": {"run_dir": self.run_dir, "checkpoint_dir": self.checkpoint_dir,
                             "heatmap_dir": self.heatmap_dir}}
        write_json_atomic(self.metrics_path, payload)

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        from tqdm import tqdm  # noqa: PLC0415

        jax, args = self.jax, self.args
        stop = StopRequest()
        stop.install()
        print(f"run {self.run_dir}: {args.backbone} on {args.dataset} ({self.num_classes} classes, "
              f"{args.image_size}x{args.image_size}), {args.epochs} epochs x {args.steps_per_epoch} steps of "
              f"{args.batch_size} on {jax.device_count()} device(s), attention mining from epoch "
              f"{args.pretrain_epochs + 1}", flush=True)

        if args.test_first and self.global_step == 0:
            validation = self.evaluate("validation", stop)
            if validation is not None:
                self.history["epochs"].append({"epoch": 0, "validation": validation})
                self.log_scalars("validation", validation, 0)
                print(f"before training: {self.summary_line(validation)}", flush=True)

        first_step, steps_this_run = True, 0
        for epoch in range(self.start_epoch, args.epochs):
            epoch_started = time.time()
            attention_on = np.float32(epoch >= args.pretrain_epochs)
            skip = self.start_step_in_epoch if epoch == self.start_epoch else 0
            records = [r for r in self.history["steps"] if r["epoch"] == epoch + 1]
            topk = [r["topk_accuracy"] for r in records]
            progress = tqdm(total=args.steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{args.epochs}",
                            leave=False, disable=not self.is_main, dynamic_ncols=True)
            step_in_epoch = skip
            batches = self.train_batches(epoch, skip)
            while step_in_epoch < args.steps_per_epoch:
                if stop.signal_name:
                    return self.interrupt(epoch, step_in_epoch, stop.signal_name)
                if args.stop_after and steps_this_run == args.stop_after:
                    return self.interrupt(epoch, step_in_epoch, None)
                batch = self.prepare_train_batch(next(batches))
                rng = jax.random.fold_in(self.dropout_key, self.global_step)
                compile_started = time.time()
                self.state, step_metrics = self.train_step(self.state, self.to_device(batch), rng, attention_on)
                record = {key: float(step_metrics[key]) for key in ("loss", "cl", "am", "ex")}
                if first_step:
                    first_step = False
                    print(f"first train step (compile included): {time.time() - compile_started:.1f} s", flush=True)
                self.global_step += 1
                step_in_epoch += 1
                steps_this_run += 1
                if not math.isfinite(record["loss"]):
                    return self.non_finite(record, epoch)
                from gain_jax import metrics  # noqa: PLC0415

                record["topk_accuracy"] = metrics.topk_accuracy(self.local_rows(step_metrics["logits"]),
                                                                batch["labels"])
                records.append(record)
                topk.append(record["topk_accuracy"])
                self.history["steps"].append({"step": self.global_step, "epoch": epoch + 1,
                                              "attention": bool(attention_on), **record})
                self.log_scalars("train", record, self.global_step)
                progress.update(1)
                progress.set_postfix({key: f"{mean_or_nan([r[key] for r in records]):.4f}"
                                      for key in ("loss", "cl", "am")})
                if args.heatmap_every and self.global_step % args.heatmap_every == 0:
                    self.record_heatmaps(epoch)
            progress.close()

            validation = self.evaluate("validation", stop)
            if validation is None:
                return self.interrupt(epoch, step_in_epoch, stop.signal_name)
            train_summary = {key: mean_or_nan([r[key] for r in records]) for key in ("loss", "cl", "am", "ex")}
            train_summary["topk_accuracy"] = mean_or_nan(topk)
            epoch_record = {"epoch": epoch + 1, "attention": bool(attention_on), "train": train_summary,
                            "validation": validation}
            if epoch + 1 == args.pretrain_epochs < args.epochs:
                # the baseline GAIN's attention mining starts from: the final report compares with it
                for split in FINAL_SPLITS[args.dataset][1:]:
                    result = self.evaluate(split, stop)
                    if result is None:
                        return self.interrupt(epoch, step_in_epoch, stop.signal_name)
                    epoch_record[split] = result
                    self.log_scalars(split, result, epoch + 1)
            epoch_record["seconds"] = time.time() - epoch_started
            self.history["epochs"].append(epoch_record)
            self.log_scalars("epoch_train", train_summary, epoch + 1)
            self.log_scalars("validation", validation, epoch + 1)
            if not args.heatmap_every:
                self.record_heatmaps(epoch)
            last_epoch = epoch + 1 == args.epochs
            if (epoch + 1) % args.checkpoint_every == 0 or last_epoch:
                self.save(epoch + 1, 0)
            self.write_metrics("running")
            print(f"epoch {epoch + 1}/{args.epochs}{' (attention mining)' if attention_on else ''}: "
                  f"train loss {train_summary['loss']:.4f} (cl {train_summary['cl']:.4f}, am {train_summary['am']:.4f})"
                  f" | validation {self.summary_line(validation)} | {epoch_record['seconds']:.1f} s", flush=True)

        final = {}
        for split in FINAL_SPLITS[args.dataset]:
            if split == "validation" and self.history["epochs"] and "validation" in self.history["epochs"][-1]:
                final[split] = self.history["epochs"][-1]["validation"]
            else:
                result = self.evaluate(split, stop)
                if result is None:
                    return self.interrupt(args.epochs, 0, stop.signal_name)
                final[split] = result
                self.log_scalars(split, result, self.global_step)
        self.manager.wait_until_finished()
        self.write_metrics("finished", final)
        if self.writer is not None:
            self.writer.flush()
        if self.is_main:
            self.print_report(final)
        return 0

    def summary_line(self, result: dict) -> str:
        return (f"mAP {result['mAP']:.3f}, top-k acc {result['topk_accuracy']:.3f}, "
                f"CAM mIoU {result['cam_mIoU']:.3f}, pointing {result['pointing_game']:.3f}")

    def interrupt(self, epoch: int, step_in_epoch: int, signal_name: str | None) -> int:
        """Save and leave: on a signal (exit status 130), or after --stop_after steps (status 0)."""
        self.save(epoch, step_in_epoch)
        self.manager.wait_until_finished()
        reason = f"interrupted by {signal_name}" if signal_name else f"stopped after {self.args.stop_after} steps"
        self.write_metrics(reason)
        where = f"--logdir {self.args.logdir} --run_name {self.args.run_name}"
        if self.args.checkpoint_dir:
            where += f" --checkpoint_dir {self.args.checkpoint_dir}"
        if self.is_main:
            print(f"train.py: {reason} at step {self.global_step}: checkpoint saved in {self.checkpoint_dir}; "
                  f"continue with --resume {where}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED if signal_name else 0

    def non_finite(self, record: dict, epoch: int) -> int:
        self.manager.wait_until_finished()
        last_good = self.manager.latest_step()
        self.write_metrics(f"non-finite loss at step {self.global_step}")
        print(f"train.py: error: loss is {record['loss']} at step {self.global_step} (epoch {epoch + 1}); "
              f"stopped, last good checkpoint: "
              f"{'step ' + str(last_good) + ' in ' + self.checkpoint_dir if last_good is not None else 'none'}",
              file=sys.stderr, flush=True)
        return 1

    def print_report(self, final: dict) -> None:
        args = self.args
        pointing_header = f"pointing (±{self.pointing_tolerance:g}px)"
        print(f"\nGAIN ({args.mode}) on {args.dataset}, {args.backbone}, {args.epochs} epochs "
              f"({args.pretrain_epochs} classification-only), {time.time() - self.started:.0f} s")
        rows = []
        pretrained = next((r for r in self.history["epochs"] if r["epoch"] == args.pretrain_epochs), None)
        if pretrained is not None and args.pretrain_epochs < args.epochs:
            rows += [(f"{split} (pre-trained)", pretrained[split]) for split in FINAL_SPLITS[args.dataset]
                     if split in pretrained]
        rows += list(final.items())
        width = max(len(name) for name, _ in rows) + 2
        print(f"{'split':<{width}}{'mAP':>7}{'top-k acc':>11}{f'CAM mIoU@{args.cam_threshold:g}':>15}{pointing_header:>22}")
        for name, result in rows:
            pointing = f"{result['pointing_game']:.3f} ({result['pointing_hits']}/{result['pointing_trials']})"
            print(f"{name:<{width}}{result['mAP']:>7.3f}{result['topk_accuracy']:>11.3f}{result['cam_mIoU']:>15.3f}"
                  f"{pointing:>22}")
        if len(rows) > len(final):
            print(f"(pre-trained: after epoch {args.pretrain_epochs}, the classification-only baseline; "
                  f"the other rows: after attention mining)")
        latest = self.manager.latest_step()
        print(f"TensorBoard logs: {self.run_dir}   (tensorboard --logdir {args.logdir})")
        print(f"metrics:          {self.metrics_path}")
        print(f"checkpoints:      {self.checkpoint_dir} (latest step {latest})")
        print(f"heatmap images:   {self.heatmap_dir}")


if __name__ == "__main__":
    sys.exit(main())
