"""The tf.data input pipeline: tfds examples -> resized, augmented, normalized numpy batches.

Per example: decode (a JPEG with libjpeg's accurate integer IDCT: PIL's pixels, bit for bit), resize to
`image_size` x `image_size` (bilinear with antialiasing for the image, like torchvision's Resize; nearest
for the mask), then in training AutoAugment (CIFAR10 policy) and a random
horizontal flip that move the mask with the image, then ImageNet mean/std normalization (per batch, by a table lookup
compiled by XLA).
Random draws are stateless, seeded by (seed, position in the stream): the same arguments give the same
batches. In training the decoded, resized split is kept in memory by default (`make_dataset`'s
`cache_decoded`), so that later passes and later calls skip decoding; the batches stay the same.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from gain_jax import quiet
from gain_jax.data import autoaugment as aa
from gain_jax.data import parts, shapes, voc
from gain_jax.viz import IMAGENET_MEAN, IMAGENET_STD  # the core's; gain_jax.data re-exports them

DEFAULT_SHUFFLE_BUFFER = 1024
OUTPUT_KEYS = ("image", "labels", "mask", "has_mask", "filename")
# Per-data-set keys beside OUTPUT_KEYS. gain_shapes' "bias_conflicting": the image's cue texture (2.0.0: the
# background; 3.0.0: the first object's patch) is the own texture of a class that is not among its labels (the
# texture points away from the answer).
EXTRA_KEYS = {"gain_shapes": ("bias_conflicting",), "gain_parts": ("body_texture",)}
# Per-data-set masks [H, W] beside "mask", in evaluation batches only (resized like the mask, nearest): the
# training augmentation moves only the image and "mask", and nothing in training reads these.
# gain_parts' "body_mask" and "part_mask": 1 on the object's body (part excluded), on its part.
EVAL_MASK_KEYS = {"gain_parts": ("body_mask", "part_mask")}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    class_names: tuple
    image_size: int  # the pipeline's default size (the native one for gain_shapes)
    splits: tuple


_DATASETS = {
    "gain_shapes": DatasetInfo("gain_shapes", len(shapes.CLASS_NAMES), shapes.CLASS_NAMES, shapes.IMAGE_SIZE,
                               tuple(shapes.SPLIT_SIZES)),
    # its opt-in versions ("gain_shapes:3.0.0"), tfds' "name:version"
    **{f"gain_shapes:{version}": DatasetInfo(f"gain_shapes:{version}", len(shapes.CLASS_NAMES), shapes.CLASS_NAMES,
                                             shapes.IMAGE_SIZE, tuple(shapes.VERSION_SPLIT_SIZES[version]))
       for version in shapes.DESIGNS if version != shapes.CURRENT_VERSION},
    # gain_parts is its default config; "gain_parts/<config>" each of its configs
    **{name: DatasetInfo(name, len(parts.CLASS_NAMES), parts.CLASS_NAMES, parts.IMAGE_SIZE, tuple(parts.SPLIT_SIZES))
       for name in ("gain_parts", *(f"gain_parts/{config}" for config in parts.CONFIG_NAMES))},
    "gain_voc2012": DatasetInfo("gain_voc2012", len(voc.CLASS_NAMES), voc.CLASS_NAMES, 224,
                                tuple(voc.SPLIT_FILES)),
    # tfds' own VOC 2012 (downloads; no masks): its features are mapped onto ours
    "voc/2012": DatasetInfo("voc/2012", len(voc.CLASS_NAMES), voc.CLASS_NAMES, 224,
                            ("train", "validation", "test")),
}
DATASET_NAMES = tuple(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Classes and default image size of a data set `input_pipeline` knows."""
    try:
        return _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; known: {DATASET_NAMES}") from None


def _process_slot(process_index: int | None, process_count: int | None) -> tuple:
    """(index, count) of this process; by default JAX's, when the caller has imported JAX, else (0, 1)."""
    if process_index is None and process_count is None:
        jax = sys.modules.get("jax")  # never import JAX from the data package
        if jax is None:
            return 0, 1
        return jax.process_index(), jax.process_count()
    if process_index is None or process_count is None:
        raise ValueError(f"give both process_index and process_count, got {process_index} and {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    return int(process_index), int(process_count)


def decode_image(encoded, channels: int = 3):
    """Encoded image bytes -> uint8 [H, W, channels]. A JPEG is decoded with libjpeg's accurate integer IDCT
    (and its default fancy upsampling), which gives PIL's `Image.open(path).convert("RGB")` pixels bit for
    bit; TensorFlow's default (fast) IDCT is off by up to several grey levels. PNG, GIF, BMP as
    `tf.io.decode_image` decodes them (first frame)."""
    encoded = tf.convert_to_tensor(encoded, tf.string)
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=channels, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=channels, dtype=tf.uint8, expand_animations=False))


@tfds.decode.make_decoder(output_dtype=tf.uint8)
def _image_decoder(encoded, feature):
    """tfds decoder of an Image feature through `decode_image` (tfds' own uses the fast IDCT)."""
    image = decode_image(encoded, channels=feature.shape[-1])
    image.set_shape(feature.shape)
    return image


def _family(name: str) -> str:
    """The builder of a data set name: "gain_parts" for "gain_parts/part04_rel080", "gain_shapes" for
    "gain_shapes:3.0.0"."""
    return name.split("/")[0].split(":")[0] if name.startswith(("gain_parts", "gain_shapes")) else name


def output_keys(name: str, train: bool = False) -> tuple:
    """The keys of `name`'s examples and batches: OUTPUT_KEYS, then its EXTRA_KEYS, then (not in training
    batches) its EVAL_MASK_KEYS."""
    family = _family(name)
    return OUTPUT_KEYS + EXTRA_KEYS.get(family, ()) + (() if train else EVAL_MASK_KEYS.get(family, ()))


def _common_features(name: str, num_classes: int):
    """Map a data set's example onto image, labels, mask, has_mask, filename (and its EXTRA_KEYS)."""
    if _family(name) == "gain_shapes":
        def from_shapes(example):
            # texture k is class k's own (gain_jax.data.shapes.TEXTURE_NAMES)
            texture_class_is_label = tf.gather(example["labels"], example["background"]) > 0
            return {**{key: example[key] for key in OUTPUT_KEYS},
                    "bias_conflicting": tf.logical_not(texture_class_is_label)}
        return from_shapes
    if _family(name) == "gain_parts":
        return lambda example: {key: example[key] for key in output_keys(name)}
    if name != "voc/2012":
        return lambda example: {key: example[key] for key in OUTPUT_KEYS}

    def from_tfds_voc(example):
        image = example["image"]
        labels = tf.one_hot(example["labels"], num_classes, dtype=tf.float32)
        return {
            "image": image,
            "labels": tf.minimum(tf.reduce_sum(labels, axis=0), 1.0),
            "mask": tf.fill(tf.shape(image)[:2], tf.constant(voc.IGNORE_INDEX, tf.uint8)),
            "has_mask": tf.constant(False),
            "filename": example["image/filename"],
        }
    return from_tfds_voc


def resize(image, mask, size: int):
    """Image (bilinear, antialiased, rounded back to uint8) and mask (nearest) to size x size."""
    if tuple(image.shape[:2]) == (size, size):
        return image, mask
    resized = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    return image, _resize_mask(mask, size)


def _resize_mask(mask, size: int):
    if tuple(mask.shape[:2]) == (size, size):
        return mask
    return tf.image.resize(mask[..., None], [size, size], method="nearest")[..., 0]


def _resized_example(example, size: int, name: str):
    """The example with its image, mask and EVAL_MASK_KEYS (those it has) at size x size."""
    image, mask = resize(example["image"], example["mask"], size)
    extra = {key: _resize_mask(example[key], size) for key in EVAL_MASK_KEYS.get(_family(name), ()) if key in example}
    return {**example, "image": image, "mask": mask, **extra}


def normalize(image):
    """uint8 [..., 3] -> float32 normalized with ImageNet mean/std on [0, 1] pixels."""
    pixels = tf.cast(image, tf.float32) / 255.0
    return (pixels - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def _normalized_levels() -> np.ndarray:
    """normalize() of every uint8 level in every channel, flat: entry 3 * level + channel. numpy rounds
    each float32 operation as TensorFlow's kernels do (IEEE); tests compare the two on all 768 entries."""
    levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    normalized = (levels - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return normalized.astype(np.float32).reshape(-1)


_NORMALIZED_LEVELS = _normalized_levels()


# normalize() as one table lookup per pixel, compiled by XLA into a single pass over the batch: the
# pipeline's costliest step after AutoAugment when run as four TensorFlow kernels over float32 batches.
# A lookup, not XLA-compiled arithmetic, because XLA rewrites the divisions and changes some results'
# last bit; the table's values are normalize()'s own.
@tf.function(jit_compile=True)
def normalize_batch(images):
    """normalize() of uint8 images [..., 3], bit for bit, by table lookup."""
    index = tf.cast(images, tf.int32) * 3 + tf.range(3)
    return tf.gather(tf.constant(_NORMALIZED_LEVELS), index)


def _start_tensorflow_xla_without_xla_flags() -> None:
    """Compile one tiny lookup with XLA_FLAGS unset, then put them back.

    TensorFlow carries its own copy of XLA, which reads XLA_FLAGS once, at its first compile, and aborts
    the process on any flag it does not know. XLA_FLAGS in a gain_jax process are meant for JAX's XLA, a
    different version; the pipeline's compiled lookups need none of them."""
    flags = os.environ.pop("XLA_FLAGS", None)
    try:
        normalize_batch(np.zeros((1, 1, 3), np.uint8))
    finally:
        if flags is not None:
            os.environ["XLA_FLAGS"] = flags


_start_tensorflow_xla_without_xla_flags()


def make_dataset(name: str, split: str, *, data_dir=None, manual_dir=None, image_size: int | None = None,
                 batch_size: int = 8, train: bool = True, seed: int = 0, autoaugment: bool = True,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, drop_remainder: bool | None = None,
                 num_epochs: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, prepare: bool = True,
                 cache_decoded: bool | None = None, oversample: float = 0.0,
                 oversample_filter: Callable[[list[str]], np.ndarray] | None = None) -> tf.data.Dataset:
    """The batched tf.data.Dataset behind `input_pipeline` (same arguments).

    cache_decoded: keep this process's share of the split decoded and resized (uint8 images and masks) in
      memory, so that each pass runs only the shuffle, augmentation and normalization. It is decoded once,
      in full, when the dataset is built, and kept for this process's later `make_dataset` calls on the
      same data set, split, shard and image size (the most recent such split only; `clear_decoded_cache()`
      frees it), e.g. the training loop's dataset of each epoch. None (default): on in training when it
      takes at most half of the memory available now, off in evaluation. The batches are the same with
      and without it, bit for bit: the examples come in the order tfds reads them (the files shuffled
      with `seed`, again on each pass), the shuffle buffer draws the same, and the random draws of each
      example depend only on (seed, position in the stream).
    oversample, oversample_filter: training only, with cache_decoded: before the shuffle buffer, each
      example is, with probability `oversample` (in [0, 1)), drawn instead from the images that
      `oversample_filter(filenames) -> bool array` selects (a pool reshuffled on each pass through it),
      else the next one of the split's pass; e.g. more of the few images with masks in every batch. The
      draws depend only on (seed, position).
    """
    info = dataset_info(name)
    size = info.image_size if image_size is None else image_size
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs!r}")
    if any(part.split("[")[0].strip() not in info.splits for part in split.split("+")):
        raise ValueError(f"unknown split {split!r} of {name}; splits: {info.splits}")
    drop_remainder = train if drop_remainder is None else drop_remainder
    if num_epochs is None:
        num_epochs = -1 if train else 1  # -1: repeat forever
    if not 0.0 <= oversample < 1.0:
        raise ValueError(f"oversample must be in [0, 1), got {oversample!r}")
    if oversample and (not train or oversample_filter is None):
        raise ValueError("oversample is for training (train=True) and needs oversample_filter")

    if cache_decoded is None:
        cache_decoded = train and _fits_in_memory(name, split, size, data_dir, process_index, process_count)
    decoded = None
    if cache_decoded:
        decoded = _decoded_split(name, split, size, data_dir=data_dir, manual_dir=manual_dir,
                                 process_index=process_index, process_count=process_count, prepare=prepare)
        # rows of the in-memory split, in the order decoded_examples reads the examples
        dataset = decoded.rows(train=train, seed=seed)
        if oversample:
            dataset = _mix_in_pool(dataset, decoded, oversample, oversample_filter, seed)
    elif oversample:
        raise ValueError(f"oversample needs the decoded split in memory (cache_decoded); {split!r} of {name} "
                         f"is not kept (it does not fit in half of the available memory, or cache_decoded=False)")
    else:
        dataset = decoded_examples(name, split, data_dir=data_dir, manual_dir=manual_dir, train=train, seed=seed,
                                   process_index=process_index, process_count=process_count, prepare=prepare)
    if train:  # the buffer's draws do not depend on what it holds: rows shuffle like the examples
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.repeat(num_epochs).enumerate()

    def prepare_example(position, example):
        if decoded is not None:
            example = decoded.example(example)  # already resized
        example = _resized_example(example, size, name)
        if not train:
            return example
        example_seed = tf.stack([tf.constant(seed, tf.int64), position])
        image, mask = aa.augment(example["image"], example["mask"], example_seed, use_autoaugment=autoaugment)
        return {**{key: example[key] for key in output_keys(name, train=True)}, "image": image, "mask": mask}

    dataset = dataset.map(prepare_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    # normalized per batch (the same floats as per image, bit for bit): the batch is assembled from uint8
    # images, and one compiled lookup normalizes it
    dataset = dataset.map(lambda batch: {**batch, "image": normalize_batch(batch["image"])},
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _mix_in_pool(rows: tf.data.Dataset, decoded, share: float, select: Callable, seed: int) -> tf.data.Dataset:
    """`rows` with each position replaced, with probability `share`, by a row of the pool that `select`
    picks from the split's filenames (see make_dataset's oversample); ends with `rows`."""
    filenames = [name.decode() if isinstance(name, bytes) else str(name)
                 for name in decoded.examples["filename"].numpy()]
    pool_rows = np.flatnonzero(np.asarray(select(filenames), bool))
    if not len(pool_rows):
        raise ValueError(f"oversample: the filter selects none of the {len(filenames)} images")
    pool = tf.data.Dataset.from_tensor_slices(tf.constant(pool_rows, tf.int64))
    pool = pool.shuffle(len(pool_rows), seed=seed, reshuffle_each_iteration=True).repeat()
    # stateless draws of (seed, position): the same choices whatever was read before
    choices = tf.data.Dataset.range(2 ** 62).map(lambda position: tf.cast(
        tf.random.stateless_uniform([], seed=tf.stack([tf.constant(seed, tf.int64), position]), dtype=tf.float32)
        < share, tf.int64))
    return tf.data.Dataset.choose_from_datasets([rows, pool], choices, stop_on_empty_dataset=True)


# The decoded, resized split `make_dataset(cache_decoded=True)` keeps: the most recent one only.
_DECODED_CACHE: dict = {}


def clear_decoded_cache() -> None:
    """Free the decoded split kept by `make_dataset(cache_decoded=True)` (datasets built on it keep
    their reference until they are deleted)."""
    _DECODED_CACHE.clear()


def _split_of_process(split: str, process_index, process_count):
    index, count = _process_slot(process_index, process_count)
    return tfds.split_for_jax_process(split, process_index=index, process_count=count) if count > 1 else split


def _fits_in_memory(name, split, size, data_dir, process_index, process_count) -> bool:
    """Whether the decoded split (uint8 image and mask at size x size) takes at most half of the memory
    available now (True when either is unknown, e.g. a data set not built yet)."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        examples = builder.info.splits[_split_of_process(split, process_index, process_count)].num_examples
    except (KeyError, ValueError, AssertionError):
        return True
    available = _available_memory()
    needed = examples * (4 * size * size + 4 * dataset_info(name).num_classes + 256)
    return available is None or needed <= available // 2


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux' MemAvailable: free plus reclaimable page cache), else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclasses.dataclass(frozen=True)
class _DecodedSplit:
    """This process's share of a split, decoded and resized, in memory (stored order), and the tfds
    example ids that locate a row."""
    key: tuple
    builder: object
    split: object
    examples: dict  # key -> tensor [N, ...]
    row_of_id: object  # tf.lookup.StaticHashTable: tfds_id -> row

    @property
    def size(self) -> int:
        return int(self.examples["image"].shape[0])

    def rows(self, train: bool, seed: int) -> tf.data.Dataset:
        """One pass of row numbers in `decoded_examples(train=train, seed=seed)`'s order."""
        if not train:
            return tf.data.Dataset.range(self.size)  # the stored order
        ids = _example_ids(self.builder, self.split, shuffle_files=True, seed=seed)
        return ids.map(self.row_of_id.lookup)

    def example(self, row):
        return {key: tf.gather(values, row) for key, values in self.examples.items()}


def _example_ids(builder, split, shuffle_files: bool, seed: int) -> tf.data.Dataset:
    """The tfds ids of the split's examples in the order `decoded_examples` reads them (same files, same
    file shuffle and interleave), parsing one small feature only."""
    small = "has_mask" if "has_mask" in builder.info.features else "image/filename"
    dataset = builder.as_dataset(split=split, shuffle_files=shuffle_files,
                                 decoders=tfds.decode.PartialDecoding({small: True}),
                                 read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False, add_tfds_id=True))
    return dataset.map(lambda example: example["tfds_id"])


def _decoded_split(name, split, size, *, data_dir, manual_dir, process_index, process_count, prepare):
    """The split decoded and resized once (see `make_dataset`'s cache_decoded), or the kept one."""
    builder = tfds.builder(name, data_dir=data_dir)
    process_split = _split_of_process(split, process_index, process_count)
    key = (name, str(builder.data_dir), str(process_split), size)
    kept = _DECODED_CACHE.get(key)
    if kept is not None:
        return kept
    _DECODED_CACHE.clear()  # the previous split goes before this one is decoded
    examples = decoded_examples(name, split, data_dir=data_dir, manual_dir=manual_dir, train=False,
                                process_index=process_index, process_count=process_count, prepare=prepare)
    builder = tfds.builder(name, data_dir=data_dir)  # prepared now

    def resized(example):
        return _resized_example(example, size, name)

    ids = _example_ids(builder, process_split, shuffle_files=False, seed=0)  # the stored order too
    chunks = tf.data.Dataset.zip(ids, examples.map(resized, num_parallel_calls=tf.data.AUTOTUNE,
                                                   deterministic=True)).batch(256)
    id_chunks, example_chunks = [], []
    for chunk_ids, chunk in chunks:
        id_chunks.append(chunk_ids)
        example_chunks.append(chunk)
    if not id_chunks:
        raise ValueError(f"split {split!r} of {name} holds no examples for this process")
    all_ids = tf.concat(id_chunks, 0)
    columns = {key: tf.concat([chunk[key] for chunk in example_chunks], 0) for key in example_chunks[0]}
    del example_chunks
    row_of_id = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(all_ids, tf.range(tf.size(all_ids, out_type=tf.int64))), -1)
    decoded = _DecodedSplit(key, builder, process_split, columns, row_of_id)
    _DECODED_CACHE[key] = decoded
    return decoded


def decoded_examples(name: str, split: str, *, data_dir=None, manual_dir=None, train: bool = False,
                     seed: int = 0, process_index: int | None = None, process_count: int | None = None,
                     prepare: bool = True) -> tf.data.Dataset:
    """The first stage of `make_dataset`: this process's examples of the split, one pass, decoded
    (uint8 images at their stored size) and mapped onto image, labels, mask, has_mask, filename. In the
    stored order unless `train`, which shuffles the files (seeded by `seed`)."""
    info = dataset_info(name)
    builder = tfds.builder(name, data_dir=data_dir)
    if prepare:
        own_builder = _family(name) in ("gain_shapes", "gain_voc2012", "gain_parts")
        with quiet.quiet_stdout():  # tfds prints "Downloading and preparing dataset ..." (shown if verbose)
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir, try_download_gcs=not own_builder))
    index, count = _process_slot(process_index, process_count)
    if count > 1:
        split = tfds.split_for_jax_process(split, process_index=index, process_count=count)

    # No tfds auto-cache: it caches small data sets, and this stream is read past one pass only when it
    # repeats; a training epoch stops part-way through an endless stream, an evaluation may stop early,
    # and a partly read cache is thrown away with a warning ("did not fully read the dataset being
    # cached") without ever being used. Each `make_dataset` is a new dataset, so no cache outlives it
    # (`make_dataset(cache_decoded=True)` keeps the decoded split in tensors it reads in full instead).
    dataset = builder.as_dataset(split=split, shuffle_files=train, decoders={"image": _image_decoder()},
                                 read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False))
    return dataset.map(_common_features(name, info.num_classes), num_parallel_calls=tf.data.AUTOTUNE)


def parts_evaluation_batches(split: str, indices, part_fraction: float = parts.PART_FRACTIONS[0],
                             body_reliability: float = parts.BODY_RELIABILITIES[0], batch_size: int = 8,
                             image_size: int = parts.IMAGE_SIZE) -> Iterator[dict]:
    """gain_parts' examples `indices` of `split` (a split, or a held-out stream `parts.heldout_split(seed)`) of the
    config (`part_fraction`, `body_reliability`), generated now, in batches of `batch_size` (the last one
    partial), as `input_pipeline(..., train=False)` yields a split's: numpy dicts with its keys
    (`output_keys("gain_parts")`), dtypes and values, image and masks resized as it resizes them (`image_size`),
    the image normalized by `normalize_batch`. For a split's examples it equals `input_pipeline`'s batches of
    them in the same order, bit for bit (tests/test_data_parts.py; a split's stored order is not its indices');
    a held-out stream's images are stored nowhere, and this is the way to them."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    rows = []
    for index in indices:
        rows.append(_parts_evaluation_example(split, int(index), part_fraction, body_reliability, image_size))
        if len(rows) == batch_size:
            yield _parts_evaluation_batch(rows)
            rows = []
    if rows:
        yield _parts_evaluation_batch(rows)


def _parts_evaluation_example(split, index, part_fraction, body_reliability, image_size) -> dict:
    """One gain_parts example as the evaluation pipeline has it before batching: decoded, resized with its masks."""
    example = parts.generate_example(split, index, part_fraction, body_reliability)
    example.update(image=shapes.decode_png(example["image"]), filename=example["filename"].encode())
    spatial = ("image", "mask", *EVAL_MASK_KEYS["gain_parts"])
    resized = _resized_example({key: tf.constant(example[key]) for key in spatial}, image_size, "gain_parts")
    return {**example, **{key: value.numpy() for key, value in resized.items()}}


_PARTS_DTYPES = {"labels": np.float32, "has_mask": np.bool_, "filename": object, "body_texture": np.int64}


def _parts_evaluation_batch(rows: list) -> dict:
    batch = {key: np.array([row[key] for row in rows], dtype=_PARTS_DTYPES.get(key))
             for key in output_keys("gain_parts")}
    return {**batch, "image": np.asarray(normalize_batch(batch["image"]))}


def input_pipeline(name: str, split: str, data_dir=None, manual_dir=None, image_size: int | None = None,
                   batch_size: int = 8, train: bool = True, seed: int = 0, autoaugment: bool = True,
                   shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, drop_remainder: bool | None = None,
                   num_epochs: int | None = None, process_index: int | None = None,
                   process_count: int | None = None, cache_decoded: bool | None = None,
                   oversample: float = 0.0, oversample_filter: Callable | None = None) -> Iterator[dict]:
    """Batches of numpy dicts from a tfds data set, prepared (built) first when needed.

    name: "gain_shapes" (or its opt-in version "gain_shapes:3.0.0"), "gain_parts" (or one of its configs,
      "gain_parts/part04_rel080"), "gain_voc2012" (from `manual_dir`) or "voc/2012" (tfds' download, no masks).
    image_size: None = the data set's default (64 for gain_shapes, 224 for VOC).
    train: shuffle (files and a `shuffle_buffer`), augment (AutoAugment if `autoaugment`, then a random
      horizontal flip), repeat `num_epochs` times (None: forever; in eval once), drop the last partial
      batch unless `drop_remainder` says otherwise.
    process_index / process_count: this process's even share of the split (multi-host); by default JAX's
      process index and count when JAX is imported, else the whole split. `batch_size` is per process.
    cache_decoded: keep the split decoded and resized in memory across passes and calls (see
      `make_dataset`); None: in training when it fits in half of the available memory. Same batches.
    oversample / oversample_filter: draw about this share of the training examples again from the images
      the filter selects (see `make_dataset`).
    Yields {"image": float32 [B,S,S,3] (ImageNet-normalized), "labels": float32 [B,C],
            "mask": uint8 [B,S,S] (0 bg, class + 1, 255 ignore), "has_mask": bool [B], "filename": bytes [B]},
      and for gain_shapes "bias_conflicting": bool [B] (the cue texture is a non-label class's own);
      for gain_parts "body_texture": int64 [B] (the class whose texture the body shows), and in evaluation
      (train=False) "body_mask", "part_mask": uint8 [B,S,S] (1 on the body without the part, on the part).
    """
    dataset = make_dataset(name, split, data_dir=data_dir, manual_dir=manual_dir, image_size=image_size,
                           batch_size=batch_size, train=train, seed=seed, autoaugment=autoaugment,
                           shuffle_buffer=shuffle_buffer, drop_remainder=drop_remainder, num_epochs=num_epochs,
                           process_index=process_index, process_count=process_count, cache_decoded=cache_decoded,
                           oversample=oversample, oversample_filter=oversample_filter)
    return iter(tfds.as_numpy(dataset))
