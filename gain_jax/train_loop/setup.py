"""A run's set-up: the config and the machine checked, the data set prepared, the model, steps and paths
built, the initial state; nothing written. Also the run folder's layout and config.json's record.

TensorFlow comes in through `gain_jax.data` (`data_package`), only here, once a run starts; torch (for
`train.init` .pth files) is imported before it: the other order crashes with some wheels.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from gain_jax.config import Config, ConfigError, RunError, config_to_dict, output_folder_problem
from gain_jax.convert import from_torchvision
from gain_jax.models import build_model
from gain_jax.train_loop import provenance
from gain_jax.train_loop.devices import Placement, data_parallel_placement
from gain_jax.train_loop.steps import make_loop_train_step
from gain_jax.training import TrainState, make_eval_step
from gain_jax.training import create_train_state as new_train_state
from gain_jax.viz import IMAGENET_MEAN, IMAGENET_STD  # the one alias of the normalization constants


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
    data set facts, model, compiled steps, device placement, paths and what produced the run. Holds no
    training state."""

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
    environment: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a run stands: `global_step` steps done, `step_in_epoch` of them in epoch index `epoch`."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def data_package():
    """gain_jax.data, imported on first use: it imports TensorFlow (after torch, see the module doc)."""
    import gain_jax.data as gd  # noqa: PLC0415  (TensorFlow: only once a run starts)

    return gd


def load_torch_state_dict(path: str) -> dict:
    """A .pth state dict as numpy arrays. Imports torch, which must happen before TensorFlow is imported."""
    import torch  # noqa: PLC0415  (only with train.init, and before gain_jax.data: TensorFlow)

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
    check_output_folders(config, workdir)
    if resume:
        check_run_exists(config, workdir)


def check_output_folders(config: Config, workdir: str | None = None) -> None:
    """The run folder (or --logdir and --run_name) and --checkpoint_dir are folders this process can write
    in, or ones it can create; RunError naming the flag otherwise."""
    folders = [(workdir, "the run folder")] if workdir is not None else [(config.log.logdir, "--logdir")]
    if workdir is None and config.log.run_name is not None:
        folders.append((os.path.join(config.log.logdir, config.log.run_name), "--run_name"))
    if config.log.checkpoint_dir is not None:
        folders.append((config.log.checkpoint_dir, "--checkpoint_dir"))
    for path, flag in folders:
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


def prepare_dataset(config: Config) -> dict[str, int]:
    """Build the tfds set if needed (which also checks the VOC files); {split: number of examples}."""
    gd = data_package()
    import tensorflow_datasets as tfds  # noqa: PLC0415  (loaded by gain_jax.data already)

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


def default_run_name(config: Config) -> str:
    """<dataset>_<backbone>_<date-time>: the run name of a run started without one."""
    return f"{config.data.dataset}_{config.train.backbone}_{time.strftime('%Y%m%d-%H%M%S')}"


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
        log = dataclasses.replace(config.log, run_name=default_run_name(config))
    else:
        log = config.log
    return dataclasses.replace(config, data=data, train=train, log=log)


def create_run(config: Config, workdir: str | None = None, *, resume: bool = False, like: Run | None = None) -> Run:
    """Check the config and the machine, prepare the data set and build everything a run needs; writes
    nothing (a fresh run refuses a checkpoint dir that already holds checkpoints). `like`: a run of the same
    data set, model and GAIN settings (another seed's) whose data set facts, model and compiled steps this
    one shares, so that they are prepared and compiled once.

    Raises:
      ConfigError / RunError: with a one-line message naming the flag or file at fault.
    """
    config.validate()
    check_environment(config, workdir, resume)
    if like is None:
        info = data_package().dataset_info(config.data.dataset)
        split_sizes = prepare_dataset(config)
        if config.data.train_split not in split_sizes:
            raise ConfigError(f"--train_split {config.data.train_split!r}: {config.data.dataset} has the splits "
                              f"{', '.join(sorted(split_sizes))}")
        config = resolve_config(config, info.image_size, split_sizes[config.data.train_split], workdir)
    else:
        config = resolve_config(config, like.config.data.image_size, like.split_sizes[config.data.train_split],
                                workdir)
    paths = run_paths(config, workdir)
    if not resume and holds_checkpoints(paths.checkpoint_dir):
        raise RunError(f"checkpoint dir {paths.checkpoint_dir} already holds checkpoints: pass --resume to "
                       f"continue that run, or choose another --run_name / --checkpoint_dir")
    if like is not None:
        return dataclasses.replace(like, config=config, paths=paths)
    tolerance = config.eval.pointing_tolerance
    model = build_model(config.train.backbone, num_classes=info.num_classes, dropout_rate=config.train.dropout)
    return Run(config=config, paths=paths, class_names=tuple(info.class_names), split_sizes=split_sizes,
               pointing_tolerance=tolerance if tolerance is not None else round(15 * config.data.image_size / 224),
               model=model, tx=optax.adam(config.train.lr), placement=data_parallel_placement(),
               train_step=make_loop_train_step(model, config.gain), eval_step=make_eval_step(model, config.gain),
               is_main=jax.process_index() == 0, environment=provenance.environment_record())


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
    """The resolved config by section, and what the run derived from the data and machine (a checkpoint's
    meta record holds this)."""
    return {**config_to_dict(run.config), "num_classes": run.num_classes, "class_names": list(run.class_names),
            "device_count": jax.device_count(), "process_count": jax.process_count(),
            "pointing_tolerance_px": run.pointing_tolerance, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD)}


def config_file_record(run: Run) -> dict:
    """config.json (and metrics.json's "config"): `run_record` and the library versions and git revision that
    produced the run ("environment")."""
    return {**run_record(run), "environment": dict(run.environment)}
