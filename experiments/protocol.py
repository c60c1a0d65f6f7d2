"""Evaluation records of trained runs for issue 20's protocol (experiments/biased_shapes.py's `select` and
`test` commands, experiments/probes/budget_curve.py): a run's checkpoint restored and evaluated on one split,
keeping what the intervals need per image.

    records = split_records(model, variables, gain_cfg, batches, num_classes)
    summary = summarize_records(records, cam_threshold=0.35)          # mAP, PxAP, CAM mIoU at that threshold
    stats.bootstrap_interval(map_statistic(records), len(records["scores"]), seed=0)

Records: "scores"/"targets" [N, C] (mAP), "conflicting" [N] (gain_shapes' bias-conflicting flag),
"pxap_positives"/"pxap_negatives" [N, T] (per image, summed over its label classes: PxAP pools them),
"iou" {threshold: counts of `gain_jax.evaluate.cam_counts` summed over the split} for CAM_THRESHOLDS.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np

from gain_jax import metrics
from gain_jax.evaluate import BATCH_KEYS, CONFLICTING_KEY, as_state, cam_counts

CAM_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 ... 0.95: the grid chosen on
POINTING_TOLERANCE = 15.0  # pixels, as train.py's evaluation


def split_records(model, variables, gain_cfg, batches: Iterable[Mapping[str, np.ndarray]], num_classes: int,
                  thresholds=CAM_THRESHOLDS, pointing_tolerance: float = POINTING_TOLERANCE) -> dict:
    """Evaluate `variables` on `batches` (host batches of `gain_jax.data.input_pipeline`, train=False)."""
    import jax.numpy as jnp

    from gain_jax.training import make_eval_step

    eval_step = make_eval_step(model, gain_cfg)
    state = as_state(variables)
    scores, targets, conflicting, positives, negatives = [], [], [], [], []
    iou = {threshold: None for threshold in thresholds}
    for batch in batches:
        out = eval_step(state, {key: jnp.asarray(np.asarray(batch[key])) for key in BATCH_KEYS})
        labels = np.asarray(batch["labels"])
        scores.append(np.asarray(out["logits"]))
        targets.append(labels)
        if CONFLICTING_KEY in batch:
            conflicting.append(np.asarray(batch[CONFLICTING_KEY], bool))
        cams, gt_masks = np.asarray(out["class_cams"]), np.asarray(batch["mask"])
        for row in range(len(labels)):  # PxAP counts per image: the bootstrap resamples images
            maps, masks = metrics.class_pixel_maps(cams[row:row + 1], labels[row:row + 1], gt_masks[row:row + 1])
            counts = metrics.pixel_score_counts(maps, masks)
            positives.append(counts[0])
            negatives.append(counts[1])
        for threshold in thresholds:
            counts = cam_counts(cams, labels, gt_masks, num_classes, threshold, pointing_tolerance)
            iou[threshold] = counts if iou[threshold] is None else {k: iou[threshold][k] + counts[k] for k in counts}
    if not scores:
        raise ValueError("no examples to evaluate")
    return {"scores": np.concatenate(scores), "targets": np.concatenate(targets),
            "conflicting": np.concatenate(conflicting) if conflicting else None,
            "pxap_positives": np.stack(positives), "pxap_negatives": np.stack(negatives), "iou": iou}


def cam_miou_by_threshold(records: dict) -> dict:
    """{threshold: CAM mIoU (background included, as train.py reports)} over the records' grid."""
    return {threshold: metrics.mean_iou(counts["intersection"], counts["union"])
            for threshold, counts in records["iou"].items()}


def summarize_records(records: dict, cam_threshold: float) -> dict:
    """mAP, mAP of the bias-conflicting images, PxAP, and at `cam_threshold` (one of the records' grid):
    CAM mIoU, CAM object mIoU, pointing game."""
    if cam_threshold not in records["iou"]:
        raise ValueError(f"threshold {cam_threshold} not in the evaluated grid {sorted(records['iou'])}")
    counts = records["iou"][cam_threshold]
    out = {"num_examples": int(len(records["scores"])),
           "mAP": metrics.mean_average_precision(records["scores"], records["targets"]),
           "PxAP": metrics.pixel_average_precision_from_counts(records["pxap_positives"].sum(0),
                                                               records["pxap_negatives"].sum(0)),
           "cam_threshold": float(cam_threshold),
           "cam_mIoU": metrics.mean_iou(counts["intersection"], counts["union"]),
           "cam_object_mIoU": metrics.object_mean_iou(counts["intersection"], counts["union"]),
           "pointing_game": counts["hits"] / counts["trials"] if counts["trials"] else float("nan")}
    if records["conflicting"] is not None:
        subset = records["conflicting"]
        out["num_conflicting"] = int(subset.sum())
        out["mAP_conflicting"] = (metrics.mean_average_precision(records["scores"][subset], records["targets"][subset])
                                  if subset.any() else float("nan"))
    return out


def map_statistic(records: dict):
    """mAP of the resampled images (for `gain_jax.stats.bootstrap_interval`)."""
    return lambda rows: metrics.mean_average_precision(records["scores"][rows], records["targets"][rows])


def pxap_statistic(records: dict):
    """PxAP of the resampled images' pooled pixel counts."""
    return lambda rows: metrics.pixel_average_precision_from_counts(records["pxap_positives"][rows].sum(0),
                                                                    records["pxap_negatives"][rows].sum(0))


def restore_run(run_dir: str, step: int | None = None) -> tuple[dict, int]:
    """(variables, step) of a run's checkpoint `step` (None: the newest) under <run_dir>/checkpoints."""
    from gain_jax import checkpoint

    directory = os.path.join(run_dir, "checkpoints")
    manager = checkpoint.open_manager(directory, create=False) if os.path.isdir(directory) else None
    steps = sorted(manager.all_steps()) if manager is not None else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint step {step} in {directory} (steps: {steps})")
    return checkpoint.restore_variables(manager, step), step


def checkpoint_steps(run_dir: str) -> list[int]:
    """The saved steps of a run, oldest first."""
    from gain_jax import checkpoint

    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(checkpoint.open_manager(directory, create=False).all_steps())
