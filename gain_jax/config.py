"""The configuration of a training run, single-sourced: dataclasses whose field metadata generates the
command-line flags, the `--help` text, the JSON layout of config.json and the checks.

    from gain_jax.config import Config, TrainConfig
    config = Config(train=TrainConfig(epochs=3)).validate()
    config_to_dict(config)          # {"gain": {...}, "data": {...}, "train": {...}, "eval": {...}, "log": {...}}

A `Config` has five sections: `gain` (`gain_jax.GainConfig`: what GAIN computes), `data`, `train`, `eval`
and `log`. Every field carries `metadata["help"]` and optional metadata ("choices", "range", "metavar",
"resume"), described and checked by gain_jax.fields, which GainConfig shares.
Flag names are the field names (`--lr`, `--sigma`): they are unique across sections.

No TensorFlow and no torch here: this module belongs to the core.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

from gain_jax.datasets import DATASETS
from gain_jax.fields import (
    MUST_MATCH,
    choice_names,
    field_problem,
    field_types,
    option,
    tuple_element,
    type_parts,
    type_problem,
)
from gain_jax.gain import GainConfig
from gain_jax.models import MODEL_NAMES, cam_layer_size, min_image_size
from gain_jax.training import SWEEP_STRATEGIES


class RunError(Exception):
    """A one-line reason why a run cannot go on, caused by its settings or its files (train.py prints it
    as `train.py: error: ...` and exits 1)."""


class RunInterrupted(Exception):
    """A stop signal arrived during the start-up, before anything was written (train.py exits 130)."""


class ConfigError(RunError, ValueError):
    """A setting that is invalid on its own; the message names the flag (`--sigma must be ...`)."""


def output_folder_problem(path: str) -> str | None:
    """Why `path` cannot be an output folder, as "<path>: <reason>" (None when it can): it must be a folder
    this process can write in, or one it can create. Creates nothing: a probe folder is made in the nearest
    existing ancestor and removed at once (os.access answers yes to root even on /proc)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is not a directory"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{path}: {existing} is not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gain_jax_write_probe_", dir=existing))
    except OSError as error:
        what = "write in" if existing == path else "create folders in"
        return f"{path}: cannot {what} {existing} ({error.strerror or error})"
    return None


# train.py's default GAIN settings (with DataConfig.ex_fraction 1.0: every training mask): the mask loss alone
# (GAIN_ext without attention mining), chosen at the default's own budget by experiments/biased_shapes.py
# --study default's rule: it beats the baseline on validation_unbiased mAP by the interval rule, L_am at 0.1 adds
# nothing the interval can tell from 0 (experiments/results/default/). Attention mining's settings are those
# chosen on gain_shapes' validation splits, so `--am_weight 0.1` gives the former default, GAIN_ext.
# `GainConfig()` itself keeps upstream's semantics (alpha 1, frozen BatchNorm in the attention-mining stream,
# softmax scores, no mask loss), which the parity suite pins.
BENCHMARK_GAIN = GainConfig(am_weight=0.0, am_batchnorm="batch", score="sigmoid", ex_weight=1.0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data set, where it is, and how training images are prepared."""

    dataset: str = option("gain_shapes", "tfds builder: the embedded synthetic sets (gain_shapes:3.0.0: its opt-in "
                          "version; gain_parts: the part-to-whole benchmark, a config after a slash), or VOC 2012 "
                          "from local files",
                          choices=DATASETS, resume=MUST_MATCH)
    data_dir: str | None = option(None, "tfds data dir (must exist; the prepared data set is written there). "
                                        "Default: tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR)")
    manual_dir: str | None = option(None, "gain_voc2012: folder with VOCtrainval_11-May-2012.tar or "
                                          "VOCdevkit/VOC2012")
    image_size: int | None = option(None, "square input size; default 64 for gain_shapes, 224 for gain_voc2012",
                                    range=(8, None), resume=MUST_MATCH)
    autoaugment: bool = option(False, "AutoAugment (torchvision's CIFAR10 policy, as upstream) + horizontal flip "
                                      "on training images", resume=MUST_MATCH)
    train_split: str = option("train", "split the run trains on (and whose size sets an epoch); "
                                       "gain_shapes:3.0.0's train_unbiased, with the cue independent of the classes, "
                                       "trains the oracle", resume=MUST_MATCH)
    ex_fraction: float = option(1.0, "fraction of training images whose masks feed the extra-supervision loss "
                                     "(GAIN_ext); selected per image from a hash of (seed, filename), the same "
                                     "in every epoch", range=(0.0, 1.0))
    ex_oversample: float = option(0.0, "share of the training examples drawn again, at random, from the images "
                                       "whose masks feed the mask loss (--ex_fraction's), so that few masks "
                                       "still come several to a batch; an epoch keeps its step count (it then "
                                       "reaches about 1 - share of the other images); 0 = off. With --ex_weight "
                                       "0: the same draws without the mask loss (a control)",
                                  range=(0.0, 0.99))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Model, initialization, optimizer and schedule."""

    backbone: str = option("small_cnn", "network: vgg16, vgg19, resnet18, resnet50, small_cnn, "
                           "small_cnn_nobn (small_cnn without BatchNorm) or small_cnn_fine (small_cnn without its "
                           "last max-pool: a Grad-CAM grid twice as fine, for gain_parts)",
                           choices=MODEL_NAMES, resume=MUST_MATCH)
    dropout: float = option(0.5, "dropout rate of the classifier head (VGG, small_cnn)", range=(0.0, None))
    init: str | None = option(None, "torchvision state dict (.pth) to start from, e.g. ImageNet VGG19 weights for "
                                    "upstream's fine-tuning; a final layer with another class count is "
                                    "re-initialized", metavar="PTH")
    lr: float = option(1e-3, "Adam learning rate (upstream: 1e-5 at batch size 1, 1e-4 for larger batches, "
                             "fine-tuning VGG19; the default suits small_cnn from scratch)", range=(0.0, None))
    batch_size: int = option(32, "global batch size, split over all devices", range=(1, None), resume=MUST_MATCH)
    epochs: int = option(6, "epochs in total, pre-training included", range=(1, None))
    steps_per_epoch: int | None = option(None, "train steps per epoch; default: one pass over the train split",
                                         range=(1, None))
    pretrain_epochs: int = option(2, "epochs of classification alone before attention mining (and GAIN_ext) "
                                     "switch on", range=(0, None))
    am_start_epoch: int = option(0, "epochs done before attention mining's loss (L_am) counts: from "
                                    "--pretrain_epochs to this, GAIN_ext's mask loss trains without it; 0 = "
                                    "with the mask loss, after --pretrain_epochs; else in [--pretrain_epochs, "
                                    "--epochs]. Those epochs, like pre-training, run a step compiled without "
                                    "the attention-mining stream (L_am recorded as nan)", range=(0, None))
    seed: int = option(0, "seed of initialization, dropout and data order", resume=MUST_MATCH)
    seeds: tuple[int, ...] | None = option(None, "train one run per seed (e.g. 0,1,2,3,4) together in one program, "
                                                 "instead of one run of --seed: each seed's run is the run "
                                                 "--seed would give (its own data order and folder "
                                                 "<run_name>_seed<k>, checkpoints, metrics), to float32 rounding; "
                                                 "union mode on one device", metavar="SEED[,SEED]")
    sweep_strategy: str = option("unrolled", "how --seeds runs the seeds' steps in one program: unrolled (N copies "
                                             "of the step side by side) or vmap (batched over the seeds; grouped "
                                             "convolutions, for GPUs)", choices=SWEEP_STRATEGIES)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What is evaluated, on how much, and the localization metrics' parameters."""

    test_first: bool = option(False, "evaluate on the validation split before training")
    test: bool = option(False, "also evaluate the test split(s) at the end (gain_shapes: test_unbiased); choose "
                               "configurations on the validation splits and look at test once")
    eval_examples: int = option(0, "evaluate on the first N examples of each split only (quick runs); "
                                   "0 = the whole split", range=(0, None))
    cam_threshold: float = option(0.5, "CAM mIoU: a pixel is background where the largest ground-truth class "
                                       "map is below this", range=(0.0, 1.0))
    pointing_tolerance: float | None = option(None, "pointing game tolerance in input pixels; default 15 px at "
                                                    "224 (the literature's), scaled to --image_size",
                                              range=(0.0, None))


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Where a run writes, and how often."""

    logdir: str = option("runs", "root of the run folders")
    run_name: str | None = option(None, "run folder name under --logdir; default <dataset>_<backbone>_<date-time>")
    checkpoint_dir: str | None = option(None, "default: <logdir>/<run_name>/checkpoints")
    checkpoint_every: int = option(1, "save a checkpoint every N epochs (and at the end)", range=(1, None))
    keep: int = option(3, "keep the newest N checkpoints", range=(1, None))
    heatmap_every: int = option(0, "record heatmap grids every N train steps; 0 = at the end of every epoch",
                                range=(0, None))
    num_heatmaps: int = option(8, "validation images per heatmap grid (at most --batch_size); 0 = none",
                               range=(0, None))
    log_every: int = option(10, "read the train steps' metrics back from the accelerator (and check them for "
                                "NaN) every N steps and at the end of each epoch, and write their mean to "
                                "TensorBoard (metrics.json keeps every step); 1 = after every step, which "
                                "makes the host wait for each step", range=(1, None))
    verbose: bool = option(False, "show TensorFlow's, absl's and tfds' logs and progress bars (hidden by default)")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole training run. `validate()` checks every value and returns the config."""

    gain: GainConfig = dataclasses.field(default_factory=lambda: BENCHMARK_GAIN)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def validate(self) -> Config:
        """Raise ConfigError naming the flag of the first invalid value; return self when all are valid."""
        for section in sections(self).values():
            hints = field_types(type(section))
            for field in dataclasses.fields(section):
                value = getattr(section, field.name)
                problem = type_problem(hints[field.name], value) or field_problem(field, value)
                if problem is not None:
                    raise ConfigError(f"--{field.name} {problem}")
        size, backbone = self.data.image_size, self.train.backbone
        if size is not None and size < min_image_size(backbone):
            raise ConfigError(f"--image_size {size} is too small for --backbone {backbone}: its Grad-CAM layer "
                              f"would be {cam_layer_size(backbone, size)} cells wide; use at least "
                              f"{min_image_size(backbone)}")
        if self.log.num_heatmaps > self.train.batch_size:
            raise ConfigError(f"--num_heatmaps {self.log.num_heatmaps} exceeds --batch_size {self.train.batch_size}")
        train = self.train
        if train.am_start_epoch and not train.pretrain_epochs <= train.am_start_epoch <= train.epochs:
            raise ConfigError(f"--am_start_epoch must be 0 or in [--pretrain_epochs {train.pretrain_epochs}, "
                              f"--epochs {train.epochs}], got {train.am_start_epoch}")
        # with --ex_weight 0 the same draws train no mask loss: the control of an oversampled GAIN_ext run
        if self.data.ex_oversample and self.data.ex_fraction == 0:
            raise ConfigError(f"--ex_oversample {self.data.ex_oversample} draws again from the images that "
                              f"--ex_fraction selects: it needs --ex_fraction > 0")
        if self.data.dataset == "gain_voc2012" and self.data.manual_dir is None and self.data.data_dir is None:
            raise ConfigError("gain_voc2012 needs --manual_dir (the VOC 2012 files) or a --data_dir where it is "
                              "prepared")
        check_seeds(self)
        return self


def check_seeds(config: Config) -> None:
    """--seeds: at least one, distinct, and union mode (per-label batches are packed on the host, each to its
    own shape, so they cannot be stacked over seeds); ConfigError naming the flags otherwise."""
    seeds = config.train.seeds
    if seeds is None:
        return
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must name at least one seed, each once, got {','.join(map(str, seeds))!r}")
    if config.gain.mode == "per_label":
        raise ConfigError("--seeds cannot train --mode per_label: its batches are packed per batch "
                          "(--am_labels_per_image included), which cannot be stacked over seeds")


SECTION_TYPES = {field.name: type(field.default_factory()) for field in dataclasses.fields(Config)}


def sections(config: Config) -> dict[str, Any]:
    """{section name: section dataclass} in declaration order."""
    return {name: getattr(config, name) for name in SECTION_TYPES}


def parse_numbers(text: str, kind: type = float) -> float | tuple[float, ...]:
    """"0" -> 0.0; "0.1,0.2,0.3" -> (0.1, 0.2, 0.3) (a number, or one per channel). With `kind` int, always a
    tuple: "0,1,2" -> (0, 1, 2), "3" -> (3,) (a list of integers such as --seeds)."""
    try:
        values = tuple(kind(part) for part in str(text).split(","))
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"expected one number or comma-separated {what}, got {text!r}") from None
    return values[0] if len(values) == 1 and kind is float else values


def _coerce(annotation, value):
    """A JSON value (or a flag string) as the field's type: lists become tuples, "0.1,0.2" numbers."""
    plain = type_parts(annotation)
    if value is None:
        return None
    if tuple in plain:
        if isinstance(value, str):
            return parse_numbers(value, tuple_element(annotation))
        if isinstance(value, (list, tuple)):
            return tuple(value)
    if float in plain and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------- dicts

def _to_json(value):
    return list(value) if isinstance(value, tuple) else value


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """{section: {field: value}}, JSON-ready (tuples as lists)."""
    return {name: {field.name: _to_json(getattr(section, field.name)) for field in dataclasses.fields(section)}
            for name, section in sections(config).items()}


def _section_of_field() -> dict[str, str]:
    owner = {}
    for section_name, section_type in SECTION_TYPES.items():
        for field in dataclasses.fields(section_type):
            owner[field.name] = section_name
    return owner


def _replace_section(section, changes: Mapping[str, Any]):
    """dataclasses.replace with GainConfig's own ValueErrors re-worded to name the flag."""
    try:
        return dataclasses.replace(section, **changes)
    except (TypeError, ValueError) as error:
        raise ConfigError(re.sub(r"\bGainConfig\.(\w+)", r"--\1", str(error)).splitlines()[0]) from None


def config_from_dict(payload: Mapping[str, Any], base: Config | None = None) -> Config:
    """A Config from `config_to_dict`'s layout (missing fields keep `base`'s values, default: the defaults).

    Also reads the flat layout of earlier config.json files ({"backbone": ..., "lr": ...}); other
    top-level keys (the derived facts of a run: class_names, device_count, ...) are ignored. An unknown
    key inside a section raises ConfigError. Does not validate: call `.validate()`.
    """
    config = base or Config()
    owner = _section_of_field()
    changes: dict[str, dict[str, Any]] = {name: {} for name in SECTION_TYPES}
    for key, value in payload.items():
        if key in SECTION_TYPES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"config section {key!r} must be a mapping, got {type(value).__name__}")
            known = {field.name for field in dataclasses.fields(SECTION_TYPES[key])}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"unknown setting {unknown[0]!r} in config section {key!r}; "
                                  f"known: {', '.join(sorted(known))}")
            changes[key].update(value)
        elif key in owner:  # the flat layout
            changes[owner[key]][key] = value
    updated = {}
    for name, section_changes in changes.items():
        section = getattr(config, name)
        hints = field_types(type(section))
        coerced = {key: _coerce(hints[key], value) for key, value in section_changes.items()}
        updated[name] = _replace_section(section, coerced) if coerced else section
    return Config(**updated)


def config_from_saved(payload: Mapping[str, Any]) -> Config:
    """A saved run's config (its config.json or a checkpoint's record), as `config_from_dict`, except that a
    `gain` field the record lacks (it was written before the field existed) takes `GainConfig()`'s value,
    the one that run trained with, not train.py's default (`BENCHMARK_GAIN`). Does not validate."""
    return config_from_dict(payload, Config(gain=GainConfig()))


def load_config(path: str) -> Config:
    """The config of a saved run (its config.json, read by `config_from_saved`), not validated."""
    try:
        with open(path) as handle:
            payload = json.load(handle)
    except OSError as error:
        raise ConfigError(f"--config {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"--config {path} is not JSON: {error}") from None
    if not isinstance(payload, Mapping):
        raise ConfigError(f"--config {path} holds no JSON object")
    return config_from_saved(payload)


# ---------------------------------------------------------------------------------------------- flags

def _numbers_flag(kind: type):
    def parse(text: str):
        try:
            return parse_numbers(text, kind)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = "numbers" if kind is float else "integers"  # argparse's "invalid <name> value"
    return parse


def _default_text(value) -> str:
    if isinstance(value, tuple):
        value = ",".join(f"{v:g}" for v in value)
    return str(value).replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, defaults: Config | None = None) -> None:
    """One flag per field of every section, in one argument group per section: `--name`, its help, its
    default (shown in the help; the parsed namespace holds only the flags given, see `config_from_flags`),
    its type, `choices` from the metadata, `--name/--no-name` for booleans."""
    defaults = defaults or Config()
    seen: dict[str, str] = {}
    for section_name, section in sections(defaults).items():
        group = parser.add_argument_group(section_name, (type(section).__doc__ or "").strip().split("\n")[0])
        hints = field_types(type(section))
        for field in dataclasses.fields(section):
            if field.name in seen:
                raise ValueError(f"flag --{field.name} of section {section_name!r} repeats one of section "
                                 f"{seen[field.name]!r}")
            seen[field.name] = section_name
            default = getattr(section, field.name)
            help_text = field.metadata.get("help", "(no help)").replace("%", "%%")
            if default is not None:
                help_text += f" (default: {_default_text(default)})"
            options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": field.name}
            plain = type_parts(hints[field.name])
            choices = field.metadata.get("choices")
            if plain == {bool}:
                options["action"] = argparse.BooleanOptionalAction
            elif tuple in plain:
                options["type"] = _numbers_flag(tuple_element(hints[field.name]))
                options["metavar"] = "X[,X,X]"
            else:
                options["type"] = next(iter(plain & {int, float}), str)
            if choices is not None:
                options["choices"] = choice_names(choices)
            if "metavar" in field.metadata:
                options["metavar"] = field.metadata["metavar"]
            group.add_argument(f"--{field.name}", **options)


def config_from_flags(args: argparse.Namespace, base: Config | None = None) -> Config:
    """`base` (default: the defaults) with the flags given on the command line applied, validated.

    `args` comes from a parser set up by `add_flags`: it holds exactly the flags that were given, so
    `python train.py --config runs/x/config.json --lr 1e-4` keeps everything of the file but lr.
    """
    given = vars(args)
    owner = _section_of_field()
    payload: dict[str, dict[str, Any]] = {}
    for key, value in given.items():
        if key in owner:
            payload.setdefault(owner[key], {})[key] = value
    return config_from_dict(payload, base).validate()


# ---------------------------------------------------------------------------------------------- resume

def must_match_fields() -> list[tuple[str, str]]:
    """(section, field) of every setting a resumed run must share with its checkpoint."""
    fields = []
    for section_name, section_type in SECTION_TYPES.items():
        for field in dataclasses.fields(section_type):
            if field.metadata.get("resume") == MUST_MATCH:
                fields.append((section_name, field.name))
    return fields


def resume_mismatches(saved: Mapping[str, Any], config: Config) -> list[tuple[str, Any, Any]]:
    """[(field, saved value, this run's value)] for the must-match settings that differ between a
    checkpoint's config (nested or the earlier flat layout) and `config`."""
    current, defaults = config_to_dict(config), config_to_dict(Config())
    mismatches = []
    for section_name, name in must_match_fields():
        if isinstance(saved.get(section_name), Mapping):
            # a setting added after the run was saved: the run had its default (e.g. train_split "train")
            section = {name: defaults[section_name][name], **saved[section_name]}
        else:
            section = saved
        if name in section and section[name] != current[section_name][name]:
            mismatches.append((name, section[name], current[section_name][name]))
    return mismatches


def setting_differences(before: Config, after: Config) -> list[tuple[str, Any, Any]]:
    """[(field, value in `before`, value in `after`)] for the settings that differ between two configs, other
    than where things are (the log section, data_dir, manual_dir)."""
    before_values, differences = config_to_dict(before), []
    for section_name, values in config_to_dict(after).items():
        if section_name == "log":
            continue
        for name, value in values.items():
            if name not in ("data_dir", "manual_dir") and before_values[section_name].get(name) != value:
                differences.append((name, before_values[section_name].get(name), value))
    return differences


def changed_settings(saved: Mapping[str, Any], config: Config) -> list[tuple[str, Any, Any]]:
    """`setting_differences` between a saved run's config (as `config_from_saved` reads it) and `config`:
    what a resumed run changes, e.g. when train.py's defaults changed since the run started."""
    try:
        before = config_from_saved(saved)
    except (ConfigError, TypeError, ValueError):
        return []  # an earlier layout: resume_mismatches has checked what must match
    return setting_differences(before, config)


def config_flags(config: Config, base: Config | None = None) -> list[str]:
    """The command-line flags that turn `base` (default: the defaults) into `config`, e.g. for printing
    the `train.py` command that reruns a run: ["--lr", "0.0001", "--autoaugment", ...]."""
    flags = []
    for name, section in sections(config).items():
        base_section = getattr(base or Config(), name)
        for field in dataclasses.fields(section):
            value, base_value = getattr(section, field.name), getattr(base_section, field.name)
            if value == base_value:
                continue
            if isinstance(value, bool):
                flags.append(f"--{field.name}" if value else f"--no-{field.name}")
            elif value is None:
                raise ValueError(f"--{field.name} cannot be set back to None by a flag")
            else:
                text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
                flags += [f"--{field.name}", text]
    return flags
