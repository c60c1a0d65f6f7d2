"""Evaluation of a GAIN model over a data set: loss terms, mAP, top-k accuracy, CAM mIoU and pointing game.

From a notebook:

    import gain_jax.data as gd
    from gain_jax.evaluate import evaluate
    batches = gd.input_pipeline("gain_shapes", "validation", batch_size=32, train=False)
    result = evaluate(model, state, batches, gain_cfg, class_names)     # state: a TrainState or variables
    result["mAP"], result["cam_mIoU"], result["pointing_game"]

or, compiling once for repeated use (big_vision's evaluator style):

    evaluator = Evaluator(model, gain_cfg, lambda: gd.input_pipeline(...), class_names)
    evaluator.run(state)

The jitted `gain_jax.make_eval_step(model, gain_cfg)` runs on the device; the metrics of `gain_jax.metrics`
accumulate on the host while the next batch is computed. No TensorFlow here.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from gain_jax import metrics
from gain_jax.gain import GainConfig
from gain_jax.training import TrainState, make_eval_step

LOSS_KEYS = ("loss", "cl", "am", "ex")
BATCH_KEYS = ("image", "labels", "mask", "has_mask")


def as_state(state_or_variables) -> TrainState:
    """A TrainState as the eval step takes it, from a TrainState or from model variables
    ({"params"[, "batch_stats"]}, e.g. `gain_jax.checkpoint.restore_variables`)."""
    if isinstance(state_or_variables, TrainState):
        return state_or_variables
    variables = state_or_variables
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}), opt_state=None, tx=None)


def pad_to_multiple(batch: Mapping[str, np.ndarray], multiple: int) -> tuple[dict, int]:
    """The batch with its row count rounded up to `multiple` by repeating its last row, and the number
    of real rows (several devices split a batch evenly)."""
    valid = len(batch["labels"])
    padded = -(-valid // multiple) * multiple
    if padded == valid:
        return dict(batch), valid
    return {key: np.concatenate([value, np.repeat(value[-1:], padded - valid, axis=0)])
            for key, value in batch.items()}, valid


def new_totals() -> dict:
    """Running sums of one evaluation (see `accumulate` and `summarize`)."""
    return {"terms": dict.fromkeys(LOSS_KEYS, 0.0), "scores": [], "targets": [], "num_examples": 0,
            "intersection": 0, "union": 0, "hits": 0, "trials": 0}


def accumulate(totals: dict, out: Mapping[str, Any], batch: Mapping[str, np.ndarray], valid: int,
               num_classes: int, cam_threshold: float, pointing_tolerance: float) -> dict:
    """Add one batch's eval-step output (host arrays; the first `valid` rows are real) to `totals`."""
    terms = {key: totals["terms"][key] + float(out[key]) * valid for key in LOSS_KEYS}
    labels = np.asarray(batch["labels"])[:valid]
    updated = dict(totals, terms=terms, scores=totals["scores"] + [np.asarray(out["logits"])[:valid]],
                   targets=totals["targets"] + [labels], num_examples=totals["num_examples"] + valid)
    with_mask = np.asarray(batch["has_mask"], bool)[:valid]
    if with_mask.any():
        cams = np.asarray(out["class_cams"])[:valid][with_mask]
        gt_masks = np.asarray(batch["mask"])[:valid][with_mask]
        predicted = metrics.cam_segmentation(cams, labels[with_mask], cam_threshold)
        intersection, union = metrics.iou_counts(predicted, gt_masks, num_classes)
        hits, trials = metrics.pointing_game(cams, labels[with_mask], gt_masks, pointing_tolerance)
        updated.update(intersection=totals["intersection"] + intersection, union=totals["union"] + union,
                       hits=totals["hits"] + hits, trials=totals["trials"] + trials)
    return updated


def summarize(totals: dict, class_names: Sequence[str], cam_threshold: float, pointing_tolerance: float) -> dict:
    """The result of an evaluation: mean loss terms, num_examples, mAP, topk_accuracy, ap_per_class,
    cam_mIoU, iou_per_class, pointing_game (hits / trials), pointing_hits, pointing_trials and the
    parameters (cam_threshold, pointing_tolerance_px). CAM metrics are nan without any mask."""
    count = totals["num_examples"]
    if not count:
        raise ValueError("no examples to evaluate")
    scores, targets = np.concatenate(totals["scores"]), np.concatenate(totals["targets"])
    result = {key: value / count for key, value in totals["terms"].items()}
    result.update(
        num_examples=count,
        mAP=metrics.mean_average_precision(scores, targets),
        topk_accuracy=metrics.topk_accuracy(scores, targets),
        ap_per_class=dict(zip(class_names, metrics.average_precision_per_class(scores, targets).tolist())),
        cam_threshold=cam_threshold,
        pointing_tolerance_px=pointing_tolerance,
    )
    if totals["trials"]:
        ious = metrics.per_class_iou(totals["intersection"], totals["union"])
        result.update(cam_mIoU=metrics.mean_iou(totals["intersection"], totals["union"]),
                      iou_per_class=dict(zip(["background"] + list(class_names), ious.tolist())),
                      pointing_game=totals["hits"] / totals["trials"], pointing_hits=int(totals["hits"]),
                      pointing_trials=int(totals["trials"]))
    else:
        result.update(cam_mIoU=float("nan"), pointing_game=float("nan"), pointing_hits=0, pointing_trials=0)
    return result


def evaluate_with_step(eval_step: Callable, state, batches: Iterable[Mapping[str, np.ndarray]],
                       class_names: Sequence[str], *, cam_threshold: float = 0.5, pointing_tolerance: float = 15.0,
                       to_device: Callable | None = None, to_host: Callable | None = None, device_count: int = 1,
                       should_stop: Callable[[], bool] | None = None) -> dict | None:
    """`evaluate` with a given compiled `eval_step(state, batch)` (`gain_jax.make_eval_step`).

    Args:
      to_device: host batch {"image", "labels", "mask", "has_mask"} -> device batch (default: jnp arrays on
        the default device); `gain_jax.train_loop` passes its data-parallel placement.
      to_host: device array -> numpy array of all its rows (default np.asarray).
      device_count: batches are padded to a multiple of it (a sharded batch splits evenly).
      should_stop: polled before each batch; when it returns True the evaluation stops and returns None.
    Returns:
      `summarize`'s dict, or None when stopped.
    """
    to_device = to_device or (lambda batch: {key: jnp.asarray(value) for key, value in batch.items()})
    to_host = to_host or np.asarray
    state = as_state(state)
    totals = new_totals()
    in_flight = None  # (device output, host batch, valid rows): read back after the next batch is dispatched

    def finish(flight, totals):
        out, batch, valid = flight
        host = {key: to_host(out[key]) for key in ("logits", "class_cams")}
        host.update({key: out[key] for key in LOSS_KEYS})
        return accumulate(totals, host, batch, valid, len(class_names), cam_threshold, pointing_tolerance)

    for batch in batches:
        if should_stop is not None and should_stop():
            return None
        batch, valid = pad_to_multiple({key: np.asarray(batch[key]) for key in BATCH_KEYS}, device_count)
        out = eval_step(state, to_device(batch))
        if in_flight is not None:
            totals = finish(in_flight, totals)
        in_flight = (out, batch, valid)
    if in_flight is not None:
        totals = finish(in_flight, totals)
    return summarize(totals, class_names, cam_threshold, pointing_tolerance)


def evaluate(model, state, batches: Iterable[Mapping[str, np.ndarray]], gain_cfg: GainConfig,
             class_names: Sequence[str], cam_threshold: float = 0.5, pointing_tolerance: float = 15.0, **options
             ) -> dict | None:
    """Evaluate `model` with `state` (a TrainState, or variables {"params"[, "batch_stats"]}) on `batches`
    (host dicts with "image" [B,H,W,3], "labels" [B,C], "mask" [B,H,W], "has_mask" [B]).

    The loss terms are those of GAIN in evaluation mode (the predicted class attended); the CAM metrics use
    every ground-truth class's CAM by `gain_cfg.cam` on the images that have a mask. `options` are those of
    `evaluate_with_step`. Compiles the eval step on each call: use `Evaluator` to evaluate repeatedly.
    """
    return evaluate_with_step(make_eval_step(model, gain_cfg), state, batches, class_names,
                              cam_threshold=cam_threshold, pointing_tolerance=pointing_tolerance, **options)


@dataclasses.dataclass
class Evaluator:
    """An evaluation to run again and again (after every epoch, say): `Evaluator(...).run(state)`.

    `batches` is called for a fresh iterable of host batches on every run.
    """

    model: Any
    gain_cfg: GainConfig
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]]
    class_names: Sequence[str]
    cam_threshold: float = 0.5
    pointing_tolerance: float = 15.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.eval_step = make_eval_step(self.model, self.gain_cfg)

    def run(self, state) -> dict | None:
        return evaluate_with_step(self.eval_step, state, self.batches(), self.class_names,
                                  cam_threshold=self.cam_threshold, pointing_tolerance=self.pointing_tolerance,
                                  **self.options)
