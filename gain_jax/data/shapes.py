""""gain_shapes": an embedded synthetic set with a known background bias, generated locally (no download).

64x64 RGB images with 1 to 3 solid shapes of 6 classes on a textured background. Like "boat on water",
each class comes with a background texture of its own: in train and validation the texture is that of the
image's primary (first) object with probability `BIAS_PROBABILITY`, otherwise one of the other five; in
test_unbiased the texture is independent of the classes. Objects are small, so the background dominates
the image and a plain classifier can score on train/validation from the texture alone, which an
attention-supervised one should not need. Per-pixel masks use VOC's encoding (0 background, class + 1,
255 ignore on a 1-pixel ring around each shape). Generation is seeded per (split, index): deterministic.
"""
from __future__ import annotations

import io

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring", "diamond")
TEXTURE_NAMES = ("horizontal_stripes", "vertical_fine_stripes", "diagonal_stripes", "checkers", "dots",
                 "pixel_noise")  # texture k is the "own" background of class k
IMAGE_SIZE = 64
BIAS_PROBABILITY = 0.9
SPLIT_SIZES = {"train": 3000, "validation": 600, "test_unbiased": 600}
_SPLIT_SEEDS = {"train": 0, "validation": 1, "test_unbiased": 2}
_BASE_SEED = 20180301
_IGNORE = 255
_NUM_OBJECTS_PROBS = (0.5, 0.3, 0.2)  # 1, 2 or 3 objects
_RADIUS_RANGE = (5, 10)  # pixels; a shape covers roughly 1-8% of the image
_GRID_Y, _GRID_X = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
_GRID_YF, _GRID_XF = _GRID_Y.astype(np.float32), _GRID_X.astype(np.float32)


def _texture(texture_id: int, rng: np.random.Generator) -> np.ndarray:
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


def _shape_region(class_id: int, center_y: float, center_x: float, radius: float) -> np.ndarray:
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


def _dilate(region: np.ndarray) -> np.ndarray:
    padded = np.pad(region, 1)
    out = region.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= padded[1 + dy:1 + dy + IMAGE_SIZE, 1 + dx:1 + dx + IMAGE_SIZE]
    return out


def _distinct_colour(rng: np.random.Generator, avoid: list, min_distance: int) -> np.ndarray:
    """A random RGB colour at L1 distance >= min_distance from every colour in `avoid` (best of 64 tries)."""
    candidates = rng.integers(0, 256, size=(64, 3))
    if not avoid:
        return candidates[0].astype(np.uint8)
    distances = np.min([np.abs(candidates - c).sum(axis=1) for c in avoid], axis=0)
    good = np.flatnonzero(distances >= min_distance)
    return candidates[good[0] if good.size else np.argmax(distances)].astype(np.uint8)


def _encode_png(image: np.ndarray) -> bytes:
    # PIL, not tfds' TensorFlow encoder: several times faster per image at this size.
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(data)))


def generate_example(split: str, index: int) -> dict:
    """One example of `split` (deterministic in (split, index)): the tfds feature dict, the image as PNG
    bytes (`decode_png` reads it back)."""
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"unknown gain_shapes split {split!r}; splits: {tuple(SPLIT_SIZES)}")
    rng = np.random.default_rng([_BASE_SEED, _SPLIT_SEEDS[split], index])
    num_classes = len(CLASS_NAMES)
    num_objects = int(rng.choice(len(_NUM_OBJECTS_PROBS), p=_NUM_OBJECTS_PROBS)) + 1
    classes = rng.choice(num_classes, size=num_objects, replace=False)

    if split == "test_unbiased":
        background = int(rng.integers(num_classes))
    elif rng.random() < BIAS_PROBABILITY:
        background = int(classes[0])
    else:  # one of the other textures, uniformly
        background = int((classes[0] + rng.integers(1, num_classes)) % num_classes)

    colour_a = _distinct_colour(rng, [], 0)
    colour_b = _distinct_colour(rng, [colour_a], 200)
    pattern = _texture(background, rng)
    image = np.where(pattern[..., None], colour_a, colour_b).astype(np.uint8)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)

    placed = []  # (cy, cx, r): objects do not overlap, so every label stays visible
    objects = []
    for class_id in classes:
        for _ in range(100):
            radius = float(rng.uniform(*_RADIUS_RANGE))
            cy, cx = rng.uniform(radius + 1, IMAGE_SIZE - radius - 2, size=2)
            if all((cy - py) ** 2 + (cx - px) ** 2 > (radius + pr + 3) ** 2 for py, px, pr in placed):
                break
        else:
            raise RuntimeError(f"gain_shapes: could not place {num_objects} objects ({split} {index})")
        placed.append((cy, cx, radius))
        region = _shape_region(int(class_id), cy, cx, radius)
        ring = _dilate(region) & ~region
        image[region] = _distinct_colour(rng, [colour_a, colour_b], 180)
        mask[ring] = _IGNORE
        mask[region] = class_id + 1
        rows, cols = np.nonzero(region)
        objects.append({
            "label": int(class_id),
            "bbox": tfds.features.BBox(ymin=rows.min() / IMAGE_SIZE, xmin=cols.min() / IMAGE_SIZE,
                                       ymax=(rows.max() + 1) / IMAGE_SIZE, xmax=(cols.max() + 1) / IMAGE_SIZE),
        })

    labels = np.zeros(num_classes, np.float32)
    labels[classes] = 1.0
    return {
        "image": _encode_png(image),
        "labels": labels,
        "mask": mask,
        "has_mask": True,
        "filename": f"shapes_{split}_{index:06d}",
        "background": background,
        "objects": objects,
    }


class GainShapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic shapes on class-correlated background textures (see module docstring)."""

    name = "gain_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version: 6 classes, 64x64, bias 0.9 in train/validation."}
    # tfds derives this through `importlib_resources`, a package its wheel does not declare.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        num_classes = len(CLASS_NAMES)
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
                "labels": tfds.features.Tensor(shape=(num_classes,), dtype=np.float32),
                "mask": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8, encoding="zlib"),
                "has_mask": tfds.features.Tensor(shape=(), dtype=np.bool_),
                "filename": tfds.features.Text(),
                "background": tfds.features.ClassLabel(names=TEXTURE_NAMES),
                "objects": tfds.features.Sequence({
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "bbox": tfds.features.BBoxFeature(),
                }),
            }),
            homepage="https://arxiv.org/abs/1802.10171",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split, size) for split, size in SPLIT_SIZES.items()}

    def _generate_examples(self, split, size):
        for index in range(size):
            yield index, generate_example(split, index)
