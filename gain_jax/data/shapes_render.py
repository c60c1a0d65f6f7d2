"""The numpy renderer of "gain_shapes" images, one `Design` per data-set version (no TensorFlow, no tfds: the
builder in `gain_jax.data.shapes` wraps it, and probes can load this file alone).

Two designs of the bias cue:
    "background" (2.0.0): the whole background is a faint two-colour texture, class k's own texture k with
        probability bias_probability for the image's first object. Erasing any local region leaves the cue.
    "patch" (3.0.0): a plain noisy background; every object brings a small square cue patch of a texture,
        elsewhere in the image, its own class's texture with probability bias_probability (in the unbiased
        splits any texture, independent of the classes). A local cue: erasing the patch removes it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring", "diamond")
TEXTURE_NAMES = ("horizontal_stripes", "vertical_fine_stripes", "diagonal_stripes", "checkers", "dots",
                 "pixel_noise")  # texture k is the "own" cue of class k
IMAGE_SIZE = 64
IGNORE = 255
BASE_SEED = 20180301
SPLIT_SEEDS = {"train": 0, "validation": 1, "test_unbiased": 2, "validation_unbiased": 3, "train_unbiased": 4}
BIASED_SPLITS = ("train", "validation")
_GRID_Y, _GRID_X = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
_GRID_YF, _GRID_XF = _GRID_Y.astype(np.float32), _GRID_X.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Design:
    """The generator's parameters of one version (changing one changes the data set: a new version)."""

    cue: str  # "background" or "patch" (module docstring)
    texture_contrast: int  # per channel, between the cue texture's two colours (at most 127)
    radius_range: tuple  # pixels: a shape's radius is uniform in this range (smaller only when crowded)
    num_objects_probs: tuple  # probability of 1, 2, ... objects in an image
    bias_probability: float  # biased splits: P(cue texture = the class's own)
    split_sizes: tuple  # ((split, size), ...); the splits not in BIASED_SPLITS are unbiased
    shape_colour_distance: int = 180  # L1 distance of a shape's colour from the background's colours
    patch_size: int = 0  # "patch": side of the square cue patch, pixels
    background_noise: int = 0  # "patch": per-pixel uniform noise in [-noise, noise] on the flat background

    @property
    def splits(self) -> dict:
        return dict(self.split_sizes)

    @property
    def unbiased_splits(self) -> tuple:
        return tuple(split for split, _ in self.split_sizes if split not in BIASED_SPLITS)


_V2_SPLITS = (("train", 3000), ("validation", 600), ("validation_unbiased", 600), ("test_unbiased", 600))
V2 = Design(cue="background", texture_contrast=80, radius_range=(8, 14), num_objects_probs=(0.6, 0.4),
            bias_probability=0.9, split_sizes=_V2_SPLITS)
# 3.0.0, chosen on validation splits only (experiments/results/shortcut_screen/): a cue patch that predicts
# its object's class perfectly in the biased splits, and shapes smaller and closer in colour to the noisy
# background than 2.0.0's; train_unbiased (same size as train, cues independent of the classes) is the oracle
V3 = Design(cue="patch", texture_contrast=120, radius_range=(6, 10), num_objects_probs=(0.6, 0.4),
            bias_probability=1.0, split_sizes=_V2_SPLITS + (("train_unbiased", 3000),),
            shape_colour_distance=90, patch_size=16, background_noise=20)
DESIGNS = {"2.0.0": V2, "3.0.0": V3}


def texture(texture_id: int, rng: np.random.Generator) -> np.ndarray:
    """Binary [64,64] pattern of one texture, with a random phase."""
    y, x = _GRID_Y, _GRID_X
    phase_x, phase_y = rng.integers(0, 16, size=2)
    if texture_id == 0:
        return ((y + phase_y) // 4) % 2 == 0
    if texture_id == 1:
        return ((x + phase_x) // 2) % 2 == 0
    if texture_id == 2:
        return ((x + y + phase_x) // 3) % 2 == 0
    if texture_id == 3:
        return ((x + phase_x) // 8 + (y + phase_y) // 8) % 2 == 0
    if texture_id == 4:
        return ((x + phase_x) % 8 < 3) & ((y + phase_y) % 8 < 3)
    if texture_id == 5:
        return rng.random((IMAGE_SIZE, IMAGE_SIZE)) < 0.5
    raise ValueError(f"texture id {texture_id} not in 0..{len(TEXTURE_NAMES) - 1}")


def shape_region(class_id: int, center_y: float, center_x: float, radius: float) -> np.ndarray:
    """Boolean [64,64] region of one shape."""
    dy, dx = _GRID_YF - center_y, _GRID_XF - center_x
    if class_id == 0:  # circle
        return dx ** 2 + dy ** 2 <= radius ** 2
    if class_id == 1:  # square
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * radius
    if class_id == 2:  # triangle, apex up
        return (dy >= -radius) & (dy <= 0.8 * radius) & (np.abs(dx) <= (dy + radius) / 1.8)
    if class_id == 3:  # cross
        arm = radius / 3.0
        return (((np.abs(dx) <= arm) & (np.abs(dy) <= radius))
                | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius)))
    if class_id == 4:  # ring
        dist2 = dx ** 2 + dy ** 2
        return (dist2 <= radius ** 2) & (dist2 >= (0.5 * radius) ** 2)
    if class_id == 5:  # diamond
        return np.abs(dx) + np.abs(dy) <= radius
    raise ValueError(f"class id {class_id} not in 0..{len(CLASS_NAMES) - 1}")


def dilate(region: np.ndarray) -> np.ndarray:
    padded = np.pad(region, 1)
    out = region.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= padded[1 + dy:1 + dy + IMAGE_SIZE, 1 + dx:1 + dx + IMAGE_SIZE]
    return out


def distinct_colour(rng: np.random.Generator, avoid: list, min_distance: int) -> np.ndarray:
    """A random RGB colour at L1 distance >= min_distance from every colour in `avoid` (best of 64 tries)."""
    candidates = rng.integers(0, 256, size=(64, 3))
    if not avoid:
        return candidates[0].astype(np.uint8)
    distances = np.min([np.abs(candidates - c).sum(axis=1) for c in avoid], axis=0)
    good = np.flatnonzero(distances >= min_distance)
    return candidates[good[0] if good.size else np.argmax(distances)].astype(np.uint8)


def cue_texture(class_id: int, biased: bool, design: Design, rng: np.random.Generator) -> int:
    """The cue texture of an object of `class_id`: in a biased split its own with probability
    bias_probability, else one of the other five uniformly; in an unbiased split any, uniformly."""
    num_classes = len(CLASS_NAMES)
    if not biased:
        return int(rng.integers(num_classes))
    if rng.random() < design.bias_probability:
        return int(class_id)
    return int((class_id + rng.integers(1, num_classes)) % num_classes)


def _second_colour(colour: np.ndarray, contrast: int) -> np.ndarray:
    """`colour` moved by `contrast` in every channel (down where up does not fit)."""
    signs = np.where(colour.astype(int) + contrast > 255, -1, 1)
    return (colour.astype(int) + signs * contrast).astype(np.uint8)


def place_object(placed: list, design: Design, rng: np.random.Generator, where: str) -> tuple:
    """(cy, cx, r) of the next object, not overlapping those `placed` (so that every label stays visible)."""
    for attempt in range(200):
        low, high = design.radius_range
        if attempt >= 50:  # crowded: try smaller objects, down to the range's lower end
            high = max(low, high - (high - low) * (attempt - 50) / 100)
        radius = float(rng.uniform(low, high))
        cy, cx = rng.uniform(radius + 1, IMAGE_SIZE - radius - 2, size=2)
        if all((cy - py) ** 2 + (cx - px) ** 2 > (radius + pr + 3) ** 2 for py, px, pr in placed):
            return cy, cx, radius
    raise RuntimeError(f"gain_shapes: could not place object {len(placed) + 1} ({where})")


def render(split: str, index: int, design: Design) -> dict:
    """One example of `split` (deterministic in (split, index, design)): image uint8 [64,64,3], mask uint8
    [64,64] (VOC encoding, 255 on a 1-pixel ring around each shape), classes (drawing order), regions
    (boolean [64,64] per object), cue (the first object's cue texture: the "background" feature), cues (one per
    object; the background's alone for "background"), patches ((top, left) per cue patch) and colours (the
    texture's two)."""
    if split not in design.splits:
        raise ValueError(f"unknown gain_shapes split {split!r}; splits: {tuple(design.splits)}")
    rng = np.random.default_rng([BASE_SEED, SPLIT_SEEDS[split], index])
    num_classes = len(CLASS_NAMES)
    num_objects = int(rng.choice(len(design.num_objects_probs), p=design.num_objects_probs)) + 1
    classes = rng.choice(num_classes, size=num_objects, replace=False)
    biased = split in BIASED_SPLITS
    if design.cue == "background":
        return _render_background_cue(split, index, design, rng, classes, biased)
    if design.cue == "patch":
        return _render_patch_cue(split, index, design, rng, classes, biased)
    raise ValueError(f"unknown cue design {design.cue!r}")


def _draw_objects(image, mask, classes, avoid, design, rng, where) -> list:
    """Place and draw each object in turn (its colour L1 >= shape_colour_distance from `avoid`); the mask
    gets class + 1 on the shape and IGNORE on a 1-pixel ring. Returns the objects' regions."""
    placed, regions = [], []
    for class_id in classes:
        placed.append(place_object(placed, design, rng, where))
        region = shape_region(int(class_id), *placed[-1])
        image[region] = distinct_colour(rng, avoid, design.shape_colour_distance)
        mask[dilate(region) & ~region] = IGNORE
        mask[region] = class_id + 1
        regions.append(region)
    return regions


def _render_background_cue(split, index, design, rng, classes, biased) -> dict:
    # the RNG draws in 2.0.0's order: its images stay byte for byte the same
    background = cue_texture(int(classes[0]), biased, design, rng)
    colour_a = distinct_colour(rng, [], 0)
    colour_b = _second_colour(colour_a, design.texture_contrast)
    pattern = texture(background, rng)
    image = np.where(pattern[..., None], colour_a, colour_b).astype(np.uint8)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    regions = _draw_objects(image, mask, classes, [colour_a, colour_b], design, rng, f"{split} {index}")
    return {"image": image, "mask": mask, "classes": classes, "regions": regions, "cue": background,
            "cues": [background], "patches": [], "colours": (colour_a, colour_b)}


def _place_patch(occupied: np.ndarray, size: int, rng: np.random.Generator, where: str) -> tuple:
    """Top-left corner of a size x size patch on free pixels (`occupied` dilated by 2 px kept clear)."""
    blocked = dilate(dilate(occupied))
    for _ in range(500):
        top, left = rng.integers(0, IMAGE_SIZE - size + 1, size=2)
        if not blocked[top:top + size, left:left + size].any():
            return int(top), int(left)
    raise RuntimeError(f"gain_shapes: no room for a cue patch ({where})")


def _render_patch_cue(split, index, design, rng, classes, biased) -> dict:
    where = f"{split} {index}"
    cues = [cue_texture(int(class_id), biased, design, rng) for class_id in classes]
    colour_a = distinct_colour(rng, [], 0)
    colour_b = _second_colour(colour_a, design.texture_contrast)
    noise = rng.integers(-design.background_noise, design.background_noise + 1, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    image = np.clip(colour_a.astype(int) + noise, 0, 255).astype(np.uint8)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    regions = _draw_objects(image, mask, classes, [colour_a, colour_b], design, rng, where)
    occupied = mask > 0
    size = design.patch_size
    patches = []
    for cue in cues:  # each object's patch, clear of the objects and of the other patches
        top, left = _place_patch(occupied, size, rng, where)
        pattern = texture(cue, rng)[:size, :size]
        image[top:top + size, left:left + size] = np.where(pattern[..., None], colour_a, colour_b)
        occupied[top:top + size, left:left + size] = True
        patches.append((top, left))
    return {"image": image, "mask": mask, "classes": classes, "regions": regions, "cue": cues[0], "cues": cues,
            "patches": patches, "colours": (colour_a, colour_b)}
