""""gain_shapes": an embedded synthetic set with a known background bias, generated locally (no download).

64x64 RGB images with 1 or 2 solid shapes (`NUM_OBJECTS_PROBS`) of 6 classes, radius `RADIUS_RANGE` pixels
(a shape covers roughly 3-15% of the image), on a faint two-colour background texture (the colours differ by
`TEXTURE_CONTRAST` per channel; the shapes' colours stand out from both). Like "boat on water", each class
comes with a background texture of its own: in the biased splits the texture is that of the image's primary
(first) object with probability `BIAS_PROBABILITY`, otherwise one of the other five; in the unbiased splits
it is independent of the classes. The parameters are meant to make the texture a shortcut that a classifier
trained from scratch takes while the shapes stay learnable within a CPU budget, so that what a method
changes (looking at the shapes, or not) can be measured.

Splits (sizes in `SPLIT_SIZES`):
    train                 biased: what models learn from
    validation            biased like train: how well a model learned the training distribution
    validation_unbiased   texture independent of the classes: for choosing configurations (methods, weights,
                          budgets); nothing is chosen on test_unbiased
    test_unbiased         texture independent of the classes: looked at once, for the configurations chosen

Per-pixel masks use VOC's encoding (0 background, class + 1, 255 ignore on a 1-pixel ring around each shape).
Generation is seeded per (split, index): deterministic.
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
# The generator's parameters (changing one changes the data set: bump GainShapes.VERSION).
TEXTURE_CONTRAST = 80  # per channel, between the background texture's two colours (at most 127)
RADIUS_RANGE = (8, 14)  # pixels: a shape's radius is uniform in this range (smaller only when crowded)
NUM_OBJECTS_PROBS = (0.6, 0.4)  # probability of 1, 2, ... objects in an image
BIAS_PROBABILITY = 0.9  # biased splits: P(background texture = the primary object's class's own)
SPLIT_SIZES = {"train": 3000, "validation": 600, "validation_unbiased": 600, "test_unbiased": 600}
UNBIASED_SPLITS = ("validation_unbiased", "test_unbiased")  # texture independent of the classes
_SPLIT_SEEDS = {"train": 0, "validation": 1, "validation_unbiased": 3, "test_unbiased": 2}
_BASE_SEED = 20180301
_IGNORE = 255
# v1's private names of the parameters above: a script that still sets them would silently get v2's values
_RENAMED = {"_TEXTURE_CONTRAST": "TEXTURE_CONTRAST", "_RADIUS_RANGE": "RADIUS_RANGE",
            "_NUM_OBJECTS_PROBS": "NUM_OBJECTS_PROBS"}
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
    stale = [name for name in _RENAMED if name in globals()]
    if stale:
        raise AttributeError(f"gain_shapes 2.0: {stale} were renamed to {[_RENAMED[name] for name in stale]}")
    rng = np.random.default_rng([_BASE_SEED, _SPLIT_SEEDS[split], index])
    num_classes = len(CLASS_NAMES)
    num_objects = int(rng.choice(len(NUM_OBJECTS_PROBS), p=NUM_OBJECTS_PROBS)) + 1
    classes = rng.choice(num_classes, size=num_objects, replace=False)

    if split in UNBIASED_SPLITS:
        background = int(rng.integers(num_classes))
    elif rng.random() < BIAS_PROBABILITY:
        background = int(classes[0])
    else:  # one of the other textures, uniformly
        background = int((classes[0] + rng.integers(1, num_classes)) % num_classes)

    colour_a = _distinct_colour(rng, [], 0)
    # a faint texture: the second colour differs by TEXTURE_CONTRAST in every channel (up where that fits)
    signs = np.where(colour_a.astype(int) + TEXTURE_CONTRAST > 255, -1, 1)
    colour_b = (colour_a.astype(int) + signs * TEXTURE_CONTRAST).astype(np.uint8)
    pattern = _texture(background, rng)
    image = np.where(pattern[..., None], colour_a, colour_b).astype(np.uint8)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)

    placed = []  # (cy, cx, r): objects do not overlap, so every label stays visible
    objects = []
    for class_id in classes:
        for attempt in range(200):
            low, high = RADIUS_RANGE
            if attempt >= 50:  # crowded: try smaller objects, down to the range's lower end
                high = max(low, high - (high - low) * (attempt - 50) / 100)
            radius = float(rng.uniform(low, high))
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
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "First version: 6 classes, 64x64, bias 0.9 in train/validation.",
        "2.0.0": "Learnable shapes and a split for choosing configurations. v1's high-contrast textures (and 1-3 "
                 "small shapes, radius 5-10 px) made the shapes practically unlearnable within a CPU budget: "
                 "a classifier from scratch learned the texture only, at chance on test_unbiased, so no method "
                 "could be told apart. v2: a faint texture (its two colours differ by TEXTURE_CONTRAST per "
                 "channel), 1 or 2 larger shapes (radius RADIUS_RANGE), placement that shrinks shapes rather "
                 "than failing when crowded, and a new unbiased split validation_unbiased (for choosing "
                 "configurations; test_unbiased is looked at once). Every image differs from v1's.",
    }
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
