"""The "gain_shapes" tfds builder: content, class balance and the background bias it is built to have.
Expectations derive from the generator's constants (shapes.BIAS_PROBABILITY, TEXTURE_CONTRAST, ...), so the
tests hold for other values of them. The default version is 2.0.0; the opt-in 3.0.0 (a cue patch per object,
"gain_shapes:3.0.0") is checked at the end."""
import hashlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import gain_jax.data as gd
from gain_jax.data import shapes

NUM_CLASSES = len(shapes.CLASS_NAMES)
MAX_OBJECTS = len(shapes.NUM_OBJECTS_PROBS)


@pytest.fixture(scope="module")
def splits(shapes_data_dir):
    """The whole data set as numpy columns per split, from the session's data dir (tests/conftest.py: this
    builder's download_and_prepare in a temporary folder, once per session, shared with the training tests)."""
    builder = tfds.builder("gain_shapes", data_dir=shapes_data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    columns = {}
    for split in shapes.SPLIT_SIZES:
        def flatten(example):
            object_labels = example["objects"]["label"]
            return {**{key: example[key] for key in ("image", "mask", "labels", "has_mask", "background",
                                                    "filename")},
                    "primary": object_labels[0],  # objects are stored in drawing order
                    "object_labels": tf.pad(object_labels, [[0, MAX_OBJECTS - tf.size(object_labels)]],
                                            constant_values=-1)}
        batch = next(iter(tfds.as_numpy(builder.as_dataset(split=split).map(flatten).batch(100_000))))
        batch["filename"] = [name.decode() for name in batch["filename"]]
        batch["object_labels"] = [row[row >= 0] for row in batch["object_labels"]]
        columns[split] = batch
    return columns


def test_registered_and_described():
    assert "gain_shapes" in tfds.list_builders()
    info = gd.dataset_info("gain_shapes")
    assert info.num_classes == NUM_CLASSES == 6
    assert info.class_names == shapes.CLASS_NAMES == gd.CLASS_NAMES["gain_shapes"]
    assert info.image_size == 64
    assert info.splits == ("train", "validation", "validation_unbiased", "test_unbiased")
    assert shapes.SPLIT_SIZES == {"train": 3000, "validation": 600, "validation_unbiased": 600, "test_unbiased": 600}
    assert set(shapes.UNBIASED_SPLITS) == {"validation_unbiased", "test_unbiased"}
    builder = tfds.builder("gain_shapes")
    assert str(builder.version) == "2.0.0" and {"2.0.0", "3.0.0"} <= set(builder.RELEASE_NOTES)
    assert [str(v) for v in builder.SUPPORTED_VERSIONS] == ["3.0.0"]  # opt-in: "gain_shapes:3.0.0"


@pytest.mark.slow
def test_split_sizes_dtypes_and_shapes(splits):
    for split, size in shapes.SPLIT_SIZES.items():
        columns = splits[split]
        assert columns["image"].shape == (size, 64, 64, 3) and columns["image"].dtype == np.uint8
        assert columns["mask"].shape == (size, 64, 64) and columns["mask"].dtype == np.uint8
        assert columns["labels"].shape == (size, NUM_CLASSES) and columns["labels"].dtype == np.float32
        assert columns["has_mask"].all()
        assert sorted(columns["filename"]) == [f"shapes_{split}_{i:06d}" for i in range(size)]


@pytest.mark.slow
def test_labels_objects_and_masks_agree(splits):
    """Labels = the objects' classes = the classes the mask shows; the mask uses VOC's encoding."""
    for split in shapes.SPLIT_SIZES:
        columns = splits[split]
        for labels, objects, mask in zip(columns["labels"], columns["object_labels"], columns["mask"]):
            assert set(np.unique(labels)) <= {0.0, 1.0}
            assert 1 <= labels.sum() <= MAX_OBJECTS
            assert set(np.flatnonzero(labels)) == set(objects.tolist())
            values = set(np.unique(mask).tolist())
            assert values <= set(range(NUM_CLASSES + 1)) | {255}
            assert 0 in values and 255 in values  # background and the ignore ring
            assert {v - 1 for v in values - {0, 255}} == set(objects.tolist())


@pytest.mark.slow
def test_objects_are_small_so_the_background_dominates(splits):
    """Every image shows each of its labels, and the background stays the larger part: the shapes (with their
    ignore ring) cover at most MAX_OBJECTS discs of radius RADIUS_RANGE[1] + 1."""
    mask = splits["train"]["mask"]
    background_fraction = (mask == 0).mean(axis=(1, 2))
    largest = MAX_OBJECTS * np.pi * (shapes.RADIUS_RANGE[1] + 1.5) ** 2 / shapes.IMAGE_SIZE ** 2
    assert background_fraction.min() > 1 - largest
    assert background_fraction.mean() > 0.5
    counts = np.array([len(objects) for objects in splits["train"]["object_labels"]])
    share = np.bincount(counts - 1, minlength=MAX_OBJECTS) / len(counts)
    tolerance = 4.5 * np.sqrt(0.25 / len(counts))
    np.testing.assert_allclose(share, shapes.NUM_OBJECTS_PROBS, atol=tolerance)


@pytest.mark.slow
def test_class_balance(splits):
    """Each class is about 1/6 of the primary objects and of the labels, in every split."""
    for split, columns in splits.items():
        size = len(columns["primary"])
        primary_share = np.bincount(columns["primary"], minlength=NUM_CLASSES) / size
        label_share = columns["labels"].sum(0) / columns["labels"].sum()
        tolerance = 4.5 * np.sqrt((1 / 6) * (5 / 6) / size)  # ~4.5 binomial standard deviations
        np.testing.assert_allclose(primary_share, 1 / 6, atol=tolerance, err_msg=split)
        np.testing.assert_allclose(label_share, 1 / 6, atol=tolerance, err_msg=split)


@pytest.mark.slow
def test_background_bias_rate(splits):
    """Background texture = the primary class's own texture: BIAS_PROBABILITY in train/validation, chance (1/6)
    in the unbiased splits (validation_unbiased, test_unbiased). In the biased splits the other images spread
    over the 5 other textures; in every split each texture is about 1/6 of the backgrounds."""
    for split, columns in splits.items():
        size = len(columns["primary"])
        agreement = (columns["background"] == columns["primary"]).mean()
        expected = 1 / NUM_CLASSES if split in shapes.UNBIASED_SPLITS else shapes.BIAS_PROBABILITY
        tolerance = 4.5 * np.sqrt(expected * (1 - expected) / size)
        assert abs(agreement - expected) < tolerance, (split, agreement)
        background_share = np.bincount(columns["background"], minlength=NUM_CLASSES) / size
        np.testing.assert_allclose(background_share, 1 / 6, atol=4.5 * np.sqrt(5 / 36 / size), err_msg=split)
        if split == "train" and shapes.BIAS_PROBABILITY < 1:
            others = columns["background"][columns["background"] != columns["primary"]]
            offsets = (others - columns["primary"][columns["background"] != columns["primary"]]) % NUM_CLASSES
            assert set(offsets.tolist()) == set(range(1, NUM_CLASSES)), split


@pytest.mark.slow
def test_unbiased_splits_are_distinct_images(splits):
    """validation_unbiased and test_unbiased come from different seeds: no image is in both."""
    first = {image.tobytes() for image in splits["validation_unbiased"]["image"]}
    assert not any(image.tobytes() in first for image in splits["test_unbiased"]["image"])


@pytest.mark.slow
def test_faint_texture_two_colours_differ_by_the_contrast(splits):
    """v2's background: exactly two colours per image, TEXTURE_CONTRAST apart in every channel."""
    for split in ("train", "validation_unbiased"):
        columns = splits[split]
        for image, mask in zip(columns["image"][:200], columns["mask"][:200]):
            colours = np.unique(image[mask == 0], axis=0).astype(int)
            assert len(colours) == 2, colours
            np.testing.assert_array_equal(np.abs(colours[0] - colours[1]), [shapes.TEXTURE_CONTRAST] * 3)


@pytest.mark.slow
def test_textures_differ_between_classes(splits):
    """Textures are strongly discriminative: a crude statistic of the background pixels (the fraction of
    horizontal vs vertical neighbour changes) already separates most of them."""
    columns = splits["validation"]
    gray = columns["image"].astype(np.int32).sum(-1)
    background = columns["mask"] == 0
    horizontal = ((gray[:, :, 1:] != gray[:, :, :-1]) & background[:, :, 1:] & background[:, :, :-1]).mean((1, 2))
    vertical = ((gray[:, 1:, :] != gray[:, :-1, :]) & background[:, 1:, :] & background[:, :-1, :]).mean((1, 2))
    features = np.stack([horizontal, vertical], 1)
    centroids = np.stack([features[columns["background"] == t].mean(0) for t in range(NUM_CLASSES)])
    nearest = np.argmin(((features[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == columns["background"]).mean() > 0.6


@pytest.mark.slow
def test_generation_is_deterministic_and_matches_the_builder(splits):
    columns = splits["train"]
    position = columns["filename"].index("shapes_train_000123")
    first = shapes.generate_example("train", 123)
    second = shapes.generate_example("train", 123)
    np.testing.assert_array_equal(shapes.decode_png(first["image"]), columns["image"][position])
    np.testing.assert_array_equal(shapes.decode_png(first["image"]), shapes.decode_png(second["image"]))
    np.testing.assert_array_equal(first["mask"], columns["mask"][position])
    np.testing.assert_array_equal(first["labels"], columns["labels"][position])
    assert first["background"] == columns["background"][position]
    with pytest.raises(ValueError, match="unknown gain_shapes split 'test'"):
        shapes.generate_example("test", 0)


# 2.0.0's images as main's generator rendered them before 3.0.0 existed (sha256 over image, mask, labels and
# texture of every 37th example of each split): the default data set must not move by a byte.
V2_DIGESTS = {"train": "c6d018449833845c4a22667a1fc059de9364ecb761c3f037ac9bdb486ba8f80b",
              "validation": "178d7e30b04736def2f4f7a0d6c60b440405e4b07e6829ea97e91460efe73162",
              "validation_unbiased": "667fc622c5e9622c58b16ec1b1cbb2095b6fffea7b20a40dbab99f1700e2820d",
              "test_unbiased": "0d204edbef1b91a6892badfd4d940da831383677ac24e9e4b8b18458dd4817a2"}


def test_version_2_is_rendered_as_before():
    for split, digest in V2_DIGESTS.items():
        hashed = hashlib.sha256()
        for index in range(0, shapes.SPLIT_SIZES[split], 37):
            example = shapes.generate_example(split, index)
            for part in (shapes.decode_png(example["image"]), example["mask"], example["labels"]):
                hashed.update(part.tobytes())
            hashed.update(bytes([example["background"]]))
        assert hashed.hexdigest() == digest, split


# ------------------------------------------------------------------------------------------- 3.0.0 (opt-in)

V3 = "3.0.0"


def test_version_3_is_opt_in_and_described():
    info = gd.dataset_info("gain_shapes:3.0.0")
    assert info.class_names == shapes.CLASS_NAMES and info.image_size == 64
    assert info.splits == ("train", "validation", "validation_unbiased", "test_unbiased", "train_unbiased")
    assert shapes.VERSION_SPLIT_SIZES[V3]["train_unbiased"] == shapes.SPLIT_SIZES["train"]  # the oracle's train
    assert "train_unbiased" not in shapes.SPLIT_SIZES and "train_unbiased" not in gd.dataset_info("gain_shapes").splits
    assert "gain_shapes:3.0.0" in gd.DATASETS
    assert gd.final_splits("gain_shapes:3.0.0", test=True) == ("validation", "validation_unbiased", "test_unbiased")
    with pytest.raises(ValueError, match="unknown gain_shapes version"):
        shapes.generate_example("train", 0, "9.9.9")


@pytest.mark.slow
def test_both_versions_prepare_from_scratch_in_one_data_dir(tmp_path, monkeypatch):
    """tfds prepares the default (2.0.0) and, asked by name, the opt-in 3.0.0 (with its train_unbiased) side by
    side; each split holds its own version's examples (small sizes: the generator reads them at build time)."""
    monkeypatch.setitem(shapes.VERSION_SPLIT_SIZES, V3, dict(train=8, validation=4, validation_unbiased=4,
                                                               test_unbiased=4, train_unbiased=6))
    monkeypatch.setattr(shapes, "SPLIT_SIZES", dict(train=6, validation=4, validation_unbiased=4, test_unbiased=4))
    download = tfds.download.DownloadConfig(try_download_gcs=False)
    for name, version in (("gain_shapes", "2.0.0"), ("gain_shapes:3.0.0", V3)):
        builder = tfds.builder(name, data_dir=str(tmp_path))
        assert str(builder.version) == version
        builder.download_and_prepare(download_config=download)
        sizes = shapes.design_of(version).splits
        assert {split: info.num_examples for split, info in builder.info.splits.items()} == sizes
        for split in sizes:
            example = next(iter(tfds.as_numpy(builder.as_dataset(split=split).take(1))))
            index = int(example["filename"].decode().rsplit("_", 1)[1])
            expected = shapes.generate_example(split, index, version)
            np.testing.assert_array_equal(example["image"], shapes.decode_png(expected["image"]))
            np.testing.assert_array_equal(example["mask"], expected["mask"])
    assert sorted(path.name for path in (tmp_path / "gain_shapes").iterdir()) == ["2.0.0", V3]


def test_version_3_differs_from_version_2():
    """The two designs render different images from the same (split, index): 2.0.0's background is one
    two-colour texture, 3.0.0's is a noisy plain colour with patches (many more colours)."""
    for index in range(20):
        old, new = (shapes.decode_png(shapes.generate_example("train", index, v)["image"]) for v in ("2.0.0", V3))
        old_mask = shapes.generate_example("train", index, "2.0.0")["mask"]
        assert len(np.unique(old[old_mask == 0], axis=0)) == 2
        assert not np.array_equal(old, new)


def test_cue_patches_are_local_and_one_per_object():
    """3.0.0's cue: per object a patch_size square of the texture's two colours (texture_contrast apart in every
    channel), clear of the shapes and their ignore ring (mask 0 there), its class's own texture in the biased
    splits; the rest of the background is one colour plus noise of at most background_noise."""
    from gain_jax.data import shapes_render

    design = shapes.design_of(V3)
    size = design.patch_size
    for split in ("train", "validation_unbiased"):
        for index in range(100):
            example = shapes_render.render(split, index, design)
            image, mask = example["image"].astype(int), example["mask"]
            assert len(example["patches"]) == len(example["cues"]) == len(example["classes"])
            if split == "train":
                assert example["cues"] == [int(c) for c in example["classes"]]
            colour_a, colour_b = (np.asarray(c, int) for c in example["colours"])
            np.testing.assert_array_equal(np.abs(colour_a - colour_b), [design.texture_contrast] * 3)
            in_patch = np.zeros(mask.shape, bool)
            for top, left in example["patches"]:
                window = (slice(top, top + size), slice(left, left + size))
                assert (mask[window] == 0).all()
                pixels = image[window].reshape(-1, 3)
                assert ((pixels == colour_a).all(1) | (pixels == colour_b).all(1)).all()
                in_patch[window] = True
            plain = image[(mask == 0) & ~in_patch]
            assert np.abs(plain - colour_a).max() <= design.background_noise


def test_version_3_textures_differ_between_classes():
    """Textures are strongly discriminative, even within a 16x16 patch: a crude statistic of a patch's pixels
    (the fraction of horizontal vs vertical neighbour changes) already separates most of them."""
    from gain_jax.data import shapes_render

    design = shapes.design_of(V3)
    size = design.patch_size
    features, textures = [], []
    for index in range(300):
        example = shapes_render.render("validation_unbiased", index, design)
        top, left = example["patches"][0]
        gray = example["image"][top:top + size, left:left + size].astype(np.int32).sum(-1)
        features.append([(gray[:, 1:] != gray[:, :-1]).mean(), (gray[1:] != gray[:-1]).mean()])
        textures.append(example["cues"][0])
    features, textures = np.array(features), np.array(textures)
    centroids = np.stack([features[textures == t].mean(0) for t in range(NUM_CLASSES)])
    nearest = np.argmin(((features[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == textures).mean() > 0.6
