"""Part-versus-whole localization metrics: does a class map cover an object's body, or only its part?

For data sets whose objects have a small discriminative part on a larger body (the embedded "gain_parts",
gain_jax/data/parts.py), with per-pixel masks of the body (part excluded) and of the part. Pure numpy on host
arrays, like `gain_jax.metrics`; nothing here is traced.

Conventions: `maps` are `[B, H, W]`, one map per image (the label class's normalized CAM: `label_maps`), in
[0, 1]; `body_masks` and `part_masks` are `[B, H, W]`, > 0 on the region; `gt_masks` are VOC-encoded (0
background, class + 1, 255 ignored).

- `mass_shares`: the share of a map's mass (its sum) on the body and on the part, per image. A map that
  marks the part alone has part share near 1; one spread evenly over the object has body share
  body/(body + part) of the object's mass (about 1 - part_fraction).
- `region_hits`: how many of a region's pixels a map reaches at each threshold (pooled over images); body
  recall and part recall are hits / pixels. Recall across thresholds shows how far down the map's range the
  body comes in.
- whole-object PxAP (`gain_jax.metrics.pixel_average_precision`, pixels pooled over the set).
- `part_only_maps`: the floor a perfect part detector sets: its map is the part mask, or, at the resolution
  of a CAM grid (`cell`), the part mask averaged over each cell (what a coarse map that finds exactly the
  part's cells gives). A method that extends attention to the whole object must beat its body share, body
  recall and PxAP.
- `image_records`: the per-image counts of all of these (with the class's probability on the image and on the
  image with its part erased, when given), which `summarize_records` pools over a set or over resampled
  images (a bootstrap); `PartTotals` collects them over batches.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from gain_jax import metrics

RECALL_THRESHOLDS = tuple(np.round(np.arange(1, 10) * 0.1, 2))  # 0.1, 0.2, ..., 0.9


def label_maps(class_cams: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`[B, H, W]`: each image's map of its one label class from `[B, C, H, W]` maps and `[B, C]` labels
    (multi-hot; exactly one positive per image, as in gain_parts)."""
    class_cams, positives = np.asarray(class_cams), np.asarray(labels) > 0
    counts = positives.sum(axis=1)
    if class_cams.ndim != 4 or positives.shape != class_cams.shape[:2] or (counts != 1).any():
        raise ValueError(f"label_maps needs [B, C, H, W] maps and [B, C] labels with one label per image, got "
                         f"{class_cams.shape}, {positives.shape} with label counts {sorted(set(counts.tolist()))}")
    return class_cams[np.arange(len(class_cams)), np.argmax(positives, axis=1)]


def _check_shapes(maps, *masks) -> None:
    shapes = {np.shape(maps), *(np.shape(mask) for mask in masks)}
    if len(shapes) != 1 or np.ndim(maps) != 3:
        raise ValueError(f"maps and masks must all be [B, H, W], got {sorted(shapes)}")


def mass_shares(maps: np.ndarray, body_masks: np.ndarray, part_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(body share, part share), `[B]` each: the map's sum over the body (part excluded), over the part,
    divided by its sum over the image. nan for an all-zero map (it puts its mass nowhere)."""
    _check_shapes(maps, body_masks, part_masks)
    maps = np.asarray(maps, np.float64)
    total = maps.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        body = np.where(total > 0, (maps * (np.asarray(body_masks) > 0)).sum(axis=(1, 2)) / total, np.nan)
        part = np.where(total > 0, (maps * (np.asarray(part_masks) > 0)).sum(axis=(1, 2)) / total, np.nan)
    return body, part


def region_hits(maps: np.ndarray, region_masks: np.ndarray,
                thresholds=RECALL_THRESHOLDS) -> tuple[np.ndarray, int]:
    """(hits `[T]`, pixels): the number of region pixels whose map value is >= each threshold, and of region
    pixels, over all images. Recall at threshold t is hits / pixels."""
    _check_shapes(maps, region_masks)
    inside = np.asarray(region_masks) > 0
    values = np.asarray(maps)[inside]
    hits = np.array([(values >= threshold).sum() for threshold in thresholds], np.int64)
    return hits, int(inside.sum())


def part_only_maps(part_masks: np.ndarray, cell: int | None = None) -> np.ndarray:
    """The maps of a perfect part detector, float32 `[B, H, W]`: the part mask (1 on the part, 0 elsewhere);
    with `cell`, the part mask averaged over each `cell` x `cell` block (H and W multiples of `cell`), spread
    back over the block and scaled to a maximum of 1 per image: a map at a CAM grid's resolution that finds
    the part's cells and nothing else."""
    part = (np.asarray(part_masks) > 0).astype(np.float32)
    if cell is None:
        return part
    batch, height, width = part.shape
    if height % cell or width % cell:
        raise ValueError(f"part_only_maps: cell {cell} does not divide the masks' {height}x{width}")
    blocks = part.reshape(batch, height // cell, cell, width // cell, cell).mean(axis=(2, 4))
    peak = blocks.max(axis=(1, 2), keepdims=True)
    blocks = np.divide(blocks, peak, out=np.zeros_like(blocks), where=peak > 0)
    return np.repeat(np.repeat(blocks, cell, axis=1), cell, axis=2)


def image_records(maps, body_masks, part_masks, gt_masks, thresholds=RECALL_THRESHOLDS, p_image=None,
                  p_part_erased=None) -> dict:
    """The metrics' per-image counts of one batch (what a bootstrap over images resamples; `summarize_records`
    pools them): "body_share", "part_share" `[B]` (nan for an all-zero map), "body_hits", "part_hits" `[B, T]`
    (region pixels at or above each threshold), "body_pixels", "part_pixels" `[B]`, "pxap_positives",
    "pxap_negatives" `[B, T']` (`gain_jax.metrics.pixel_score_counts` of the whole object, body and part,
    against the rest, the ignore ring left out), and "p_image", "p_part_erased" `[B]` when given."""
    maps = np.asarray(maps)
    body_share, part_share = mass_shares(maps, body_masks, part_masks)
    gt_masks = np.asarray(gt_masks)
    whole = np.where(gt_masks == metrics.IGNORE_LABEL, metrics.IGNORE_LABEL, (gt_masks > 0).astype(np.int64))
    records = {key: [] for key in ("body_hits", "body_pixels", "part_hits", "part_pixels", "pxap_positives",
                                   "pxap_negatives")}
    for row in range(len(maps)):
        image = slice(row, row + 1)
        for region, masks in (("body", body_masks), ("part", part_masks)):
            hits, pixels = region_hits(maps[image], np.asarray(masks)[image], thresholds)
            records[f"{region}_hits"].append(hits)
            records[f"{region}_pixels"].append(pixels)
        positives, negatives = metrics.pixel_score_counts(maps[image], whole[image])
        records["pxap_positives"].append(positives)
        records["pxap_negatives"].append(negatives)
    records = {key: np.stack(values) for key, values in records.items()}
    records.update(body_share=body_share, part_share=part_share)
    for key, values in (("p_image", p_image), ("p_part_erased", p_part_erased)):
        if values is not None:
            records[key] = np.asarray(values, np.float64)
    return records


def concatenate_records(batches) -> dict:
    """One record dict from the `image_records` of several batches (the keys every batch has)."""
    batches = list(batches)
    if not batches:
        raise ValueError("no batch added")
    keys = [key for key in batches[0] if all(key in batch for batch in batches)]
    return {key: np.concatenate([batch[key] for batch in batches]) for key in keys}


def summarize_records(records: dict, thresholds=RECALL_THRESHOLDS, rows=None) -> dict:
    """Pool `image_records` (of the images `rows`, all by default): body_share, part_share (means over images
    with a nonzero map, and their count `num_maps`), body_recall and part_recall {threshold: recall}, their
    means over the thresholds (body_recall_mean, part_recall_mean), PxAP of the whole object, and with the
    probabilities: p_image, p_part_erased (means) and p_kept_without_part (mean p_part_erased / mean p_image)."""
    if rows is not None:
        records = {key: values[rows] for key, values in records.items()}
    body, part = records["body_share"], records["part_share"]
    nonzero = ~np.isnan(body)
    body_recall = records["body_hits"].sum(axis=0) / max(int(records["body_pixels"].sum()), 1)
    part_recall = records["part_hits"].sum(axis=0) / max(int(records["part_pixels"].sum()), 1)
    result = {
        "num_images": int(len(body)), "num_maps": int(nonzero.sum()),
        "body_share": float(body[nonzero].mean()) if nonzero.any() else float("nan"),
        "part_share": float(part[nonzero].mean()) if nonzero.any() else float("nan"),
        "body_recall": dict(zip(map(float, thresholds), body_recall.tolist())),
        "part_recall": dict(zip(map(float, thresholds), part_recall.tolist())),
        "body_recall_mean": float(body_recall.mean()), "part_recall_mean": float(part_recall.mean()),
        "pxap": metrics.pixel_average_precision_from_counts(records["pxap_positives"].sum(axis=0),
                                                            records["pxap_negatives"].sum(axis=0)),
    }
    if "p_image" in records:
        result["p_image"] = float(records["p_image"].mean())
    if "p_part_erased" in records:
        result["p_part_erased"] = float(records["p_part_erased"].mean())
    if "p_image" in records and "p_part_erased" in records:
        result["p_kept_without_part"] = result["p_part_erased"] / result["p_image"]
    return result


@dataclasses.dataclass
class PartTotals:
    """The per-image records of batches (`add`), pooled by `summarize`."""

    thresholds: tuple = RECALL_THRESHOLDS
    batches: list = dataclasses.field(default_factory=list)

    def add(self, maps, body_masks, part_masks, gt_masks, p_image=None, p_part_erased=None) -> PartTotals:
        """One batch: `[B, H, W]` label maps, body, part and VOC-encoded masks; optionally `[B]` probabilities
        of the label class on the image and on the image with the part erased. Returns self."""
        self.batches.append(image_records(maps, body_masks, part_masks, gt_masks, self.thresholds, p_image,
                                          p_part_erased))
        return self

    def records(self) -> dict:
        """The batches' `image_records`, concatenated."""
        return concatenate_records(self.batches)

    def summarize(self) -> dict:
        """`summarize_records` of every image added."""
        return summarize_records(self.records(), self.thresholds)
