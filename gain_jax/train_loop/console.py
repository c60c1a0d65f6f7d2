"""What a run prints: its first line, progress (a bar on a terminal, plain lines in a log file), the epoch
lines and the closing report. Process 0 prints; the others stay silent."""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm

from gain_jax import metrics
from gain_jax.config import Config
from gain_jax.train_loop import reference
from gain_jax.train_loop.setup import Run
from gain_jax.train_loop.steps import schedule_text, trained_terms

PLAIN_LINES_PER_EPOCH = 10  # without a terminal: about this many progress lines per epoch


def is_terminal() -> bool:
    """Whether stderr (where progress bars go) is a terminal: bars there, plain lines in a log file."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def method_name(config: Config) -> str:
    """What the run trains, from its loss weights and schedule: GAIN_ext (L_cl + L_am + L_ext), GAIN
    (L_cl + L_am), the mask loss alone (L_cl + L_ext) or the classification baseline."""
    terms = trained_terms(config)
    if "am" in terms:
        return f"{'GAIN_ext' if 'ex' in terms else 'GAIN'} ({config.gain.mode})"
    if "ex" in terms:
        return f"mask loss alone, L_cl + L_ext ({config.gain.mode})"
    return "classification baseline (no attention loss)"


def shown_terms(config: Config, means: Mapping[str, float]) -> tuple[str, ...]:
    """The terms the run trains that these means have: L_am is not computed in the epochs where it weighs 0."""
    return tuple(key for key in trained_terms(config) if not math.isnan(means[key]))


def loss_text(config: Config, means: Mapping[str, float]) -> str:
    """The total loss and each trained term computed: "loss 0.1234 (cl 0.1000, am 0.0200, ex 0.0034)"."""
    terms = ", ".join(f"{key} {means[key]:.4f}" for key in shown_terms(config, means))
    return f"loss {means['loss']:.4f}" + (f" ({terms})" if terms else "")


def first_line(run: Run, device_count: int) -> str:
    config, train = run.config, run.config.train
    return (f"run {run.paths.run_dir}: {method_name(config)}, {train.backbone} on {config.data.dataset} "
            f"({run.num_classes} classes, {config.data.image_size}x{config.data.image_size}), {train.epochs} "
            f"epochs x {train.steps_per_epoch} steps of {train.batch_size} on {device_count} device(s), "
            f"{schedule_text(config)}")


def sweep_line(runs) -> str:
    """A seed sweep's second line: which seeds train together, how, and where each run's folder is."""
    train = runs[0].config.train
    seeds = ",".join(str(run.config.train.seed) for run in runs)
    folders = ", ".join(run.paths.run_dir for run in runs[1:])
    return (f"seed sweep: {len(runs)} runs trained together (--seeds {seeds}, --sweep_strategy {train.sweep_strategy}),"
            f" each the run its --seed gives; the others in {folders}")


class Progress:
    """An epoch's progress: a tqdm bar when stderr is a terminal, else a plain line on stdout about every
    tenth of the epoch (at the read-backs, when the losses are known)."""

    def __init__(self, run: Run, epoch: int, done: int):
        self._run, self._epoch, self._done = run, epoch, done
        train = run.config.train
        self._bar = None
        if run.is_main and is_terminal():
            self._bar = tqdm(total=train.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{train.epochs}",
                             leave=False, dynamic_ncols=True)
        self._every = max(1, train.steps_per_epoch // PLAIN_LINES_PER_EPOCH)
        self._first = self._last_line = done
        self._started = time.time()

    def step(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self._done == self._first + 1:  # the rate counts from here: the first step compiles
            self._last_line, self._started = self._done, time.time()

    def show(self, means: Mapping[str, float]) -> None:
        """The epoch's mean losses so far (at a read-back)."""
        config = self._run.config
        if self._bar is not None:
            self._bar.set_postfix({key: f"{means[key]:.4f}" for key in ("loss",) + shown_terms(config, means)})
            return
        steps = config.train.steps_per_epoch
        if not self._run.is_main or self._done - self._last_line < self._every or self._done == steps:
            return  # the epoch line follows the last step
        rate = (self._done - self._last_line) / max(time.time() - self._started, 1e-9)
        print(f"epoch {self._epoch + 1}/{config.train.epochs} step {self._done}/{steps}: "
              f"{loss_text(config, means)}, {rate:.2f} steps/s", flush=True)
        self._last_line, self._started = self._done, time.time()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def summary_line(result: Mapping[str, Any]) -> str:
    return (f"mAP {result['mAP']:.3f}, top-k acc {result['topk_accuracy']:.3f}, "
            f"CAM mIoU {result['cam_mIoU']:.3f} (objects {result.get('cam_object_mIoU', math.nan):.3f}), "
            f"pointing {result['pointing_game']:.3f}")


def epoch_line(config: Config, record: Mapping[str, Any], phase: str) -> str:
    return (f"epoch {record['epoch']}/{config.train.epochs}{phase}: train {loss_text(config, record['train'])} | "
            f"validation {summary_line(record['validation'])} | {record['seconds']:.1f} s")


def floors_line(split: str, result: Mapping[str, Any], width: int) -> str | None:
    """The split's floors (`gain_jax.metrics.FLOOR_NAMES`) in one line, None for a result without them."""
    floors = result.get("floors")
    if not floors:
        return None
    names = [name for name in metrics.FLOOR_NAMES if name in floors]
    figures = ", ".join(f"{label} " + "/".join(f"{floors[name][key]:.3f}" for name in names)
                        for label, key in (("mIoU", "cam_mIoU"), ("object mIoU", "cam_object_mIoU"),
                                           ("pointing", "pointing_game")))
    return f"  {split:<{width}} {figures}"  # the space: a split name as wide as `width` still stands apart


def _table(run: Run, rows: list[tuple[str, Mapping[str, Any]]], width: int) -> list[str]:
    pointing_header = f"pointing (±{run.pointing_tolerance:g}px)"
    conflicting = any("mAP_conflicting" in result for _, result in rows)
    lines = [f"{'split':<{width}}{'mAP':>7}{'top-k acc':>11}{f'CAM mIoU@{run.config.eval.cam_threshold:g}':>15}"
             f"{'object mIoU':>13}{pointing_header:>22}" + (f"{'mAP conflicting':>18}" if conflicting else "")]
    for name, result in rows:
        pointing = f"{result['pointing_game']:.3f}" + (f" ({result['pointing_hits']}/{result['pointing_trials']})"
                                                        if "pointing_hits" in result else "")
        line = (f"{name:<{width}}{result['mAP']:>7.3f}{result['topk_accuracy']:>11.3f}"
                f"{result['cam_mIoU']:>15.3f}{result.get('cam_object_mIoU', math.nan):>13.3f}{pointing:>22}")
        if "mAP_conflicting" in result:
            subset = f"{result['mAP_conflicting']:.3f}" + (f" (n={result['num_conflicting']})"
                                                            if "num_conflicting" in result else "")
            line += f"{subset:>18}"
        lines.append(line)
    return lines


def report(run: Run, history: Mapping[str, Any], seconds: float, latest_checkpoint: int | None,
           label: str = "") -> str:
    """The closing table: every final split, beside the classification-only baseline trained as long when the
    run's data and budget are train.py's defaults (`reference.baseline_trained_as_long`), else beside the run's
    own pre-training epochs, said to be no fair comparison. `label` starts its title (a seed sweep's "seed k: ")."""
    config = run.config
    train, dataset = config.train, config.data.dataset
    lines = [f"\n{label}{method_name(config)} on {dataset}, {train.backbone}, {train.epochs} epochs "
             f"({train.pretrain_epochs} classification-only), {seconds:.0f} s"]
    rows, notes = [], []
    baseline = reference.baseline_trained_as_long(config)
    pretrained = next((r for r in history["epochs"] if r["epoch"] == train.pretrain_epochs), None)
    if baseline is not None:
        rows += [(f"{split} (baseline)", baseline[split]) for split in history["final"] if split in baseline]
        notes.append(f"(baseline: classification only, trained as long on the same data, mean over seeds "
                     f"{','.join(map(str, reference.SEEDS))}: {reference.SOURCE}; the other rows: this run)")
    elif pretrained is not None and train.pretrain_epochs < train.epochs:
        rows += [(f"{split} (pre-trained)", pretrained[split]) for split in history["final"] if split in pretrained]
        notes.append(f"(pre-trained: after epoch {train.pretrain_epochs} of {train.epochs}, classification only; not "
                     f"a fair baseline: train one as long with --am_weight 0 --ex_weight 0 --pretrain_epochs "
                     f"{train.epochs})")
    rows += list(history["final"].items())
    width = max(len(name) for name, _ in rows) + 2
    lines += _table(run, rows, width)
    lines += notes
    if any("mAP_conflicting" in result for _, result in rows):
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
