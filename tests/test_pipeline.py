"""gd.input_pipeline on gain_shapes: shapes, dtypes, normalization, determinism, train vs eval, sharding."""
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

import gain_jax.data as gd
from gain_jax.data import shapes

EXAMPLES_PER_SPLIT = 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """gain_shapes with the first EXAMPLES_PER_SPLIT examples per split; input_pipeline then reuses it."""
    directory = str(tmp_path_factory.mktemp("tfds"))
    builder = tfds.builder("gain_shapes", data_dir=directory)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, max_examples_per_split=EXAMPLES_PER_SPLIT))
    return directory


def _raw(filename):
    """The example as generated, from its filename "shapes_<split>_<index>"."""
    split, index = filename.decode()[len("shapes_"):].rsplit("_", 1)
    example = shapes.generate_example(split, int(index))
    return shapes.decode_png(example["image"]), example["mask"], example["labels"]


def _take(iterator, count):
    return list(itertools.islice(iterator, count))


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_eval_batches_shapes_dtypes_and_normalization(data_dir):
    batches = list(gd.input_pipeline("gain_shapes", "validation", data_dir=data_dir, batch_size=16, train=False))
    # one pass, the last batch partial (drop_remainder defaults to train)
    assert [len(b["filename"]) for b in batches] == [16, 16, 8]
    batch = batches[0]
    assert set(batch) == {"image", "labels", "mask", "has_mask", "filename", "bias_conflicting"}
    assert batch["bias_conflicting"].shape == (16,) and batch["bias_conflicting"].dtype == bool
    assert batch["image"].shape == (16, 64, 64, 3) and batch["image"].dtype == np.float32  # native size
    assert batch["labels"].shape == (16, 6) and batch["labels"].dtype == np.float32
    assert batch["mask"].shape == (16, 64, 64) and batch["mask"].dtype == np.uint8
    assert batch["has_mask"].shape == (16,) and batch["has_mask"].dtype == bool and batch["has_mask"].all()
    assert isinstance(batch["filename"][0], bytes)
    mean, std = np.array(gd.IMAGENET_MEAN), np.array(gd.IMAGENET_STD)
    for position, filename in enumerate(batch["filename"]):
        image, mask, labels = _raw(filename)
        np.testing.assert_allclose((image / 255.0 - mean) / std, batch["image"][position], atol=1e-5)
        np.testing.assert_array_equal(batch["mask"][position], mask)  # eval: untouched
        np.testing.assert_array_equal(batch["labels"][position], labels)
        split, index = filename.decode()[len("shapes_"):].rsplit("_", 1)
        example = shapes.generate_example(split, int(index))  # the texture is a non-label class's own
        assert batch["bias_conflicting"][position] == (example["labels"][example["background"]] == 0)
    # eval order is the stored order, the same every time, covering the split once
    again = list(gd.input_pipeline("gain_shapes", "validation", data_dir=data_dir, batch_size=16, train=False))
    _assert_same_batches(batches, again)
    names = [n for b in batches for n in b["filename"]]
    assert len(set(names)) == EXAMPLES_PER_SPLIT


def test_normalize_batch_is_normalize_bit_for_bit():
    """The pipeline's compiled table lookup gives normalize()'s float32 bits for every level of every
    channel and on any batch shape; XLA-compiled arithmetic would not (its divisions differ in the last bit)."""
    from gain_jax.data import pipeline
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    rng = np.random.default_rng(0)
    for images in (levels, levels[None], rng.integers(0, 256, (5, 7, 9, 3), dtype=np.uint8),
                   rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)):
        looked_up = pipeline.normalize_batch(images).numpy()
        computed = pipeline.normalize(images).numpy()
        assert looked_up.dtype == computed.dtype == np.float32 and looked_up.shape == images.shape
        np.testing.assert_array_equal(looked_up.view(np.uint32), computed.view(np.uint32))


def test_resize_to_image_size(data_dir):
    batch = next(gd.input_pipeline("gain_shapes", "validation", data_dir=data_dir, image_size=32, batch_size=4,
                                   train=False))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["mask"].shape == (4, 32, 32)
    for position, filename in enumerate(batch["filename"]):
        _, mask, _ = _raw(filename)
        # nearest neighbour at an exact factor of 2 (half-pixel centres): every other pixel from (1, 1)
        np.testing.assert_array_equal(batch["mask"][position], mask[1::2, 1::2])


def test_train_is_deterministic_for_a_seed(data_dir):
    def run(seed):
        return _take(gd.input_pipeline("gain_shapes", "train", data_dir=data_dir, batch_size=8, train=True,
                                       seed=seed, shuffle_buffer=64), 7)
    first, second, other = run(0), run(0), run(1)
    _assert_same_batches(first, second)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))
    assert [a["filename"].tolist() for a in first] != [b["filename"].tolist() for b in other]


def test_train_shuffles_repeats_augments_and_drops_remainder(data_dir):
    batches = _take(gd.input_pipeline("gain_shapes", "train", data_dir=data_dir, batch_size=16, train=True,
                                      seed=3), 6)  # 96 examples from a 40-example split: it repeats
    assert all(len(b["filename"]) == 16 for b in batches)
    names = [n for b in batches for n in b["filename"]]
    assert len(set(names)) == EXAMPLES_PER_SPLIT
    assert names[:EXAMPLES_PER_SPLIT] != sorted(names[:EXAMPLES_PER_SPLIT])
    changed = 0
    for batch in batches[:2]:
        for position, filename in enumerate(batch["filename"]):
            image, mask, labels = _raw(filename)
            np.testing.assert_array_equal(batch["labels"][position], labels)
            augmented_mask = batch["mask"][position]
            # geometric ops only move pixels, fill with 255 or flip: the classes present cannot be new
            assert set(np.unique(augmented_mask).tolist()) <= set(np.unique(mask).tolist()) | {255}
            normalized = (image / 255.0 - np.array(gd.IMAGENET_MEAN)) / np.array(gd.IMAGENET_STD)
            changed += not np.allclose(batch["image"][position], normalized, atol=1e-5)
    assert changed >= 16  # AutoAugment + flip leave few images untouched
    plain = next(gd.input_pipeline("gain_shapes", "train", data_dir=data_dir, batch_size=16, train=True,
                                   autoaugment=False, seed=3))
    for position, filename in enumerate(plain["filename"]):  # flip only: the image or its mirror
        image, mask, _ = _raw(filename)
        normalized = (image / 255.0 - np.array(gd.IMAGENET_MEAN)) / np.array(gd.IMAGENET_STD)
        flipped = np.array_equal(plain["mask"][position], mask[:, ::-1])
        expected = normalized[:, ::-1] if flipped else normalized
        np.testing.assert_allclose(plain["image"][position], expected, atol=1e-5)
        np.testing.assert_array_equal(plain["mask"][position], mask[:, ::-1] if flipped else mask)


def test_num_epochs_and_drop_remainder(data_dir):
    batches = list(gd.input_pipeline("gain_shapes", "test_unbiased", data_dir=data_dir, batch_size=16,
                                     train=True, num_epochs=2, autoaugment=False))
    assert [len(b["filename"]) for b in batches] == [16] * 5  # 80 examples, drop_remainder
    batches = list(gd.input_pipeline("gain_shapes", "test_unbiased", data_dir=data_dir, batch_size=16,
                                     train=False, num_epochs=2, drop_remainder=True))
    assert [len(b["filename"]) for b in batches] == [16] * 5


def test_unbiased_splits_are_read_with_their_flag(data_dir):
    """validation_unbiased (for choosing configurations) reads like test_unbiased; its texture is independent of
    the classes, so more of its images are bias-conflicting than validation's."""
    conflicting = {}
    for split in ("validation", "validation_unbiased", "test_unbiased"):
        batches = list(gd.input_pipeline("gain_shapes", split, data_dir=data_dir, batch_size=16, train=False))
        names = [name.decode() for b in batches for name in b["filename"]]
        assert sorted(names) == [f"shapes_{split}_{i:06d}" for i in range(EXAMPLES_PER_SPLIT)]
        conflicting[split] = sum(int(b["bias_conflicting"].sum()) for b in batches)
    assert conflicting["validation"] < conflicting["validation_unbiased"]


def test_process_shards_are_disjoint_and_cover_the_split(data_dir):
    shards = [[n for b in gd.input_pipeline("gain_shapes", "validation", data_dir=data_dir, batch_size=8,
                                            train=False, process_index=i, process_count=3) for n in b["filename"]]
              for i in range(3)]
    assert [len(s) for s in shards] == [14, 13, 13]
    assert len(set().union(*shards)) == EXAMPLES_PER_SPLIT


def test_bad_arguments(data_dir):
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        gd.input_pipeline("imagenet", "train", data_dir=data_dir)
    with pytest.raises(ValueError, match="unknown split 'test' of gain_shapes"):
        gd.input_pipeline("gain_shapes", "test", data_dir=data_dir)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        gd.input_pipeline("gain_shapes", "train", data_dir=data_dir, image_size=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        gd.input_pipeline("gain_shapes", "train", data_dir=data_dir, batch_size=0)
    with pytest.raises(ValueError, match="process_index 3 not in"):
        gd.input_pipeline("gain_shapes", "train", data_dir=data_dir, process_index=3, process_count=3)


@pytest.mark.parametrize("train", [True, False])
def test_nothing_cached(data_dir, train):
    """tfds auto-caches small sets; a training epoch (an endless stream left part-way) or an evaluation
    stopped early would leave the cache partly read: TensorFlow then discards it with a warning."""
    for cache_decoded in (None, True, False):  # the decoded split is kept in tensors, not a tf.data cache
        dataset = gd.make_dataset("gain_shapes", "validation", data_dir=data_dir, batch_size=8, train=train,
                                  cache_decoded=cache_decoded)
        assert b"CacheDataset" not in dataset._as_serialized_graph().numpy()
    gd.clear_decoded_cache()


@pytest.fixture(scope="module")
def sharded_data_dir(tmp_path_factory):
    """gain_shapes, EXAMPLES_PER_SPLIT examples per split in 4 files: tfds shuffles and interleaves files."""
    directory = str(tmp_path_factory.mktemp("tfds_sharded"))
    builder = tfds.builder("gain_shapes", data_dir=directory)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, max_examples_per_split=EXAMPLES_PER_SPLIT, num_shards=4))
    assert builder.info.splits["train"].num_shards == 4
    return directory


@pytest.mark.parametrize("arguments", [
    {"train": True, "batch_size": 8, "seed": 3, "shuffle_buffer": 16},  # AutoAugment, > 2 passes
    {"train": True, "batch_size": 8, "seed": 5, "image_size": 32, "autoaugment": False},
    {"train": True, "batch_size": 8, "seed": 1, "process_index": 1, "process_count": 2},
    {"train": False, "batch_size": 16, "num_epochs": 2},
], ids=["train", "train_resized_flip_only", "train_shard", "eval"])
@pytest.mark.slow
def test_cached_decoded_split_gives_the_same_batches(sharded_data_dir, arguments):
    """cache_decoded changes where the decoded examples come from, not the batches: same order (files
    reshuffled on every pass), same augmentation, bit for bit."""
    def batches(cache_decoded):
        dataset = gd.make_dataset("gain_shapes", "train", data_dir=sharded_data_dir, cache_decoded=cache_decoded,
                                  **arguments)
        return _take(tfds.as_numpy(dataset), 12)
    gd.clear_decoded_cache()
    plain, cached, cached_again = batches(False), batches(True), batches(True)  # decoded, then kept
    _assert_same_batches(plain, cached)
    _assert_same_batches(plain, cached_again)
    names = [n for b in plain for n in b["filename"]]
    if arguments["train"]:  # passes differ: the files and the buffer are shuffled again
        passes = [names[i:i + EXAMPLES_PER_SPLIT // 2] for i in (0, EXAMPLES_PER_SPLIT // 2)] \
            if "process_index" in arguments else [names[:EXAMPLES_PER_SPLIT], names[EXAMPLES_PER_SPLIT:80]]
        assert sorted(passes[0]) == sorted(passes[1]) and passes[0] != passes[1]
    gd.clear_decoded_cache()


@pytest.mark.slow
def test_decoded_split_is_kept_for_later_calls_and_freed(sharded_data_dir):
    from gain_jax.data import pipeline

    gd.clear_decoded_cache()
    gd.make_dataset("gain_shapes", "train", data_dir=sharded_data_dir, train=False, cache_decoded=True)
    (kept,) = pipeline._DECODED_CACHE.values()
    assert kept.examples["image"].shape == (EXAMPLES_PER_SPLIT, 64, 64, 3)
    assert kept.examples["image"].dtype == "uint8" and kept.examples["mask"].shape == (EXAMPLES_PER_SPLIT, 64, 64)
    gd.make_dataset("gain_shapes", "train", data_dir=sharded_data_dir, seed=7, cache_decoded=True)
    assert list(pipeline._DECODED_CACHE.values()) == [kept]  # the same split: not decoded again
    gd.make_dataset("gain_shapes", "train", data_dir=sharded_data_dir, image_size=32, cache_decoded=True)
    (resized,) = pipeline._DECODED_CACHE.values()  # another size replaces it
    assert resized is not kept and resized.examples["image"].shape == (EXAMPLES_PER_SPLIT, 32, 32, 3)
    gd.make_dataset("gain_shapes", "train", data_dir=sharded_data_dir, cache_decoded=False)
    assert list(pipeline._DECODED_CACHE.values()) == [resized]
    gd.clear_decoded_cache()
    assert not pipeline._DECODED_CACHE
    # by default: training caches (40 small images fit), evaluation does not
    gd.make_dataset("gain_shapes", "validation", data_dir=sharded_data_dir, train=False)
    assert not pipeline._DECODED_CACHE
    gd.make_dataset("gain_shapes", "validation", data_dir=sharded_data_dir, train=True)
    assert len(pipeline._DECODED_CACHE) == 1
    gd.clear_decoded_cache()


QUIET_SCRIPT = """
import itertools, sys
{prelude}
import gain_jax.data as gd
from gain_jax.data import shapes
shapes.SPLIT_SIZES.update(train=64, validation=48, validation_unbiased=16, test_unbiased=16)  # a small build
data_dir = sys.argv[1]
# like train.py: the pipeline (built here on first use) re-created per epoch and left part-way
for epoch in range(2):
    for batch in itertools.islice(gd.input_pipeline("gain_shapes", "train", data_dir=data_dir, batch_size=16,
                                                    seed=epoch), 2):
        pass
names = [n for b in gd.input_pipeline("gain_shapes", "validation", data_dir=data_dir, batch_size=64,
                                      train=False) for n in b["filename"]]
print("program output", len(names))
"""
LIBRARY_NOISE = ("absl::InitializeLog", "oneDNN", "cpu_feature_guard", "is deprecated", "Generating",
                 "Shuffling", "Downloading and preparing", "downloaded and prepared", "did not fully read",
                 "WARNING", "I0000", "W0000")


def _run_script(prelude, data_dir):
    import os
    import subprocess
    import sys
    env = {key: value for key, value in os.environ.items() if key not in ("TF_CPP_MIN_LOG_LEVEL",)}
    return subprocess.run([sys.executable, "-c", QUIET_SCRIPT.format(prelude=prelude), str(data_dir)],
                          capture_output=True, text=True, env=env, timeout=600, check=True)


@pytest.mark.slow
def test_quiet_console_and_verbose(tmp_path):
    """Importing gain_jax.data, building gain_shapes and reading it prints only what the program prints;
    `quiet_libraries(verbose=True)` before the import brings the libraries' messages back."""
    quiet = _run_script("", tmp_path / "tfds")
    assert quiet.stdout == "program output 48\n"
    assert not [noise for noise in LIBRARY_NOISE if noise in quiet.stderr], quiet.stderr[-3000:]
    verbose = _run_script("from gain_jax import quiet; quiet.quiet_libraries(verbose=True)", tmp_path / "tfds")
    assert verbose.stdout.endswith("program output 48\n")
    assert "`FeatureConnector.dtype` is deprecated" in verbose.stderr  # tfds' warning, shown again
    assert "did not fully read" not in verbose.stderr  # nothing cached, even with nothing filtered


def test_oversample_draws_from_the_pool_and_refuses_what_it_cannot_do(data_dir):
    pool = {f"shapes_train_{index:06d}" for index in (0, 1, 2, 3)}

    def select(names):
        return np.array([name in pool for name in names])

    def names(oversample, seed=0):
        dataset = gd.make_dataset("gain_shapes", "train", data_dir=data_dir, batch_size=8, seed=seed,
                                  cache_decoded=True, oversample=oversample, oversample_filter=select)
        return [n.decode() for batch in _take(tfds.as_numpy(dataset), 10) for n in batch["filename"]]

    plain, oversampled = names(0.0), names(0.6)
    share = np.mean([name in pool for name in oversampled])
    assert np.mean([name in pool for name in plain]) < 0.25 and 0.45 < share < 0.8, share
    assert names(0.6) == oversampled and names(0.6, seed=1) != oversampled
    with pytest.raises(ValueError, match="oversample needs the decoded split in memory"):
        gd.make_dataset("gain_shapes", "train", data_dir=data_dir, cache_decoded=False, oversample=0.5,
                        oversample_filter=select)
    with pytest.raises(ValueError, match="the filter selects none of the 40 images"):
        gd.make_dataset("gain_shapes", "train", data_dir=data_dir, cache_decoded=True, oversample=0.5,
                        oversample_filter=lambda names: np.zeros(len(names), bool))
    with pytest.raises(ValueError, match=r"oversample must be in \[0, 1\)"):
        gd.make_dataset("gain_shapes", "train", data_dir=data_dir, oversample=1.0, oversample_filter=select)
    with pytest.raises(ValueError, match="oversample is for training"):
        gd.make_dataset("gain_shapes", "train", data_dir=data_dir, train=False, oversample=0.5,
                        oversample_filter=select)
    gd.clear_decoded_cache()


SHIELD_SCRIPT = """
import os
import numpy as np
{imports}
img, mask = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
{run}
print("ran; XLA_FLAGS", os.environ.get("XLA_FLAGS"))
"""


@pytest.mark.slow
def test_tensorflows_xla_does_not_read_the_xla_flags_meant_for_jax():
    """TensorFlow's own XLA copy aborts the process on an XLA_FLAGS entry it does not know (e.g. one of a newer
    jaxlib's); gain_jax.data starts it with XLA_FLAGS unset, so the pipeline's compiled ops run, and puts
    them back for JAX."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS="--xla_gain_flag_unknown_to_tensorflow=1")

    def run(imports, code):
        script = SHIELD_SCRIPT.format(imports=imports, run=code)
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)

    bare = run("import tensorflow as tf", "tf.function(lambda x: x * 2, jit_compile=True)(tf.constant([1.0]))")
    assert bare.returncode != 0 and "Unknown flag in XLA_FLAGS" in bare.stderr  # the hazard is real
    shielded = run("import tensorflow as tf\nfrom gain_jax.data import autoaugment as aa, pipeline",
                   "dataset = tf.data.Dataset.from_tensors((img, mask)).repeat(4).enumerate().map(\n"
                   "    lambda p, e: aa.augment(e[0], e[1], tf.stack([tf.constant(0, tf.int64), p])))\n"
                   "for batch in dataset.batch(2).map(lambda i, m: pipeline.normalize_batch(i)): pass\n"
                   "aa.equalize(tf.constant(img))\naa.rotate(tf.constant(img), tf.constant(mask), 30.0)")
    assert shielded.returncode == 0, shielded.stderr[-3000:]
    assert shielded.stdout.strip() == "ran; XLA_FLAGS --xla_gain_flag_unknown_to_tensorflow=1"
