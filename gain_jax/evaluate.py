"""Evaluation of a GAIN model over a data set: loss terms, mAP, top-k accuracy, CAM mIoU and pointing game.

From a notebook:

    import gain_jax.data as gd
    from gain_jax.evaluate import evaluate
    batches = gd.input_pipeline("gain_shapes", "validation", batch_size=32, train=False)
    result = evaluate(model, state, batches, gain_cfg, class_names)     # state: a TrainState or variables
    result["mAP"], result["cam_mIoU"], result["cam_object_mIoU"], result["pointing_game"]
    result["floors"]["zero"]["cam_mIoU"]    # the same metric for an all-zero map (and "centre", "random")

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
CONFLICTING_KEY = "bias_conflicting"  # per-example bool some data sets carry (gain_shapes); stays on the host
CAM_KEYS = ("cam_mIoU", "cam_object_mIoU", "pointing_game")
RANDOM_FLOOR_SEED = 0  # the random floor of the batch starting at example n draws from default_rng([seed, n])


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


def _new_counts() -> dict:
    return {"intersection": 0, "union": 0, "hits": 0, "trials": 0}


def new_totals() -> dict:
    """Running sums of one evaluation (see `accumulate` and `summarize`). "cam" holds the CAM counts of
    the model's maps ("model"), of each floor of `metrics.FLOOR_NAMES` on the same images, and of the
    model on the bias-conflicting images ("conflicting"); "conflicting" the per-batch flags, when given."""
    return {"terms": dict.fromkeys(LOSS_KEYS, 0.0), "scores": [], "targets": [], "conflicting": [],
            "num_examples": 0,
            "cam": {name: _new_counts() for name in ("model", *metrics.FLOOR_NAMES, "conflicting")}}


def cam_counts(class_cams: np.ndarray, labels: np.ndarray, gt_masks: np.ndarray, num_classes: int,
               cam_threshold: float, pointing_tolerance: float) -> dict:
    """IoU counts (`metrics.iou_counts` of `metrics.cam_segmentation`) and pointing-game hits and trials
    of `[B, C, H, W]` maps against `[B, H, W]` masks."""
    predicted = metrics.cam_segmentation(class_cams, labels, cam_threshold)
    intersection, union = metrics.iou_counts(predicted, gt_masks, num_classes)
    hits, trials = metrics.pointing_game(class_cams, labels, gt_masks, pointing_tolerance)
    return {"intersection": intersection, "union": union, "hits": hits, "trials": trials}


def _add_counts(total: dict, counts: dict) -> dict:
    return {key: total[key] + counts[key] for key in total}


def accumulate(totals: dict, out: Mapping[str, Any], batch: Mapping[str, np.ndarray], valid: int,
               num_classes: int, cam_threshold: float, pointing_tolerance: float) -> dict:
    """Add one batch's eval-step output (host arrays; the first `valid` rows are real) to `totals`.

    The floors' maps are scored on the same images, masks, threshold and tolerance as the model's; the
    random floor of the batch whose first example is the split's n-th draws from
    `np.random.default_rng([RANDOM_FLOOR_SEED, n])` (the same figures on every run). When the batch has
    `CONFLICTING_KEY`, its flags are kept (for the classification metrics of that subset) and the model's
    maps are also scored on that subset.
    """
    terms = {key: totals["terms"][key] + float(out[key]) * valid for key in LOSS_KEYS}
    labels = np.asarray(batch["labels"])[:valid]
    updated = dict(totals, terms=terms, scores=totals["scores"] + [np.asarray(out["logits"])[:valid]],
                   targets=totals["targets"] + [labels], num_examples=totals["num_examples"] + valid)
    conflicting = None
    if CONFLICTING_KEY in batch:
        conflicting = np.asarray(batch[CONFLICTING_KEY], bool)[:valid]
        updated["conflicting"] = totals["conflicting"] + [conflicting]
    with_mask = np.asarray(batch["has_mask"], bool)[:valid]
    if with_mask.any():
        cams = np.asarray(out["class_cams"])[:valid][with_mask]
        gt_masks = np.asarray(batch["mask"])[:valid][with_mask]
        mask_labels = labels[with_mask]

        def score(maps, rows=slice(None)):
            return cam_counts(maps[rows], mask_labels[rows], gt_masks[rows], num_classes, cam_threshold,
                              pointing_tolerance)

        cam = dict(totals["cam"])
        cam["model"] = _add_counts(cam["model"], score(cams))
        rng = np.random.default_rng([RANDOM_FLOOR_SEED, totals["num_examples"]])
        for name in metrics.FLOOR_NAMES:
            cam[name] = _add_counts(cam[name], score(metrics.floor_maps(name, cams.shape, rng)))
        if conflicting is not None and conflicting[with_mask].any():
            cam["conflicting"] = _add_counts(cam["conflicting"], score(cams, conflicting[with_mask]))
        updated["cam"] = cam
    return updated


def _cam_summary(counts: dict) -> dict:
    """cam_mIoU, cam_object_mIoU and pointing_game of accumulated counts (nan without any trial)."""
    if not counts["trials"]:
        return dict.fromkeys(CAM_KEYS, float("nan"))
    return {"cam_mIoU": metrics.mean_iou(counts["intersection"], counts["union"]),
            "cam_object_mIoU": metrics.object_mean_iou(counts["intersection"], counts["union"]),
            "pointing_game": counts["hits"] / counts["trials"]}


def summarize(totals: dict, class_names: Sequence[str], cam_threshold: float, pointing_tolerance: float) -> dict:
    """The result of an evaluation: mean loss terms, num_examples, mAP, topk_accuracy, ap_per_class,
    cam_mIoU (VOC-style: background included), cam_object_mIoU (object classes only), iou_per_class,
    pointing_game (hits / trials), pointing_hits, pointing_trials, the parameters (cam_threshold,
    pointing_tolerance_px), and "floors": {floor: {cam_mIoU, cam_object_mIoU, pointing_game}} for each
    of `metrics.FLOOR_NAMES` on the same images. CAM metrics are nan without any mask.

    When the batches carried `CONFLICTING_KEY`: num_conflicting and, on that subset, mAP_conflicting,
    topk_accuracy_conflicting, cam_mIoU_conflicting, cam_object_mIoU_conflicting, pointing_game_conflicting
    (nan on an empty subset)."""
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
    model = totals["cam"]["model"]
    result.update(_cam_summary(model), pointing_hits=int(model["hits"]), pointing_trials=int(model["trials"]))
    if model["trials"]:
        ious = metrics.per_class_iou(model["intersection"], model["union"])
        result["iou_per_class"] = dict(zip(["background"] + list(class_names), ious.tolist()))
    result["floors"] = {name: _cam_summary(totals["cam"][name]) for name in metrics.FLOOR_NAMES}
    if totals["conflicting"]:
        conflicting = np.concatenate(totals["conflicting"])
        subset_scores, subset_targets = scores[conflicting], targets[conflicting]
        result["num_conflicting"] = int(conflicting.sum())
        result["mAP_conflicting"] = metrics.mean_average_precision(subset_scores, subset_targets)
        result["topk_accuracy_conflicting"] = metrics.topk_accuracy(subset_scores, subset_targets)
        result.update({f"{key}_conflicting": value
                       for key, value in _cam_summary(totals["cam"]["conflicting"]).items()})
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
        keys = BATCH_KEYS + ((CONFLICTING_KEY,) if CONFLICTING_KEY in batch else ())
        batch, valid = pad_to_multiple({key: np.asarray(batch[key]) for key in keys}, device_count)
        out = eval_step(state, to_device({key: batch[key] for key in BATCH_KEYS}))
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
