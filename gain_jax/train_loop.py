"""GAIN's training loop as a library: `train_and_evaluate(config, workdir)` runs a whole training run.

    from gain_jax.config import Config, TrainConfig
    from gain_jax.train_loop import train_and_evaluate
    state, history = train_and_evaluate(Config(train=TrainConfig(epochs=2)), "runs/try")

A run writes, in its folder (`workdir`, by default <logdir>/<run_name>): config.json (the config and the
facts derived from the data set and the machine), metrics.json (`history`: per-step losses, per-epoch
evaluations, final results, status), TensorBoard events, heatmaps/*.png and checkpoints/ (Orbax).

The loop keeps the accelerator busy: step metrics (losses, top-k accuracy) stay on the device and are
read back every `log.log_every` steps, the next batch is transferred while the current step runs, and
nothing in a step waits for the host. Data parallelism: the global batch is split over every device of
every process (one `Mesh` axis), the state is replicated.

Stopping: SIGINT/SIGTERM (or `StopRequest.request()`) set a flag checked between steps and at safe points
of the start-up; the run saves a checkpoint and returns with status "interrupted by SIGINT" (during the
start-up, before anything is written, it raises `RunInterrupted`). No signal ever raises inside native
code (XLA compilation, TensorFlow, Orbax): a second signal only says that the run is stopping, a third one
ends the process at once (exit 130) unless a checkpoint is being written, which always completes first.
A non-finite loss stops the run with `NonFiniteLossError`, without saving the state after it.

Resuming: the newest checkpoint is restored; when it is unreadable (truncated or missing files) the run
says so in one line, restores the newest intact one instead and moves the unreadable ones aside
(<step>.corrupt).

TensorFlow (the input pipeline, TensorBoard) is imported only when a run starts, through gain_jax.data,
and torch (for `train.init` .pth files) before it: the other order crashes with some wheels.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from gain_jax import checkpoint, metrics, quiet, viz
from gain_jax import evaluate as evaluation
from gain_jax.config import (
    Config,
    RunError,
    RunInterrupted,
    TrainConfig,
    changed_settings,
    config_to_dict,
    output_folder_problem,
    resume_mismatches,
)
from gain_jax.convert import from_torchvision
from gain_jax.gain import GainConfig, check_max_labels, pack_labels
from gain_jax.models import build_model
from gain_jax.training import TrainState, make_eval_step, make_train_step
from gain_jax.training import create_train_state as new_train_state

# splits evaluated at the end of a run (validation is also evaluated after every epoch, the others also when
# pre-training ends), and the test splits added to them with --test (eval.test)
FINAL_SPLITS = {"gain_shapes": ("validation", "validation_unbiased"), "gain_voc2012": ("validation",)}
TEST_SPLITS = {"gain_shapes": ("test_unbiased",), "gain_voc2012": ()}
LOSS_KEYS = evaluation.LOSS_KEYS
STEP_KEYS = LOSS_KEYS + ("topk_accuracy",)
IMAGENET_MEAN, IMAGENET_STD = viz.IMAGENET_MEAN, viz.IMAGENET_STD


class NonFiniteLossError(RunError):
    """The loss of a train step was nan or inf; the run stopped (metrics.json says where)."""


# ---------------------------------------------------------------------------------------------- stopping

class StopRequest:
    """A flag the loop checks between steps (and the start-up at safe points), so the state is never
    caught mid-update (the train step donates its input state) and no exception is raised inside native
    code. As a signal handler: the first signal sets the flag, a second one says the run is stopping, a
    third one ends the process at once (exit 130), except inside `protect()` (a checkpoint being
    written), which the process never leaves half-done."""

    EXIT_STATUS = 130

    def __init__(self, signals_before: int = 0, signal_name: str | None = None):
        self.signal_name: str | None = signal_name
        self.count = signals_before  # signals received (those before the handler was installed included)
        self._protected = 0
        self._deferred = False
        self.training = False  # set once the run writes its folder (a stop then saves a checkpoint)

    def request(self, reason: str = "request") -> None:
        """Ask the run to save and stop at the next step boundary (from any thread)."""
        self.signal_name = self.signal_name or reason

    @property
    def protected(self) -> bool:
        return self._protected > 0

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        self.count += 1
        if self.signal_name is None:
            self.signal_name = name
            if self.training:
                _say(f"{name}: stopping at the next step boundary (a checkpoint is saved there first); "
                     f"a third signal quits at once without saving")
            else:
                _say(f"{name}: stopping at the next safe point of the start-up, before anything is written")
        elif self._protected:
            self._deferred = True
            _say(f"{name}: writing a checkpoint; stopping once it is complete")
        elif self.count < 3:
            _say(f"{name}: already stopping, at the next step boundary; a third signal quits at once without "
                 f"saving")
        else:
            _say(f"{name} a third time: quitting at once; the checkpoints already written are complete, "
                 f"the steps since the newest one are lost")
            os._exit(self.EXIT_STATUS)  # no exception unwinding through native code

    @contextlib.contextmanager
    def protect(self):
        """Signals inside the block never end the process: the block completes, then the run stops at the
        next step boundary (the flag is set)."""
        self._protected += 1
        try:
            yield
        finally:
            self._protected -= 1
            if not self._protected:
                self._deferred = False  # the run is stopping anyway: the flag is set


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a closed or broken stderr must not turn a signal into a traceback
        pass


def check_stop(stop: StopRequest | None, where: str, manager=None) -> None:
    """At a safe point of the start-up: raise RunInterrupted when a stop was requested."""
    if stop is None or stop.signal_name is None:
        return
    message = f"interrupted by {stop.signal_name} {where}, before training: nothing written"
    if manager is not None and manager.latest_step() is not None:
        message += f"; the run's checkpoints are unchanged (newest: step {manager.latest_step()})"
    raise RunInterrupted(message)


@contextlib.contextmanager
def handle_signals(stop: StopRequest):
    """SIGINT and SIGTERM go to `stop` inside the block (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------------------------- devices

@dataclasses.dataclass(frozen=True)
class Placement:
    """Data parallelism: batches split over the "batch" axis of a mesh of all devices, state replicated."""

    mesh: Mesh
    batch_sharding: NamedSharding
    replicated: NamedSharding


def data_parallel_placement(devices=None) -> Placement:
    mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), ("batch",))
    return Placement(mesh, NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh, PartitionSpec()))


def batch_to_device(placement: Placement, batch: Mapping[str, np.ndarray], global_rows: bool = False) -> dict:
    """Host batch -> global arrays sharded over the batch axis. A training batch holds this process's rows;
    an evaluation batch (`global_rows`) holds every row, and each process gives its slice."""
    count, index = jax.process_count(), jax.process_index()
    device_batch = {}
    for key in evaluation.BATCH_KEYS:
        rows = np.asarray(batch[key])
        if global_rows and count > 1:
            per_process = rows.shape[0] // count
            rows = rows[index * per_process:(index + 1) * per_process]
        device_batch[key] = jax.make_array_from_process_local_data(placement.batch_sharding, rows)
    if "packing" in batch:  # indices into the whole batch: every device holds all of them
        device_batch["packing"] = jax.device_put(batch["packing"], placement.replicated)
    return device_batch


def rows_to_host(array) -> np.ndarray:
    """All rows of a batch-sharded global array, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # only multi-host runs need it

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def prefetch_to_device(placement: Placement, batches: Iterable[Mapping[str, np.ndarray]],
                       depth: int = 2) -> Iterator[dict]:
    """`batches` as sharded device batches, `depth` of them transferred ahead: the next batch's transfer
    overlaps the current step (like flax.jax_utils.prefetch_to_device, for global arrays)."""
    queue: collections.deque = collections.deque()
    batches = iter(batches)

    def enqueue(count: int) -> None:
        for batch in itertools.islice(batches, count):
            queue.append(batch_to_device(placement, batch))

    enqueue(depth)
    while queue:
        yield queue.popleft()
        enqueue(1)


# ---------------------------------------------------------------------------------------------- steps

def topk_accuracy(scores: jax.Array, targets: jax.Array) -> jax.Array:
    """`gain_jax.metrics.topk_accuracy` as a traceable function (the same stable ranking): the mean over
    images with labels of |top-n scored classes ∩ labels| / n, n the image's label count; nan if none."""
    positives = targets > 0
    num_labels = positives.sum(axis=-1)
    ranks = jnp.argsort(-scores, axis=-1, stable=True)
    ranked_positives = jnp.take_along_axis(positives, ranks, axis=-1)
    within_top_n = jnp.arange(scores.shape[-1]) < num_labels[:, None]
    hits = (ranked_positives & within_top_n).sum(axis=-1)
    labelled = num_labels > 0
    per_image = jnp.where(labelled, hits / jnp.maximum(num_labels, 1), 0.0)
    return jnp.where(labelled.any(), per_image.sum() / jnp.maximum(labelled.sum(), 1), jnp.nan)


def mining_start_epoch(train: TrainConfig) -> int:
    """The 0-based epoch from which L_am counts: `am_start_epoch`, or with 0, `pretrain_epochs`."""
    return max(train.pretrain_epochs, train.am_start_epoch)


def loss_switches(train: TrainConfig, epoch: int) -> tuple[np.float32, np.float32]:
    """(attention_on, mining_on) of the 0-based `epoch`, as the train step's float32 scalars: the epoch alone
    decides them, so a resumed run switches where an uninterrupted one does. attention_on: L_am and L_ext
    count (after the classification-only `pretrain_epochs`); mining_on: L_am counts (from
    `mining_start_epoch`, never before attention_on)."""
    return np.float32(epoch >= train.pretrain_epochs), np.float32(epoch >= mining_start_epoch(train))


def schedule_text(train: TrainConfig) -> str:
    """When the attention losses start, in 1-based epochs, for the run's first line."""
    mining_start = mining_start_epoch(train)
    if mining_start == train.pretrain_epochs:
        return f"attention mining from epoch {train.pretrain_epochs + 1}"
    mining = f"from epoch {mining_start + 1}" if mining_start < train.epochs else "never"
    return f"extra supervision (L_ext) from epoch {train.pretrain_epochs + 1}, attention mining (L_am) {mining}"


def phase_text(attention_on, mining_on) -> str:
    """The epoch line's note on which attention losses counted."""
    if mining_on:
        return " (attention mining)"
    return " (L_ext, L_am not yet)" if attention_on else ""


def make_loop_train_step(model, gain_cfg: GainConfig) -> Callable:
    """`step(state, batch, dropout_key, global_step, attention_on, mining_on) -> (state, metrics)`,
    jit-compiled, the state donated. `attention_on` and `mining_on` are the epoch's switches (`loss_switches`),
    traced: changing them does not recompile. The dropout key of a step is `fold_in(dropout_key, global_step)`
    (a resumed run draws the same ones); metrics are device scalars: the loss terms and the batch's top-k
    accuracy."""
    train_step = make_train_step(model, gain_cfg, donate=False)  # the outer jit donates

    def step(state, batch, dropout_key, global_step, attention_on, mining_on):
        rng = jax.random.fold_in(dropout_key, global_step)
        state, step_metrics = train_step(state, batch, rng, attention_on, mining_on)
        summary = {key: step_metrics[key] for key in LOSS_KEYS}
        summary["topk_accuracy"] = topk_accuracy(step_metrics["logits"], batch["labels"])
        return state, summary

    return jax.jit(step, donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------- the run

@dataclasses.dataclass(frozen=True)
class RunPaths:
    run_dir: str
    checkpoint_dir: str
    heatmap_dir: str
    metrics_path: str
    config_path: str


@dataclasses.dataclass(frozen=True)
class Run:
    """What `create_run` builds: the resolved config (image size, steps per epoch and run name filled in),
    data set facts, model, compiled steps, device placement and paths. Holds no training state."""

    config: Config
    paths: RunPaths
    class_names: tuple[str, ...]
    split_sizes: Mapping[str, int]
    pointing_tolerance: float
    model: Any
    tx: optax.GradientTransformation
    placement: Placement
    train_step: Callable
    eval_step: Callable
    is_main: bool

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a run stands: `global_step` steps done, `step_in_epoch` of them in epoch index `epoch`."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def load_torch_state_dict(path: str) -> dict:
    """A .pth state dict as numpy arrays. Imports torch, which must happen before TensorFlow is imported."""
    import torch  # only with train.init, and before gain_jax.data (TensorFlow)

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle, zip or format error: all mean "not a state dict file"
        raise RunError(f"--init file {path} is not a readable torch state dict: {error}".splitlines()[0]) from None
    if not isinstance(loaded, dict) or not all(hasattr(v, "detach") for v in loaded.values()):
        raise RunError(f"--init file {path} holds no state dict (a mapping of parameter names to tensors)")
    return {key: value.detach().cpu().numpy() for key, value in loaded.items()}


def check_environment(config: Config, workdir: str | None = None, resume: bool = False) -> None:
    """What the config needs from this machine and its files, checked before anything is written."""
    device_count, process_count = jax.device_count(), jax.process_count()
    batch_size = config.train.batch_size
    if batch_size % device_count or batch_size % process_count:
        raise RunError(f"--batch_size {batch_size} is not divisible by the {device_count} devices "
                       f"(data parallelism splits the batch evenly)")
    if process_count > 1 and config.gain.mode == "per_label" and config.gain.am_labels_per_image:
        raise RunError("--am_labels_per_image needs the packed per-label path, which runs on one host only")
    if process_count > 1 and config.log.run_name is None and workdir is None:
        raise RunError("multi-host runs need an explicit --run_name (every process must write to the same run)")
    for flag, path in (("data_dir", config.data.data_dir), ("manual_dir", config.data.manual_dir)):
        if path is not None and not os.path.isdir(path):
            problem = "is not a directory" if os.path.exists(path) else "does not exist"
            raise RunError(f"{flag.replace('_', ' ')} {path} {problem} (--{flag})")
    if config.train.init is not None and not os.path.isfile(config.train.init):
        problem = "is not a file" if os.path.exists(config.train.init) else "does not exist"
        raise RunError(f"--init file {config.train.init} {problem}")
    if resume and config.log.run_name is None and config.log.checkpoint_dir is None and workdir is None:
        raise RunError("--resume needs the --run_name (or --checkpoint_dir) of the run to continue")
    if workdir is not None:
        check_writable_dir(workdir, "the run folder")
    else:
        check_writable_dir(config.log.logdir, "--logdir")
        if config.log.run_name is not None:
            check_writable_dir(os.path.join(config.log.logdir, config.log.run_name), "--run_name")
    if config.log.checkpoint_dir is not None:
        check_writable_dir(config.log.checkpoint_dir, "--checkpoint_dir")
    if resume:
        check_run_exists(config, workdir)


def check_writable_dir(path: str, flag: str) -> None:
    """`path` is a folder this process can write in, or one it can create; RunError naming `flag` otherwise."""
    problem = output_folder_problem(path)
    if problem is not None:
        raise RunError(f"{flag} {problem}")


def holds_checkpoints(directory: str) -> bool:
    """Whether `directory` holds a checkpoint step folder (orbax names them by step number)."""
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_run_exists(config: Config, workdir: str | None = None) -> None:
    """--resume: the run folder (or --checkpoint_dir) exists and holds a checkpoint; RunError naming the
    path and the runs under --logdir otherwise."""
    run_dir = workdir if workdir is not None else os.path.join(config.log.logdir, config.log.run_name or "")
    checkpoint_dir = config.log.checkpoint_dir or os.path.join(run_dir, "checkpoints")
    if holds_checkpoints(checkpoint_dir):
        return
    logdir = os.path.dirname(os.path.abspath(run_dir))
    runs = sorted(name for name in os.listdir(logdir)
                  if os.path.isdir(os.path.join(logdir, name, "checkpoints"))) if os.path.isdir(logdir) else []
    shown = ", ".join(runs[:10]) + (f" (and {len(runs) - 10} more)" if len(runs) > 10 else "")
    hint = f"; runs under {logdir}: {shown}" if runs else f"; {logdir} holds no runs"
    if not os.path.isdir(run_dir) and config.log.checkpoint_dir is None:
        raise RunError(f"--resume: there is no run {run_dir}{hint}")
    raise RunError(f"--resume: no checkpoint in {checkpoint_dir}, nothing to resume (start the run without "
                   f"--resume){hint if not os.path.isdir(run_dir) else ''}")


def _data():
    """gain_jax.data, imported on first use: it imports TensorFlow (after torch, see the module doc)."""
    import gain_jax.data as gd  # TensorFlow: only once a run starts

    return gd


def prepare_dataset(config: Config) -> dict[str, int]:
    """Build the tfds set if needed (which also checks the VOC files); {split: number of examples}."""
    gd = _data()
    import tensorflow_datasets as tfds  # loaded by gain_jax.data already

    builder = tfds.builder(config.data.dataset, data_dir=config.data.data_dir)
    if not builder.is_prepared() and jax.process_index() == 0:
        # tfds' own build messages are hidden (gain_jax.quiet): say why the first run waits
        print(f"preparing the {config.data.dataset} data set in {builder.data_dir} (first use only; "
              f"{'a minute or so' if config.data.dataset == 'gain_shapes' else 'several minutes'})", flush=True)
    try:
        gd.make_dataset(config.data.dataset, "train", data_dir=config.data.data_dir,
                        manual_dir=config.data.manual_dir, batch_size=1, train=False)
    except (FileNotFoundError, ValueError) as error:
        raise RunError(str(error).splitlines()[0]) from None
    splits = tfds.builder(config.data.dataset, data_dir=config.data.data_dir).info.splits
    return {name: splits[name].num_examples for name in splits.keys()}


def run_paths(config: Config, workdir: str | None = None) -> RunPaths:
    run_dir = workdir if workdir is not None else os.path.join(config.log.logdir, config.log.run_name)
    return RunPaths(run_dir=run_dir, checkpoint_dir=config.log.checkpoint_dir or os.path.join(run_dir, "checkpoints"),
                    heatmap_dir=os.path.join(run_dir, "heatmaps"), metrics_path=os.path.join(run_dir, "metrics.json"),
                    config_path=os.path.join(run_dir, "config.json"))


def resolve_config(config: Config, image_size: int, train_examples: int, workdir: str | None = None) -> Config:
    """The defaults that depend on the data set and the clock made explicit: image size, steps per epoch,
    run name (a `workdir` names the run folder: logdir and run_name follow it)."""
    data = dataclasses.replace(config.data, image_size=config.data.image_size or image_size)
    steps = config.train.steps_per_epoch or max(1, train_examples // config.train.batch_size)
    train = dataclasses.replace(config.train, steps_per_epoch=steps)
    if workdir is not None:
        log = dataclasses.replace(config.log, logdir=os.path.dirname(os.path.abspath(workdir)),
                                  run_name=os.path.basename(os.path.abspath(workdir)))
    elif config.log.run_name is None:
        name = f"{config.data.dataset}_{config.train.backbone}_{time.strftime('%Y%m%d-%H%M%S')}"
        log = dataclasses.replace(config.log, run_name=name)
    else:
        log = config.log
    return dataclasses.replace(config, data=data, train=train, log=log)


def create_run(config: Config, workdir: str | None = None, *, resume: bool = False) -> Run:
    """Check the config and the machine, prepare the data set and build everything a run needs; writes
    nothing (a fresh run refuses a checkpoint dir that already holds checkpoints).

    Raises:
      ConfigError / RunError: with a one-line message naming the flag or file at fault.
    """
    config.validate()
    check_environment(config, workdir, resume)
    gd = _data()
    info = gd.dataset_info(config.data.dataset)
    split_sizes = prepare_dataset(config)
    config = resolve_config(config, info.image_size, split_sizes["train"], workdir)
    paths = run_paths(config, workdir)
    if not resume and holds_checkpoints(paths.checkpoint_dir):
        raise RunError(f"checkpoint dir {paths.checkpoint_dir} already holds checkpoints: pass --resume to "
                       f"continue that run, or choose another --run_name / --checkpoint_dir")
    image_size = config.data.image_size
    tolerance = config.eval.pointing_tolerance
    model = build_model(config.train.backbone, num_classes=info.num_classes, dropout_rate=config.train.dropout)
    return Run(config=config, paths=paths, class_names=tuple(info.class_names), split_sizes=split_sizes,
               pointing_tolerance=tolerance if tolerance is not None else round(15 * image_size / 224),
               model=model, tx=optax.adam(config.train.lr), placement=data_parallel_placement(),
               train_step=make_loop_train_step(model, config.gain), eval_step=make_eval_step(model, config.gain),
               is_main=jax.process_index() == 0)


def create_train_state(run: Run, torch_state_dict: Mapping[str, np.ndarray] | None = None
                       ) -> tuple[TrainState, jax.Array]:
    """The initial state (replicated over the mesh) and the run's dropout key, both from `train.seed`;
    the variables come from `torch_state_dict` (torchvision layout) when given."""
    config = run.config
    init_key, head_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.train.seed), 3)
    if torch_state_dict is not None:
        try:
            variables = from_torchvision(config.train.backbone, torch_state_dict, run.num_classes, rng=head_key)
        except ValueError as error:
            raise RunError(f"--init file {config.train.init} does not fit backbone {config.train.backbone}: "
                           f"{error}") from None
    else:
        size = config.data.image_size
        dummy = np.zeros((1, size, size, 3), np.float32)
        variables = jax.jit(lambda key: run.model.init(key, dummy, train=False))(init_key)
    state = jax.device_put(new_train_state(variables, run.tx), run.placement.replicated)
    return state, dropout_key


def run_record(run: Run) -> dict:
    """config.json: the resolved config by section, and what the run derived from the data and machine."""
    return {**config_to_dict(run.config), "num_classes": run.num_classes, "class_names": list(run.class_names),
            "device_count": jax.device_count(), "process_count": jax.process_count(),
            "pointing_tolerance_px": run.pointing_tolerance, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD)}


# ---------------------------------------------------------------------------------------------- data

def pipeline(run: Run, split: str, train: bool, seed: int) -> Iterator[dict]:
    """Training: this process's share of the split, in batches of its share of the global batch.
    Evaluation: every process reads the whole split in global batches (see `batch_to_device`)."""
    config = run.config
    sharding = {} if train else {"process_index": 0, "process_count": 1}
    batch_size = config.train.batch_size // jax.process_count() if train else config.train.batch_size
    oversampling = {}
    if train and config.data.ex_oversample:
        oversampling = {"oversample": config.data.ex_oversample, "oversample_filter": functools.partial(
            selected_for_extra_supervision, seed=config.train.seed, fraction=config.data.ex_fraction)}
    try:
        return _data().input_pipeline(config.data.dataset, split, data_dir=config.data.data_dir,
                                      manual_dir=config.data.manual_dir, image_size=config.data.image_size,
                                      batch_size=batch_size, train=train, seed=seed,
                                      autoaugment=config.data.autoaugment and train, **sharding, **oversampling)
    except ValueError as error:
        if not oversampling:
            raise
        # e.g. no image selected by a tiny --ex_fraction, or a split too large to keep in memory
        raise RunError(f"--ex_oversample {config.data.ex_oversample}: {error}") from None


def selected_for_extra_supervision(filenames, seed: int, fraction: float) -> np.ndarray:
    """Deterministic per-image choice: the same images in every epoch, run and process."""
    if fraction >= 1.0:
        return np.ones(len(filenames), bool)
    hashes = [zlib.crc32(f"{seed}:{name}".encode()) / 2.0 ** 32 for name in filenames]
    return np.asarray(hashes) < fraction


def _as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def am_sampling_rng(seed: int, global_step: int) -> np.random.Generator:
    """The generator that draws the attention-mining labels of the batch trained at `global_step` (steps done
    before it; per-label mode with --am_labels_per_image): from (seed, step) alone, so that a resumed run
    draws what an uninterrupted one would."""
    return np.random.default_rng([seed % 2 ** 64, global_step])


def prepare_train_batch(batch: Mapping[str, np.ndarray], config: Config, global_step: int = 0) -> dict:
    """Per-label mode: pack the batch's (image, label) pairs (one host; several hosts each hold only their
    own rows' labels, so they pad to --max_labels and refuse an image with more), with
    --am_labels_per_image sampling them from `am_sampling_rng(seed, global_step)`; keep only the selected
    images' masks for extra supervision."""
    filenames = [_as_text(name) for name in batch["filename"]]
    extra = {}
    if config.gain.mode == "per_label":
        if jax.process_count() == 1:
            sampled = config.gain.am_labels_per_image
            extra["packing"] = pack_labels(
                np.asarray(batch["labels"]), multiple=jax.device_count(), am_labels_per_image=sampled,
                rng=am_sampling_rng(config.train.seed, global_step) if sampled else None)
        else:
            try:
                check_max_labels(np.asarray(batch["labels"]), config.gain.max_labels, filenames)
            except ValueError as error:
                raise RunError(f"{error} (--max_labels; one host packs the labels instead)") from None
    selected = selected_for_extra_supervision(filenames, config.train.seed, config.data.ex_fraction)
    return {**batch, **extra, "has_mask": np.asarray(batch["has_mask"], bool) & selected}


def train_batches(run: Run, epoch: int, skip: int = 0, global_step: int = 0) -> Iterator[dict]:
    """Epoch index `epoch`'s host batches (an endless stream), re-created from seed + epoch so that a
    resumed run sees the same ones after skipping the `skip` already trained on; `global_step` is the step
    that trains the first one (it seeds per-label sampling, `prepare_train_batch`)."""
    batches = itertools.islice(pipeline(run, "train", train=True, seed=run.config.train.seed + epoch), skip, None)
    return (prepare_train_batch(batch, run.config, global_step + index) for index, batch in enumerate(batches))


# ---------------------------------------------------------------------------------------------- evaluation

def evaluate_split(run: Run, state: TrainState, split: str, stop: StopRequest | None = None) -> dict | None:
    """`gain_jax.evaluate` over a split (its first `eval.eval_examples`), None if stopped."""
    size = run.split_sizes[split]
    if run.config.eval.eval_examples:
        size = min(size, run.config.eval.eval_examples)
    batch_size = run.config.train.batch_size
    batches = tqdm(pipeline(run, f"{split}[:{size}]", train=False, seed=0), desc=f"eval {split}", leave=False,
                   total=math.ceil(size / batch_size), disable=not run.is_main)
    return evaluation.evaluate_with_step(
        run.eval_step, state, batches, run.class_names, cam_threshold=run.config.eval.cam_threshold,
        pointing_tolerance=run.pointing_tolerance,
        to_device=lambda batch: batch_to_device(run.placement, batch, global_rows=True), to_host=rows_to_host,
        device_count=jax.device_count(), should_stop=lambda: stop is not None and stop.signal_name is not None)


# ---------------------------------------------------------------------------------------------- logs

def write_json_atomic(path: str, payload) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=1, allow_nan=True)
    os.replace(temporary, path)


def new_history(run: Run) -> dict:
    """metrics.json's content at the start of a run."""
    return {"status": "running", "config": run_record(run), "global_step": 0, "steps": [], "epochs": [],
            "final": {}, "paths": {"run_dir": run.paths.run_dir, "checkpoint_dir": run.paths.checkpoint_dir,
                                   "heatmap_dir": run.paths.heatmap_dir}}


def write_history(run: Run, history: dict) -> None:
    if run.is_main:
        write_json_atomic(run.paths.metrics_path, history)


def open_summary_writer(run: Run):
    """A TensorBoard writer on the run folder (process 0 only, else None)."""
    if not run.is_main:
        return None
    _data()
    import tensorflow as tf  # loaded by gain_jax.data already

    return tf.summary.create_file_writer(run.paths.run_dir)


def log_scalars(writer, prefix: str, values: Mapping[str, Any], step: int) -> None:
    if writer is None:
        return
    import tensorflow as tf  # loaded by gain_jax.data already (open_summary_writer)

    with writer.as_default(step=step):
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                tf.summary.scalar(f"{prefix}/{key}", value)


def heatmap_batch(run: Run) -> dict:
    """The validation images the heatmap grids show (the first global batch)."""
    return next(pipeline(run, f"validation[:{run.config.train.batch_size}]", train=False, seed=0))


def record_heatmaps(run: Run, state: TrainState, batch: Mapping[str, np.ndarray], step: int, writer) -> None:
    """Input, heatmap overlay and masked image of the first validation images, as a PNG and in TensorBoard."""
    count = min(run.config.log.num_heatmaps, len(batch["labels"]))
    if not count or len(batch["labels"]) % jax.device_count():
        return  # none wanted, or a validation split smaller than one sharded batch
    out = run.eval_step(state, batch_to_device(run.placement, batch, global_rows=True))
    logits = rows_to_host(out["logits"])[:count]
    scaled = rows_to_host(out["scaled"])[:count, 0]
    masked = rows_to_host(out["masked_images"])[:count, 0]
    captions = viz.prediction_captions(np.asarray(batch["labels"])[:count], logits, run.class_names)
    picture = viz.grid(viz.attention_rows(np.asarray(batch["image"])[:count], scaled, masked), captions=captions,
                       scale=max(1, 128 // run.config.data.image_size))
    if not run.is_main:
        return
    viz.save_png(os.path.join(run.paths.heatmap_dir, f"step_{step:07d}.png"), picture)
    import tensorflow as tf  # loaded by gain_jax.data already (open_summary_writer)

    with writer.as_default(step=step):
        tf.summary.image("heatmaps/validation (input, overlay, masked)", picture[None], max_outputs=1)
        tf.summary.text("heatmaps/validation captions", "\n\n".join(
            f"{row}: {caption}" for row, caption in enumerate(captions)))


def final_splits(config: Config) -> tuple[str, ...]:
    """The splits evaluated at the end of the run: FINAL_SPLITS, and TEST_SPLITS with eval.test."""
    dataset = config.data.dataset
    return FINAL_SPLITS[dataset] + (TEST_SPLITS[dataset] if config.eval.test else ())


def summary_line(result: Mapping[str, Any]) -> str:
    return (f"mAP {result['mAP']:.3f}, top-k acc {result['topk_accuracy']:.3f}, "
            f"CAM mIoU {result['cam_mIoU']:.3f} (objects {result.get('cam_object_mIoU', math.nan):.3f}), "
            f"pointing {result['pointing_game']:.3f}")


def floors_line(split: str, result: Mapping[str, Any], width: int) -> str | None:
    """The split's floors (`gain_jax.metrics.FLOOR_NAMES`) in one line, None for a result without them."""
    floors = result.get("floors")
    if not floors:
        return None
    names = [name for name in metrics.FLOOR_NAMES if name in floors]
    figures = ", ".join(f"{label} " + "/".join(f"{floors[name][key]:.3f}" for name in names)
                        for label, key in (("mIoU", "cam_mIoU"), ("object mIoU", "cam_object_mIoU"),
                                           ("pointing", "pointing_game")))
    return f"  {split:<{width}}{figures}"


def report(run: Run, history: Mapping[str, Any], seconds: float, latest_checkpoint: int | None) -> str:
    """The closing table: every final split, and the pre-training baseline's splits when there was one."""
    config = run.config
    train, dataset = config.train, config.data.dataset
    lines = [f"\nGAIN ({config.gain.mode}) on {dataset}, {train.backbone}, {train.epochs} epochs "
             f"({train.pretrain_epochs} classification-only), {seconds:.0f} s"]
    rows = []
    pretrained = next((r for r in history["epochs"] if r["epoch"] == train.pretrain_epochs), None)
    if pretrained is not None and train.pretrain_epochs < train.epochs:
        rows += [(f"{split} (pre-trained)", pretrained[split])
                 for split in final_splits(config) if split in pretrained]
    rows += list(history["final"].items())
    width = max(len(name) for name, _ in rows) + 2
    pointing_header = f"pointing (±{run.pointing_tolerance:g}px)"
    conflicting = any("mAP_conflicting" in result for _, result in rows)
    lines.append(f"{'split':<{width}}{'mAP':>7}{'top-k acc':>11}{f'CAM mIoU@{config.eval.cam_threshold:g}':>15}"
                 f"{'object mIoU':>13}{pointing_header:>22}" + (f"{'mAP conflicting':>18}" if conflicting else ""))
    for name, result in rows:
        pointing = f"{result['pointing_game']:.3f} ({result['pointing_hits']}/{result['pointing_trials']})"
        line = (f"{name:<{width}}{result['mAP']:>7.3f}{result['topk_accuracy']:>11.3f}"
                f"{result['cam_mIoU']:>15.3f}{result.get('cam_object_mIoU', math.nan):>13.3f}{pointing:>22}")
        if "mAP_conflicting" in result:
            subset = f"{result['mAP_conflicting']:.3f} (n={result['num_conflicting']})"
            line += f"{subset:>18}"
        lines.append(line)
    if len(rows) > len(history["final"]):
        lines.append(f"(pre-trained: after epoch {train.pretrain_epochs}, the classification-only baseline; "
                     f"the other rows: after attention mining)")
    if conflicting:
        lines.append("(mAP conflicting: on the images whose background texture is a non-label class's own)")
    floor_lines = [line for split, result in history["final"].items()
                   if (line := floors_line(split, result, width - 2)) is not None]
    if floor_lines:
        lines.append(f"floors, maps that ignore the image ({' / '.join(metrics.FLOOR_NAMES)}), on the same images:")
        lines += floor_lines
    lines += [f"TensorBoard logs: {run.paths.run_dir}   (tensorboard --logdir {config.log.logdir})",
              f"metrics:          {run.paths.metrics_path}",
              f"checkpoints:      {run.paths.checkpoint_dir} (latest step {latest_checkpoint})",
              f"heatmap images:   {run.paths.heatmap_dir}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(run: Run, manager, state: TrainState, dropout_key: jax.Array, position: Position) -> None:
    """Checkpoint the state at `position` (asynchronously), unless this very step is saved already."""
    if manager.latest_step() == position.global_step:
        return  # e.g. stopped right after an epoch's checkpoint
    meta = {"epoch": position.epoch, "step_in_epoch": position.step_in_epoch, "global_step": position.global_step,
            "dropout_key": checkpoint.key_to_json(dropout_key), "config": run_record(run)}
    checkpoint.save(manager, position.global_step, state, meta)


def read_previous_history(run: Run) -> dict | None:
    """The run's metrics.json before a resume (None if there is none); RunError if it is not readable."""
    path = run.paths.metrics_path
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            previous = json.load(handle)
    except OSError as error:
        raise RunError(f"--resume: cannot read {path} ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"--resume: {path} is not valid JSON ({error}); it holds the run's step and epoch "
                       f"records: repair it, or move it away to resume without them") from None
    if not isinstance(previous, dict) or not all(isinstance(previous.get(key, []), list)
                                                 for key in ("steps", "epochs")):
        raise RunError(f"--resume: {path} is not a metrics.json of a run (no steps/epochs lists); "
                       f"move it away to resume without it")
    return previous


def restore_run(run: Run, manager, state: TrainState, dropout_key: jax.Array
                ) -> tuple[TrainState, jax.Array, Position, dict]:
    """The newest intact checkpoint's state, dropout key and position, and the history up to it (from the
    run's metrics.json). Unreadable newer checkpoints are reported in one line and moved aside (once the
    older one is restored); RunError if none can be restored or the settings differ from the run's."""
    history = new_history(run)
    directory = run.paths.checkpoint_dir
    previous = read_previous_history(run)  # before anything changes on disk
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise RunError(f"--resume: no checkpoint in {directory}, nothing to resume (start the run without "
                       f"--resume)")
    unreadable: list[checkpoint.CheckpointError] = []
    for step in steps:
        try:
            saved = checkpoint.read_meta(manager, step).get("config", {})
        except checkpoint.CheckpointError as error:
            unreadable.append(error)
            continue
        mismatches = resume_mismatches(saved, run.config)
        if mismatches:
            name, saved_value, value = mismatches[0]
            raise RunError(f"--resume: checkpoint {directory} was trained with --{name} "
                           f"{saved_value!r}, this run has {value!r}")
        try:
            state, meta = checkpoint.restore(manager, step, state)
            position = Position(int(meta["epoch"]), int(meta["step_in_epoch"]), int(meta["global_step"]))
            restored_key = checkpoint.key_from_json(meta["dropout_key"])
        except checkpoint.CheckpointError as error:
            unreadable.append(error)
            continue
        except (KeyError, TypeError, ValueError) as error:
            unreadable.append(checkpoint.CheckpointError(directory, step, f"its meta record lacks {error}"))
            continue
        break
    else:
        first = unreadable[0]
        raise RunError(f"--resume: no checkpoint in {directory} can be restored: step {first.step} "
                       f"({first.reason})" + (f" and {len(unreadable) - 1} older ones" if len(unreadable) > 1 else "")
                       + "; start the run again without --resume under another --run_name")
    changed = changed_settings(saved, run.config)
    if changed and run.is_main:
        print("resuming with settings that differ from the run's: " + ", ".join(
            f"--{name} {before!r} -> {after!r}" for name, before, after in changed), flush=True)
    if unreadable and run.is_main:
        names = ", ".join(str(error.step) for error in unreadable)
        moved = [checkpoint.set_aside(manager, error.step) for error in unreadable]
        print(f"WARNING: --resume: checkpoint step {unreadable[0].step} in {directory} is unreadable "
              f"({unreadable[0].reason}); resuming from step {position.global_step}, the newest intact one "
              f"(step{'s' if len(moved) > 1 else ''} {names} moved aside to {', '.join(moved)})",
              file=sys.stderr, flush=True)
    if previous is not None:
        # records past the checkpoint belong to steps the resumed run repeats
        history["steps"] = [r for r in previous.get("steps", []) if r["step"] <= position.global_step]
        history["epochs"] = [r for r in previous.get("epochs", []) if r["epoch"] <= position.epoch]
    history["global_step"] = position.global_step
    print(f"resumed {directory} at step {position.global_step} (epoch {position.epoch + 1}, "
          f"{position.step_in_epoch} steps into it)", flush=True)
    return state, restored_key, position, history


# ---------------------------------------------------------------------------------------------- the loop

def read_back(pending: list[tuple[dict, dict]]) -> list[dict]:
    """[(record fields, device metrics)] -> step records with host floats, in one transfer."""
    host = jax.device_get([device_metrics for _, device_metrics in pending])
    return [{**fields, **{key: float(values[key]) for key in STEP_KEYS}} for (fields, _), values in zip(pending, host)]


def first_non_finite(records: list[dict]) -> int | None:
    """Index of the first record whose loss is nan or inf."""
    return next((i for i, record in enumerate(records) if not math.isfinite(record["loss"])), None)


def flush_step_metrics(run: Run, manager, history: dict, pending: list[tuple[dict, dict]], writer) -> list[dict]:
    """Move the pending steps' metrics from the device into `history` (and their mean to TensorBoard);
    return their records. At the first non-finite loss, keep the steps before it and raise
    NonFiniteLossError."""
    records = read_back(pending)
    pending.clear()
    bad = first_non_finite(records)
    history["steps"].extend(records if bad is None else records[:bad])
    if bad is not None:
        _fail_non_finite(run, manager, history, records[bad])
    if records:
        history["global_step"] = records[-1]["step"]
        # TensorBoard gets the mean of the steps read back (each step's values are in metrics.json): one
        # write per read-back keeps TensorFlow's per-op cost out of the step loop
        log_scalars(writer, "train", step_means(records), records[-1]["step"])
    return records


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def step_means(records: list[dict]) -> dict:
    """The mean of each step metric over `records` (nan for none)."""
    return {key: _mean([record[key] for record in records]) for key in STEP_KEYS}


def _finish_interrupted(run: Run, manager, state, dropout_key, position: Position, history: dict, reason: str,
                        stop: StopRequest) -> tuple[TrainState, dict]:
    """Save at `position` and leave with `reason` as the status."""
    with stop.protect():
        save_checkpoint(run, manager, state, dropout_key, position)
        manager.wait_until_finished()
    history.update(status=reason, global_step=position.global_step)
    write_history(run, history)
    return state, history


def _fail_non_finite(run: Run, manager, history: dict, record: dict) -> None:
    manager.wait_until_finished()
    last_good = manager.latest_step()
    history.update(status=f"non-finite loss at step {record['step']}", global_step=record["step"])
    write_history(run, history)
    where = f"step {last_good} in {run.paths.checkpoint_dir}" if last_good is not None else "none"
    raise NonFiniteLossError(f"loss is {record['loss']} at step {record['step']} (epoch {record['epoch']}); "
                             f"stopped, last good checkpoint: {where}")


def train_and_evaluate(config: Config, workdir: str | None = None, *, resume: bool = False, stop_after: int = 0,
                       stop_request: StopRequest | None = None) -> tuple[TrainState, dict]:
    """Train and evaluate a GAIN model as `config` says; write the run folder (see the module doc).

    Args:
      config: the run's settings (validated here).
      workdir: the run folder; default <config.log.logdir>/<config.log.run_name> (a run name from the data
        set, backbone and time when there is none).
      resume: continue from the run's newest checkpoint (same run folder or checkpoint dir); the losses
        are those of an uninterrupted run. An unreadable newest checkpoint is reported (one line on
        stderr), moved aside to <step>.corrupt, and the newest intact one restored.
      stop_after: save and stop after this many train steps of this call (0: run to the end).
      stop_request: a `StopRequest` the caller controls (and whose signal handlers it installs, see
        `handle_signals`); by default SIGINT/SIGTERM stop the run from the very start of this call (the
        handlers are restored afterwards).
    Returns:
      (final state, history): history is what metrics.json holds; history["status"] is "finished",
      "interrupted by SIGINT" (or another signal, or the reason given to `StopRequest.request`) or
      "stopped after N steps".
    Raises:
      ConfigError, RunError: a setting, file, folder, data set or checkpoint that does not work (a one-line
        message, raised before anything is written).
      RunInterrupted: a stop was requested during the start-up, before anything was written.
      NonFiniteLossError: a train step's loss was not finite.
    """
    stop = stop_request if stop_request is not None else StopRequest()
    with handle_signals(stop) if stop_request is None else contextlib.nullcontext():
        return _start_and_train(config, workdir, resume, stop_after, stop)


def _start_and_train(config: Config, workdir: str | None, resume: bool, stop_after: int,
                     stop: StopRequest) -> tuple[TrainState, dict]:
    """The start-up (checked for a stop request at each safe point, nothing written before the last one),
    then the loop."""
    quiet.quiet_libraries(verbose=config.log.verbose)  # before TensorFlow is imported
    check_stop(stop, "while starting")
    torch_state_dict = load_torch_state_dict(config.train.init) if config.train.init else None
    check_stop(stop, "while loading --init")
    run = create_run(config, workdir, resume=resume)
    check_stop(stop, "while preparing the data set")
    state, dropout_key = create_train_state(run, torch_state_dict)
    del torch_state_dict
    check_stop(stop, "while compiling")
    history, position = new_history(run), Position()
    if resume:
        reader = checkpoint.open_manager(run.paths.checkpoint_dir, create=False)
        try:
            check_stop(stop, "while compiling", reader)
            state, dropout_key, position, history = restore_run(run, reader, state, dropout_key)
        finally:
            reader.close()
    check_stop(stop, "while restoring" if resume else "while compiling")
    # from here on the run writes its folder
    stop.training = True
    if run.is_main:
        os.makedirs(run.paths.heatmap_dir, exist_ok=True)
        write_json_atomic(run.paths.config_path, run_record(run))
    manager = checkpoint.open_manager(run.paths.checkpoint_dir, max_to_keep=run.config.log.keep)
    try:
        writer = open_summary_writer(run)
        try:
            return _train(run, manager, state, dropout_key, position, history, writer, stop, stop_after)
        finally:
            with stop.protect():
                manager.wait_until_finished()
            if writer is not None:
                writer.flush()
    finally:
        manager.close()


def _train(run: Run, manager, state: TrainState, dropout_key: jax.Array, position: Position, history: dict,
           writer, stop: StopRequest, stop_after: int) -> tuple[TrainState, dict]:
    config = run.config
    train, log = config.train, config.log
    started = time.time()
    if run.is_main:
        print(f"run {run.paths.run_dir}: {train.backbone} on {config.data.dataset} ({run.num_classes} classes, "
              f"{config.data.image_size}x{config.data.image_size}), {train.epochs} epochs x {train.steps_per_epoch} "
              f"steps of {train.batch_size} on {jax.device_count()} device(s), {schedule_text(train)}", flush=True)

    if config.eval.test_first and position.global_step == 0:
        validation = evaluate_split(run, state, "validation", stop)
        if validation is not None:  # when stopped, the first step boundary saves and leaves
            history["epochs"].append({"epoch": 0, "validation": validation})
            log_scalars(writer, "validation", validation, 0)
            print(f"before training: {summary_line(validation)}", flush=True)

    key_on_host = np.asarray(dropout_key)  # an input every process holds the same
    global_step, steps_this_run = position.global_step, 0
    grid_batch = None
    for epoch in range(position.epoch, train.epochs):
        epoch_started = time.time()
        attention_on, mining_on = loss_switches(train, epoch)
        step_in_epoch = position.step_in_epoch if epoch == position.epoch else 0
        progress = tqdm(total=train.steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{train.epochs}",
                        leave=False, disable=not run.is_main, dynamic_ncols=True)
        batches = prefetch_to_device(run.placement, train_batches(run, epoch, step_in_epoch, global_step))
        pending: list[tuple[dict, dict]] = []
        epoch_records = [r for r in history["steps"] if r["epoch"] == epoch + 1]  # from before a resume
        timed_from, timed_steps = None, 0  # steps per second: after the epoch's first step (compilation)

        while step_in_epoch < train.steps_per_epoch:
            if stop.signal_name or (stop_after and steps_this_run == stop_after):
                flush_step_metrics(run, manager, history, pending, writer)
                progress.close()
                reason = (f"interrupted by {stop.signal_name}" if stop.signal_name
                          else f"stopped after {stop_after} steps")
                return _finish_interrupted(run, manager, state, dropout_key,
                                           Position(epoch, step_in_epoch, global_step), history, reason, stop)
            batch = next(batches)
            dispatched = time.time()
            state, step_metrics = run.train_step(state, batch, key_on_host, global_step, attention_on,
                                                  mining_on)
            global_step += 1
            step_in_epoch += 1
            steps_this_run += 1
            pending.append(({"step": global_step, "epoch": epoch + 1, "attention": bool(attention_on),
                             "mining": bool(mining_on)}, step_metrics))
            if timed_from is None:
                if steps_this_run == 1:
                    jax.block_until_ready(step_metrics)
                    print(f"first train step (compile included): {time.time() - dispatched:.1f} s", flush=True)
                timed_from = time.time()
            else:
                timed_steps += 1
            progress.update(1)
            heatmap_due = log.heatmap_every and global_step % log.heatmap_every == 0
            if len(pending) >= log.log_every or heatmap_due or step_in_epoch == train.steps_per_epoch:
                epoch_records += flush_step_metrics(run, manager, history, pending, writer)
                means = step_means(epoch_records)
                progress.set_postfix({key: f"{means[key]:.4f}" for key in ("loss", "cl", "am")})
            if heatmap_due and log.num_heatmaps:
                grid_batch = grid_batch if grid_batch is not None else heatmap_batch(run)
                record_heatmaps(run, state, grid_batch, global_step, writer)
        train_seconds = time.time() - timed_from if timed_from is not None else float("nan")
        progress.close()

        validation = evaluate_split(run, state, "validation", stop)
        at_end_of_steps = Position(epoch, step_in_epoch, global_step)
        if validation is None:
            return _finish_interrupted(run, manager, state, dropout_key, at_end_of_steps, history,
                                       f"interrupted by {stop.signal_name}", stop)
        epoch_record = {"epoch": epoch + 1, "attention": bool(attention_on), "mining": bool(mining_on),
                        "train": step_means(epoch_records),
                        "validation": validation}
        if epoch + 1 == train.pretrain_epochs < train.epochs:
            # the baseline GAIN's attention mining starts from: the final report compares with it
            for split in final_splits(config)[1:]:
                result = evaluate_split(run, state, split, stop)
                if result is None:
                    return _finish_interrupted(run, manager, state, dropout_key, at_end_of_steps, history,
                                               f"interrupted by {stop.signal_name}", stop)
                epoch_record[split] = result
                log_scalars(writer, split, result, epoch + 1)
        epoch_record["seconds"] = time.time() - epoch_started
        epoch_record["steps_per_second"] = timed_steps / train_seconds if timed_steps and train_seconds > 0 else None
        history["epochs"].append(epoch_record)
        log_scalars(writer, "epoch_train", epoch_record["train"], epoch + 1)
        log_scalars(writer, "validation", validation, epoch + 1)
        if not log.heatmap_every and log.num_heatmaps:
            grid_batch = grid_batch if grid_batch is not None else heatmap_batch(run)
            record_heatmaps(run, state, grid_batch, global_step, writer)
        if (epoch + 1) % log.checkpoint_every == 0 or epoch + 1 == train.epochs:
            with stop.protect():  # the synchronous part (the commit goes on in the background)
                save_checkpoint(run, manager, state, dropout_key, Position(epoch + 1, 0, global_step))
        write_history(run, history)
        summary = epoch_record["train"]
        if run.is_main:
            print(f"epoch {epoch + 1}/{train.epochs}{phase_text(attention_on, mining_on)}: "
                  f"train loss {summary['loss']:.4f} (cl {summary['cl']:.4f}, am {summary['am']:.4f}) | "
                  f"validation {summary_line(validation)} | {epoch_record['seconds']:.1f} s", flush=True)

    final = {}
    for split in final_splits(config):
        if split == "validation" and history["epochs"] and "validation" in history["epochs"][-1]:
            final[split] = history["epochs"][-1]["validation"]
        else:
            result = evaluate_split(run, state, split, stop)
            if result is None:
                return _finish_interrupted(run, manager, state, dropout_key, Position(train.epochs, 0, global_step),
                                           history, f"interrupted by {stop.signal_name}", stop)
            final[split] = result
            log_scalars(writer, split, result, global_step)
    manager.wait_until_finished()
    history.update(status="finished", final=final, global_step=global_step)
    write_history(run, history)
    if run.is_main:
        print(report(run, history, time.time() - started, manager.latest_step()), flush=True)
    return state, history
