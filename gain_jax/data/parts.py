""""gain_parts": an embedded synthetic set for the part-to-whole question, generated locally (no download).

Does attention mining (GAIN's L_am) extend a classifier's attention from a small discriminative part of an
object to the whole object? Each 112x112 RGB image shows one object of one of 4 classes on a class-free
background:

- the *body*: an ellipse (semi-axes `BODY_RADIUS_RANGE` px, about 4-6 cells of small_cnn's 14x14 Grad-CAM
  grid across) filled with a faint two-tone stripe texture (`BODY_TEXTURE_NAMES`, tones `BODY_CONTRAST` apart)
  in greyish colours, under the same per-pixel noise as the background. The texture is the class's own with
  probability `body_reliability` (a builder config), else one of the other classes' (uniformly): weaker
  evidence, both less reliable and harder to see than the part;
- the *part*: a disc of `part_fraction` (a builder config) of the body's area, at a uniformly random place
  inside the body, in its class's saturated colour (`PART_COLOURS`, jittered by `PART_COLOUR_JITTER`): always
  right, and read by a single pixel;
- the *background*: a greyish random colour with per-pixel noise (`BACKGROUND_NOISE`), independent of the
  class (no background shortcut).

Body and background colours are grey plus a small tint (`TINT`), so that no colour but the part's is
saturated. The body stays within `BODY_RADIUS_RANGE[1]` < 28 px of its centre, under a quarter of the image
side, so that GAIN's `shift` erase fill (the image rolled by half its size) fills an erased region on the
object with background: a fill that is no class cue.

Builder configs (`tfds.builder("gain_parts/part04_rel080")`; plain "gain_parts" is the first, `DEFAULT_CONFIG`):
`part_fraction` in `PART_FRACTIONS` (the part's share of the body's area: how small the discriminative
region is) crossed with `body_reliability` in `BODY_RELIABILITIES` (how often the body's texture is the
class's own: how much evidence is left on the body once the part is erased). Their names are
`part{100 x fraction:02d}_rel{100 x reliability:03d}`; the default is part04_rel060.

Splits (sizes in `SPLIT_SIZES`; every split has the same distribution, there is no bias to undo):
    train        what models learn from
    validation   choosing configurations (methods, weights, budgets)
    test         looked at once, for the configurations chosen
Held-out streams (`heldout_split(seed)`, named "heldout<seed>"): the same generator, seeded apart from the
splits by a seed chosen at evaluation time; the builder never writes them and no split holds their images.
`pipeline.parts_evaluation_batches` gives the examples of a split or stream as evaluation batches.

Features: "image", "labels" (one-hot), "mask" (VOC encoding, what GAIN_ext's mask loss reads: 0 background,
class + 1 on the whole object, body and part, 255 on a 1-pixel ignore ring around it), "has_mask", "filename"
(`parts_<split>_<index>`), "body_mask" and "part_mask" (uint8 0/1: the body without the part, and the part),
"body_texture" (the texture drawn on the body: the class's own or not).
Generation is seeded per (config, split, index): deterministic; `generate_example(..., with_part=False)`
gives the same image with the body's texture where the part was (the "part erased" counterfactual).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gain_jax.data import shapes

CLASS_NAMES = ("red", "green", "blue", "yellow")  # named after their parts' colours
BODY_TEXTURE_NAMES = ("horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkers")  # class k's own: k
IMAGE_SIZE = 112
# The generator's parameters (changing one changes the data set: bump GainParts.VERSION).
PART_COLOURS = ((220, 40, 40), (40, 200, 40), (40, 80, 230), (230, 210, 30))
PART_COLOUR_JITTER = 20  # per channel, uniform in +-this
BODY_RADIUS_RANGE = (18.0, 26.0)  # px: each semi-axis of the body's ellipse is uniform in this range
BODY_GREY_RANGE = (70, 185)  # the body's darker tone; the lighter one is BODY_CONTRAST above
BODY_CONTRAST = 40
BACKGROUND_GREY_RANGE = (50, 205)
BACKGROUND_NOISE = 35  # per pixel and channel, uniform in +-this, on the background and the body
TINT = 12  # body and background colours: grey plus a per-channel tint uniform in +-this
PART_FRACTIONS = (0.04, 0.02, 0.08)
BODY_RELIABILITIES = (0.6, 0.4, 0.8, 1.0)
SPLIT_SIZES = {"train": 2000, "validation": 500, "test": 500}
_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
HELDOUT_PREFIX = "heldout"
_HELDOUT_WORD = 3  # the seed word of the held-out streams, after the splits' 0, 1, 2
HELDOUT_SEEDS = 2 ** 32  # a held-out stream's seed is in [0, HELDOUT_SEEDS): one 32-bit word of the seed sequence
HELDOUT_MAX_IMAGES = 10 ** 6  # a held-out stream's indices: 0 .. this - 1 (filenames keep 6 digits)
_BASE_SEED = 20180302
_IGNORE = 255
_GRID_Y, _GRID_X = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE].astype(np.float32)


def config_name(part_fraction: float, body_reliability: float) -> str:
    return f"part{round(100 * part_fraction):02d}_rel{round(100 * body_reliability):03d}"


@dataclasses.dataclass
class GainPartsConfig(tfds.core.BuilderConfig):
    """part_fraction: the part's area / the body's area. body_reliability: P(body texture = the class's own)."""

    part_fraction: float = PART_FRACTIONS[0]
    body_reliability: float = BODY_RELIABILITIES[0]


def _check_parameters(part_fraction: float, body_reliability: float) -> None:
    if not 0.0 < part_fraction <= 0.25:
        raise ValueError(f"gain_parts: part_fraction must be in (0, 0.25], got {part_fraction!r}")
    if not 0.0 <= body_reliability <= 1.0:
        raise ValueError(f"gain_parts: body_reliability must be in [0, 1], got {body_reliability!r}")


def _body_texture(texture_id: int, rng: np.random.Generator) -> np.ndarray:
    """Binary [112,112] stripe pattern of one body texture, with a random phase (period 8 px)."""
    y, x = _GRID_Y.astype(np.int32), _GRID_X.astype(np.int32)
    phase_x, phase_y = rng.integers(0, 8, size=2)
    if texture_id == 0:
        return ((y + phase_y) // 4) % 2 == 0
    if texture_id == 1:
        return ((x + phase_x) // 4) % 2 == 0
    if texture_id == 2:
        return ((x + y + phase_x) // 4) % 2 == 0
    if texture_id == 3:
        return ((x + phase_x) // 4 + (y + phase_y) // 4) % 2 == 0
    raise ValueError(f"texture id {texture_id} not in 0..{len(BODY_TEXTURE_NAMES) - 1}")


def _greyish(rng: np.random.Generator, grey_range: tuple) -> np.ndarray:
    """A grey level in `grey_range` plus a small per-channel tint, as int [3]."""
    return int(rng.integers(*grey_range)) + rng.integers(-TINT, TINT + 1, size=3)


def heldout_split(seed: int) -> str:
    """The name of the held-out stream of `seed` (an int in [0, HELDOUT_SEEDS)): "heldout<seed>"."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < HELDOUT_SEEDS:
        raise ValueError(f"gain_parts: a held-out seed is an int in [0, 2**32), got {seed!r}")
    return f"{HELDOUT_PREFIX}{int(seed)}"


def _split_words(split: str) -> list[int]:
    """The words of the seed sequence that name `split` (between the config's and the index): [s] for the
    splits (s in _SPLIT_SEEDS), [_HELDOUT_WORD, seed] for the held-out stream "heldout<seed>"."""
    if split in _SPLIT_SEEDS:
        return [_SPLIT_SEEDS[split]]
    match = re.fullmatch(HELDOUT_PREFIX + r"(0|[1-9]\d{0,9})", split)
    if match is None or int(match.group(1)) >= HELDOUT_SEEDS:
        raise ValueError(f"unknown gain_parts split {split!r}; splits: {tuple(SPLIT_SIZES)}, or held-out streams "
                         f"{HELDOUT_PREFIX}<seed> (seed in [0, 2**32), no leading zeros)")
    return [_HELDOUT_WORD, int(match.group(1))]


def _dilate(region: np.ndarray) -> np.ndarray:
    """The region grown by one pixel in the 8 directions."""
    return np.lib.stride_tricks.sliding_window_view(np.pad(region, 1), (3, 3)).any(axis=(-2, -1))


def generate_example(split: str, index: int, part_fraction: float = PART_FRACTIONS[0],
                     body_reliability: float = BODY_RELIABILITIES[0], with_part: bool = True) -> dict:
    """One example of `split` (deterministic in (split, index, part_fraction, body_reliability)): the tfds
    feature dict, the image as PNG bytes (`shapes.decode_png` reads it back). `with_part=False`: the same
    example with the part not painted (the body's texture shows there); its masks are the same."""
    words = _split_words(split)
    if split not in _SPLIT_SEEDS and not 0 <= index < HELDOUT_MAX_IMAGES:
        raise ValueError(f"gain_parts: a held-out stream's index is in [0, {HELDOUT_MAX_IMAGES}), got {index}")
    _check_parameters(part_fraction, body_reliability)
    # The config is part of the seed: configs differ in more than the part's size. A split's words are [s]
    # (s = 0, 1, 2: the sequence [base, fraction, reliability, s, index] of gain_parts 1.0.0, unchanged), a
    # held-out stream's [3, seed]: its sequences have 6 words where the splits' have 5, and their fourth word
    # is no split's. numpy's SeedSequence mixes every word of a sequence longer than its 4-word pool into its
    # state (only shorter ones are padded, with zeros: [a, b] and [a, b, 0] collide), so distinct sequences give
    # independent streams, up to a hash collision of its 128-bit pool: the held-out images are drawn
    # independently of every split's, and of other seeds'.
    rng = np.random.default_rng([_BASE_SEED, round(1000 * part_fraction), round(1000 * body_reliability),
                                 *words, index])
    num_classes = len(CLASS_NAMES)
    class_id = int(rng.integers(num_classes))
    if rng.random() < body_reliability:
        texture_id = class_id
    else:  # one of the other classes' textures, uniformly
        texture_id = int((class_id + rng.integers(1, num_classes)) % num_classes)

    background = _greyish(rng, BACKGROUND_GREY_RANGE)
    noise = rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    image = background + noise

    radius_y, radius_x = rng.uniform(*BODY_RADIUS_RANGE, size=2)
    margin = BODY_RADIUS_RANGE[1] + 2
    center_y, center_x = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
    body = ((_GRID_Y - center_y) / radius_y) ** 2 + ((_GRID_X - center_x) / radius_x) ** 2 <= 1.0
    dark = _greyish(rng, BODY_GREY_RANGE)
    pattern = _body_texture(texture_id, rng)
    image = np.where(body[..., None], np.where(pattern[..., None], dark + BODY_CONTRAST, dark) + noise, image)

    # the part: a disc of part_fraction of the body's area, its centre uniform over the places where the disc,
    # widened by 2 px, lies inside the body's ellipse (drawn in the ellipse shrunk by that radius until it fits)
    part_radius = float(np.sqrt(part_fraction * radius_y * radius_x))
    reach = part_radius + 2.0
    rim = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    for _ in range(1000):
        angle, distance = rng.uniform(0, 2 * np.pi), np.sqrt(rng.random())
        part_y = center_y + distance * (radius_y - reach) * np.sin(angle)
        part_x = center_x + distance * (radius_x - reach) * np.cos(angle)
        rim_y, rim_x = part_y + reach * np.sin(rim) - center_y, part_x + reach * np.cos(rim) - center_x
        if np.all((rim_y / radius_y) ** 2 + (rim_x / radius_x) ** 2 <= 1.0):
            break
    else:
        raise RuntimeError(f"gain_parts: could not place the part ({split} {index})")
    part = ((_GRID_Y - part_y) ** 2 + (_GRID_X - part_x) ** 2 <= part_radius ** 2) & body
    colour = np.asarray(PART_COLOURS[class_id]) + rng.integers(-PART_COLOUR_JITTER, PART_COLOUR_JITTER + 1, size=3)
    if with_part:
        image = np.where(part[..., None], colour, image)
    image = np.clip(image, 0, 255).astype(np.uint8)

    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[_dilate(body) & ~body] = _IGNORE
    mask[body] = class_id + 1
    labels = np.zeros(num_classes, np.float32)
    labels[class_id] = 1.0
    return {
        "image": shapes._encode_png(image),
        "labels": labels,
        "mask": mask,
        "has_mask": True,
        "filename": f"parts_{split}_{index:06d}",
        "body_mask": (body & ~part).astype(np.uint8),
        "part_mask": part.astype(np.uint8),
        "body_texture": texture_id,
    }


def part_erased_images(filenames, part_fraction: float, body_reliability: float) -> np.ndarray:
    """uint8 `[B, 112, 112, 3]`: the examples `filenames` (bytes or str, `parts_<split>_<index>`) of the config
    (`part_fraction`, `body_reliability`) regenerated with their part erased (`generate_example(...,
    with_part=False)`)."""
    images = []
    for name in filenames:
        split, index = example_index(name.decode() if isinstance(name, bytes) else str(name))
        example = generate_example(split, index, part_fraction, body_reliability, with_part=False)
        images.append(shapes.decode_png(example["image"]))
    return np.stack(images)


def example_index(filename: str) -> tuple[str, int]:
    """(split, index) of an example from its filename (`parts_<split>_<index>`, index in 6 digits; the split may
    be a held-out stream, "heldout<seed>")."""
    match = re.fullmatch(r"parts_(\w+)_(\d{6})", filename)
    try:
        if match is None:
            raise ValueError(filename)
        _split_words(match.group(1))
    except ValueError:
        raise ValueError(f"not a gain_parts filename: {filename!r}") from None
    return match.group(1), int(match.group(2))


BUILDER_CONFIGS = tuple(
    GainPartsConfig(name=config_name(fraction, reliability), part_fraction=fraction, body_reliability=reliability,
                    description=f"part {100 * fraction:g}% of the body's area, body texture the class's own with "
                                f"probability {reliability:g}")
    for fraction in PART_FRACTIONS for reliability in BODY_RELIABILITIES)
DEFAULT_CONFIG = BUILDER_CONFIGS[0].name
CONFIG_NAMES = tuple(config.name for config in BUILDER_CONFIGS)


class GainParts(tfds.core.GeneratorBasedBuilder):
    """One object per image: a weakly informative body with a small, always-right part (module docstring)."""

    name = "gain_parts"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version: 4 classes, 112x112, one object, configs part fraction x body "
                              "reliability."}
    BUILDER_CONFIGS = list(BUILDER_CONFIGS)
    # tfds derives this through `importlib_resources`, a package its wheel does not declare.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = (IMAGE_SIZE, IMAGE_SIZE)
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(*size, 3), encoding_format="png"),
                "labels": tfds.features.Tensor(shape=(len(CLASS_NAMES),), dtype=np.float32),
                "mask": tfds.features.Tensor(shape=size, dtype=np.uint8, encoding="zlib"),
                "has_mask": tfds.features.Tensor(shape=(), dtype=np.bool_),
                "filename": tfds.features.Text(),
                "body_mask": tfds.features.Tensor(shape=size, dtype=np.uint8, encoding="zlib"),
                "part_mask": tfds.features.Tensor(shape=size, dtype=np.uint8, encoding="zlib"),
                "body_texture": tfds.features.ClassLabel(names=BODY_TEXTURE_NAMES),
            }),
            homepage="https://arxiv.org/abs/1802.10171",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split, size) for split, size in SPLIT_SIZES.items()}

    def _generate_examples(self, split, size):
        config = self.builder_config
        for index in range(size):
            yield index, generate_example(split, index, config.part_fraction, config.body_reliability)
