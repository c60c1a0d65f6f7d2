"""Evaluation metrics: classification (AP, mAP, top-k accuracy) and CAM localization (mIoU, pointing game).

Pure numpy on host arrays: the training loop fetches logits and class maps once per batch and
accumulates counts here, so nothing in this module is traced or compiled.

Conventions: `scores` and `targets` are `[N, C]` (targets multi-hot, any dtype, > 0 = positive);
`class_cams` are `[B, C, H, W]` maps in [0, 1] (min-max normalized Grad-CAM of every class);
`gt_masks` are `[B, H, W]` with VOC's encoding: 0 background, class index + 1, 255 ignored.

PxAP (`pixel_average_precision`, Choe et al., CVPR 2020): the threshold-free localization score, the area
under the pixel precision-recall curve of normalized maps against binary masks, pixels pooled over a set.

Floors: maps that know nothing of the image, scored by the same CAM metrics to tell a method from a blank
map (`zero_maps`, `centre_maps`, `random_maps`; `floor_maps` by name, `FLOOR_NAMES`).
"""
from __future__ import annotations

import numpy as np

IGNORE_LABEL = 255
FLOOR_NAMES = ("zero", "centre", "random")
CENTRE_SIGMA_FRACTION = 0.25  # the centre floor's Gaussian: sigma = this x the shorter image side


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """VOC 2010+ average precision of one class: area under the precision-recall curve of the
    ranking by `scores`, with precision made monotonically non-increasing (the VOC envelope).

    Ties keep the input order (stable sort), so the result does not depend on the sort algorithm.
    Returns nan when there is no positive (AP is undefined; `mean_average_precision` skips it).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(targets).reshape(-1) > 0
    num_positives = int(positives.sum())
    if num_positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(np.float64)
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / num_positives
    # Envelope: the best precision reachable at this recall or any higher one.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    recall_steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(recall_steps * envelope))


def average_precision_per_class(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """`[C]` APs; nan for classes with no positive example."""
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be [N, C]")
    return np.array([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean of the per-class APs over the classes that have at least one positive (nan if none do)."""
    aps = average_precision_per_class(scores, targets)
    valid = ~np.isnan(aps)
    return float(aps[valid].mean()) if valid.any() else float("nan")


def topk_hits(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Upstream's multi-label accuracy, per image: an image with n labels takes its top-n scored
    classes; the fraction of them that are labels (|top-n ∩ labels| / n). nan for images without labels.

    (Upstream compares the top-n list position by position with the sorted labels, which misses hits
    ranked out of class order; this counts the set intersection, the quantity it means to measure.)
    """
    scores = np.asarray(scores)
    positives = np.asarray(targets) > 0
    num_labels = positives.sum(axis=1)
    ranks = np.argsort(-scores, axis=1, kind="stable")
    out = np.full(scores.shape[0], np.nan)
    for i, n in enumerate(num_labels):
        if n > 0:
            out[i] = positives[i, ranks[i, :n]].sum() / n
    return out


def topk_accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean of `topk_hits` over the images that have at least one label."""
    hits = topk_hits(scores, targets)
    valid = ~np.isnan(hits)
    return float(hits[valid].mean()) if valid.any() else float("nan")


def topk_accuracy_vectorized(scores, targets):
    """`topk_accuracy` without a Python loop, for numpy or jax.numpy arrays (inside `jit` too: the train
    step's metric stays on the device): the same stable ranking; nan if no image has a label."""
    xp = scores.__array_namespace__()
    positives = targets > 0
    num_labels = positives.sum(axis=-1)
    ranks = xp.argsort(-scores, axis=-1, stable=True)
    ranked_positives = xp.take_along_axis(positives, ranks, axis=-1)
    within_top_n = xp.arange(scores.shape[-1]) < num_labels[:, None]
    hits = (ranked_positives & within_top_n).sum(axis=-1)
    labelled = num_labels > 0
    per_image = xp.where(labelled, hits / xp.maximum(num_labels, 1), 0.0)
    return xp.where(labelled.any(), per_image.sum() / xp.maximum(labelled.sum(), 1), xp.nan)


def cam_segmentation(class_cams: np.ndarray, targets: np.ndarray, threshold: float) -> np.ndarray:
    """Segmentation from class maps, `[B, H, W]` int in VOC encoding (0 background, class + 1).

    Each pixel takes the ground-truth class whose map is largest there; it is background where that
    largest value is below `threshold` (and everywhere in an image without labels).
    """
    class_cams = np.asarray(class_cams)
    positives = np.asarray(targets) > 0
    out = np.zeros((class_cams.shape[0],) + class_cams.shape[2:], np.int32)
    for b in range(class_cams.shape[0]):
        # Only the label classes compete (in class order, so a tie goes to the first): reading just
        # their maps keeps this cheap when there are many classes and few labels.
        label_classes = np.flatnonzero(positives[b])
        if label_classes.size == 0:
            continue
        candidate = class_cams[b, label_classes].astype(np.float32)
        best_class = label_classes[candidate.argmax(axis=0)]
        out[b] = np.where(candidate.max(axis=0) >= threshold, best_class + 1, 0)
    return out


def iou_counts(predicted: np.ndarray, gt_masks: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class intersection and union pixel counts, `[num_classes + 1]` each (index 0 = background),
    over the pixels whose ground truth is not `IGNORE_LABEL`. Sum them over a split, then `mean_iou`."""
    predicted = np.asarray(predicted).reshape(-1).astype(np.int64)
    gt = np.asarray(gt_masks).reshape(-1).astype(np.int64)
    keep = gt != IGNORE_LABEL
    predicted, gt = predicted[keep], gt[keep]
    if gt.size and gt.max() > num_classes:
        raise ValueError(f"mask value {gt.max()} is not a class (num_classes={num_classes}, ignore={IGNORE_LABEL})")
    size = num_classes + 1
    confusion = np.bincount(gt * size + predicted, minlength=size * size).reshape(size, size)
    intersection = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
    return intersection, union


def per_class_iou(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """IoU per class (background first); nan where the class appears in neither prediction nor truth."""
    intersection = np.asarray(intersection, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def mean_iou(intersection: np.ndarray, union: np.ndarray) -> float:
    """Mean IoU over background and the classes that appear (union > 0)."""
    ious = per_class_iou(intersection, union)
    valid = ~np.isnan(ious)
    return float(ious[valid].mean()) if valid.any() else float("nan")


def object_mean_iou(intersection: np.ndarray, union: np.ndarray) -> float:
    """Mean IoU over the object classes that appear (union > 0), background (index 0) left out: a map
    that marks nothing scores 0 here, while `mean_iou` still credits it with the background's IoU."""
    ious = per_class_iou(intersection, union)[1:]
    valid = ~np.isnan(ious)
    return float(ious[valid].mean()) if valid.any() else float("nan")


def zero_maps(shape: tuple) -> np.ndarray:
    """The all-zero floor, float32 `shape` ([B, C, H, W]): below any positive threshold, so every pixel
    is background; its maximum (for the pointing game) is the top-left pixel."""
    return np.zeros(shape, np.float32)


def centre_maps(shape: tuple, sigma_fraction: float = CENTRE_SIGMA_FRACTION) -> np.ndarray:
    """The centre-bias floor, float32 `shape` ([B, C, H, W]), read-only: every class's map is the same
    isotropic Gaussian centred on the image, peak 1 (at the centre pixel, the first of the central ones
    when a side is even), sigma = `sigma_fraction` x the shorter side (0.25: above 0.5 within ~0.29
    sides of the centre, about 27% of the image)."""
    *_, height, width = shape
    sigma = sigma_fraction * min(height, width)
    y = np.arange(height, dtype=np.float64) - (height - 1) / 2
    x = np.arange(width, dtype=np.float64) - (width - 1) / 2
    blob = np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2)).astype(np.float32)
    return np.broadcast_to(blob, shape)


def random_maps(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """The chance floor, float32 `shape` ([B, C, H, W]): independent uniform [0, 1) values per pixel and
    class, drawn from `rng` (pass a seeded `np.random.default_rng(...)` for reproducible figures)."""
    return rng.random(shape, dtype=np.float32)


def floor_maps(name: str, shape: tuple, rng: np.random.Generator | None = None) -> np.ndarray:
    """The floor `name` of `FLOOR_NAMES` ("random" needs `rng`)."""
    if name == "zero":
        return zero_maps(shape)
    if name == "centre":
        return centre_maps(shape)
    if name == "random":
        if rng is None:
            raise ValueError("the random floor needs a numpy Generator (rng)")
        return random_maps(shape, rng)
    raise ValueError(f"unknown floor {name!r}; floors: {FLOOR_NAMES}")


def pointing_game(class_cams: np.ndarray, targets: np.ndarray, gt_masks: np.ndarray,
                  tolerance: float) -> tuple[int, int]:
    """Pointing game (Zhang et al., 2016): for every ground-truth class of an image whose mask shows
    that class, the maximum of the class's map is a hit when a pixel of that class lies within
    `tolerance` pixels (Euclidean) of it. Returns (hits, trials); the hit rate is hits / trials.

    Classes absent from the mask (e.g. only ignore pixels) are no trial. Ties in the map take the
    first maximum in row-major order.
    """
    class_cams = np.asarray(class_cams)
    positives = np.asarray(targets) > 0
    gt_masks = np.asarray(gt_masks)
    width = class_cams.shape[-1]
    hits = trials = 0
    for b, c in zip(*np.nonzero(positives)):
        ys, xs = np.nonzero(gt_masks[b] == c + 1)
        if ys.size == 0:
            continue
        peak_y, peak_x = divmod(int(np.argmax(class_cams[b, c])), width)
        trials += 1
        hits += int(np.min((ys - peak_y) ** 2 + (xs - peak_x) ** 2) <= tolerance ** 2)
    return hits, trials


PXAP_THRESHOLD_STEP = 0.01  # Choe et al.'s default cam_curve_interval


def normalize_map(score_map: np.ndarray) -> np.ndarray:
    """Min-max normalization of one map to [0, 1] as Choe et al.'s `normalize_scoremap`: a constant map
    (or one with a nan) becomes all zeros, so it ranks no pixel above another."""
    score_map = np.asarray(score_map, dtype=np.float64)
    if np.isnan(score_map).any() or score_map.min() == score_map.max():
        return np.zeros_like(score_map)
    shifted = score_map - score_map.min()
    return shifted / shifted.max()


def pxap_thresholds(step: float = PXAP_THRESHOLD_STEP) -> np.ndarray:
    """The grid of PxAP: 0, step, 2 step, ... below 1, then 1 ("score >= 1" is the top bin)."""
    count = int(round(1.0 / step))
    return np.append(np.arange(count) * step, 1.0)


def pixel_score_counts(score_maps: np.ndarray, pixel_masks: np.ndarray,
                       step: float = PXAP_THRESHOLD_STEP) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts at or above each threshold of `pxap_thresholds(step)`: (positives, negatives), `[T]`
    each, for `[N, H, W]` maps (each min-max normalized here by `normalize_map`) against `[N, H, W]`
    masks (1 the object, 0 the rest, `IGNORE_LABEL` left out). Sum them over a set, then
    `pixel_average_precision_from_counts`.

    As in Choe et al.'s histograms: a pixel's score falls in a bin [t_k, t_k+1) of the grid (1.0 in the
    top bin), so scores within one bin tie."""
    score_maps = np.asarray(score_maps)
    pixel_masks = np.asarray(pixel_masks)
    if score_maps.shape != pixel_masks.shape or score_maps.ndim != 3:
        raise ValueError(f"score maps {score_maps.shape} and masks {pixel_masks.shape} must both be [N, H, W]")
    thresholds = pxap_thresholds(step)
    edges = np.append(thresholds, np.inf)
    positives = np.zeros(len(thresholds), np.int64)
    negatives = np.zeros(len(thresholds), np.int64)
    for score_map, mask in zip(score_maps, pixel_masks):
        normalized = normalize_map(score_map)
        for counts, value in ((positives, 1), (negatives, 0)):
            histogram, _ = np.histogram(normalized[mask == value], bins=edges)
            counts += np.cumsum(histogram[::-1])[::-1]  # at or above each threshold
    return positives, negatives


def pixel_average_precision_from_counts(positives: np.ndarray, negatives: np.ndarray) -> float:
    """PxAP of accumulated `pixel_score_counts`: sum over the thresholds, from the highest down, of the
    precision there times the recall gained there (Choe et al.'s MaskEvaluator.compute, without the
    x100): a step function, no interpolation and no precision envelope (unlike VOC's class AP).
    nan when no pixel is positive."""
    positives = np.asarray(positives, dtype=np.float64)[::-1]  # highest threshold first
    negatives = np.asarray(negatives, dtype=np.float64)[::-1]
    num_positives = positives[-1]  # at threshold 0: every pixel
    if num_positives == 0:
        return float("nan")
    predicted = positives + negatives
    recall = positives / num_positives
    recall_gain = np.diff(np.concatenate([[0.0], recall]))
    precision = np.divide(positives, predicted, out=np.zeros_like(positives), where=predicted > 0)
    return float(np.sum(precision * recall_gain))


def pixel_average_precision(score_maps: np.ndarray, pixel_masks: np.ndarray,
                            step: float = PXAP_THRESHOLD_STEP) -> float:
    """PxAP (Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020):
    the area under the pixel precision-recall curve of `[N, H, W]` score maps against `[N, H, W]` binary
    masks (1 object, 0 background, `IGNORE_LABEL` left out), each map min-max normalized to [0, 1], the
    pixel counts accumulated over all maps at the thresholds 0, step, ..., 1 (see `pixel_score_counts`).

    Threshold-free, unlike mIoU at a fixed CAM threshold: a perfect map scores 1, a constant map the
    prevalence of mask pixels (every pixel ties, so the only point is recall 1 at that precision)."""
    return pixel_average_precision_from_counts(*pixel_score_counts(score_maps, pixel_masks, step))


def class_pixel_maps(class_cams: np.ndarray, targets: np.ndarray, gt_masks: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The (map, binary mask) pairs PxAP scores on a multi-label set: one per (image, label class), the
    class's `[H, W]` map against its pixels (1 where the VOC mask is class + 1, 0 at the other classes and
    background, `IGNORE_LABEL` kept). Returns `[P, H, W]` maps and masks (P = number of labels)."""
    class_cams = np.asarray(class_cams)
    gt_masks = np.asarray(gt_masks)
    images, classes = np.nonzero(np.asarray(targets) > 0)
    masks = np.where(gt_masks[images] == IGNORE_LABEL, IGNORE_LABEL,
                     (gt_masks[images] == (classes + 1)[:, None, None]).astype(np.int64))
    return class_cams[images, classes], masks
