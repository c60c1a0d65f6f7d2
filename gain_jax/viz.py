"""Pictures of attention: jet heatmap overlays (as upstream's show_cam_on_image), grids, PNGs.

numpy + PIL only: runs wherever the core runs (no TF, no torch, no matplotlib needed).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# torchvision's ImageNet statistics: the normalization of the input pipeline and of upstream.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def jet(values: np.ndarray) -> np.ndarray:
    """The 'jet' colormap (blue -> cyan -> yellow -> red) of values in [0, 1], as float RGB in [0, 1]."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centers = np.array([3.0, 2.0, 1.0], np.float32)  # red, green, blue peak at x = 3/4, 1/2, 1/4
    return np.clip(1.5 - np.abs(4.0 * x - centers), 0.0, 1.0)


def denormalize(images: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Normalized float images [..., 3] back to uint8 RGB."""
    pixels = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)


def normalize(images_uint8: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """uint8 RGB [..., 3] to the network's float input."""
    pixels = np.asarray(images_uint8, np.float32) / 255.0
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend the jet colouring of `heatmap` ([H, W], values in [0, 1]) 0.5 / 0.5 with the image, then
    rescale so the brightest channel is 255 (upstream's show_cam_on_image). Returns uint8 [H, W, 3]."""
    colours = jet(heatmap) * 255.0
    blend = 0.5 * colours + 0.5 * np.asarray(image_uint8, np.float32)
    peak = blend.max()
    if peak > 0:
        blend = blend * (255.0 / peak)
    return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[str] | None = None, padding: int = 2,
         scale: int = 1, line_height: int = 12) -> np.ndarray:
    """Tile uint8 [H, W, 3] images (all one size, enlarged `scale` times by pixel repetition) row by row
    on a white canvas, with an optional caption above each row ("\n" separates its lines).
    Returns uint8 [H', W', 3]."""
    if not rows or not rows[0]:
        raise ValueError("grid needs at least one image")
    if captions is not None and len(captions) != len(rows):
        raise ValueError(f"{len(captions)} captions for {len(rows)} rows")
    height, width = (scale * n for n in np.asarray(rows[0][0]).shape[:2])
    columns = max(len(row) for row in rows)
    band = line_height * max(caption.count("\n") + 1 for caption in captions) if captions else 0
    row_height = band + height + padding
    canvas = np.full((padding + len(rows) * row_height, padding + columns * (width + padding), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        top = padding + r * row_height + band
        for c, image in enumerate(row):
            left = padding + c * (width + padding)
            canvas[top:top + height, left:left + width] = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    if captions:
        picture = Image.fromarray(canvas)
        draw = ImageDraw.Draw(picture)
        for r, caption in enumerate(captions):
            for line_number, line in enumerate(caption.split("\n")):
                draw.text((padding, padding + r * row_height + line_number * line_height), line, fill=(0, 0, 0))
        canvas = np.asarray(picture)
    return canvas


def attention_rows(images: np.ndarray, heatmaps: np.ndarray, masked_images: np.ndarray) -> list[list[np.ndarray]]:
    """One grid row per example: (input, heatmap overlay, masked image).

    images, masked_images: normalized float [B, H, W, 3]; heatmaps: [B, H, W] in [0, 1]."""
    rows = []
    for image, heatmap, masked in zip(images, heatmaps, masked_images):
        picture = denormalize(image)
        rows.append([picture, overlay(picture, heatmap), denormalize(masked)])
    return rows


def save_png(path: str, image_uint8: np.ndarray) -> None:
    """Write a PNG atomically (via a temporary name), so a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    Image.fromarray(np.asarray(image_uint8, np.uint8)).save(temporary, format="PNG")
    os.replace(temporary, path)


def prediction_captions(labels: np.ndarray, logits: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """One caption per image for a heatmap grid: its ground-truth classes, the class its attention map
    shows (the top-scoring one, attended in evaluation) and as many top predictions (with sigmoid
    probabilities) as it has labels."""
    probabilities = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    captions = []
    for row_labels, row_probabilities in zip(np.asarray(labels), probabilities):
        truth = [class_names[c] for c in np.flatnonzero(row_labels > 0)]
        top = np.argsort(-row_probabilities, kind="stable")[:max(1, len(truth))]
        predicted = [f"{class_names[c]} {row_probabilities[c]:.2f}" for c in top]
        captions.append(f"gt: {', '.join(truth)} | cam: {class_names[top[0]]}\npred: {', '.join(predicted)}")
    return captions
