"""The "gain_shapes" tfds builder: content, class balance and the background bias it is built to have.
Expectations derive from the generator's constants (shapes.BIAS_PROBABILITY, TEXTURE_CONTRAST, ...), so the
tests hold for other values of them. The current version is 3.0.0 (a cue patch per object); 2.0.0 is checked to
still build."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import gain_jax.data as gd
from gain_jax.data import shapes

NUM_CLASSES = len(shapes.CLASS_NAMES)
MAX_OBJECTS = len(shapes.NUM_OBJECTS_PROBS)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """The whole data set, built once in a temporary data_dir, as numpy columns per split."""
    builder = tfds.builder("gain_shapes", data_dir=str(tmp_path_factory.mktemp("tfds")))
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
    assert info.splits == ("train", "validation", "validation_unbiased", "test_unbiased", "train_unbiased")
    assert shapes.SPLIT_SIZES == {"train": 3000, "validation": 600, "validation_unbiased": 600, "test_unbiased": 600,
                                  "train_unbiased": 3000}  # the oracle's training set: as large as train
    assert set(shapes.UNBIASED_SPLITS) == {"validation_unbiased", "test_unbiased", "train_unbiased"}
    builder = tfds.builder("gain_shapes")
    assert str(builder.version) == "3.0.0" and {"2.0.0", "3.0.0"} <= set(builder.RELEASE_NOTES)
    assert [str(v) for v in builder.SUPPORTED_VERSIONS] == ["2.0.0"]


def test_version_2_design_is_still_generated():
    """generate_example(..., "2.0.0") renders 2.0.0's design (the whole background a two-colour texture, the
    first object's class's own in most biased images), not 3.0.0's. (tfds prepares only the current version; a
    2.0.0 already prepared still loads as "gain_shapes:2.0.0".)"""
    own, count = 0, 300
    for index in range(count):
        old, new = shapes.generate_example("train", index, "2.0.0"), shapes.generate_example("train", index)
        image = shapes.decode_png(old["image"])
        assert len(np.unique(image[old["mask"] == 0], axis=0)) == 2
        assert not np.array_equal(image, shapes.decode_png(new["image"]))
        own += int(old["labels"][old["background"]] == 1)
    assert 0.85 < own / count < 0.97  # bias 0.9 (a second object may own the other texture): not every image
    with pytest.raises(ValueError, match="unknown gain_shapes version"):
        shapes.generate_example("train", 0, "9.9.9")


def test_split_sizes_dtypes_and_shapes(splits):
    for split, size in shapes.SPLIT_SIZES.items():
        columns = splits[split]
        assert columns["image"].shape == (size, 64, 64, 3) and columns["image"].dtype == np.uint8
        assert columns["mask"].shape == (size, 64, 64) and columns["mask"].dtype == np.uint8
        assert columns["labels"].shape == (size, NUM_CLASSES) and columns["labels"].dtype == np.float32
        assert columns["has_mask"].all()
        assert sorted(columns["filename"]) == [f"shapes_{split}_{i:06d}" for i in range(size)]


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


def test_class_balance(splits):
    """Each class is about 1/6 of the primary objects and of the labels, in every split."""
    for split, columns in splits.items():
        size = len(columns["primary"])
        primary_share = np.bincount(columns["primary"], minlength=NUM_CLASSES) / size
        label_share = columns["labels"].sum(0) / columns["labels"].sum()
        tolerance = 4.5 * np.sqrt((1 / 6) * (5 / 6) / size)  # ~4.5 binomial standard deviations
        np.testing.assert_allclose(primary_share, 1 / 6, atol=tolerance, err_msg=split)
        np.testing.assert_allclose(label_share, 1 / 6, atol=tolerance, err_msg=split)


def test_background_bias_rate(splits):
    """The first object's cue texture ("background") = the primary class's own texture: BIAS_PROBABILITY in
    train/validation, chance (1/6) in the unbiased splits. In the biased splits the other images (if any) spread
    over the 5 other textures; in every split each texture is about 1/6 of the cues."""
    for split, columns in splits.items():
        size = len(columns["primary"])
        agreement = (columns["background"] == columns["primary"]).mean()
        expected = 1 / NUM_CLASSES if split in shapes.UNBIASED_SPLITS else shapes.BIAS_PROBABILITY
        tolerance = 4.5 * np.sqrt(expected * (1 - expected) / size)
        assert abs(agreement - expected) <= tolerance, (split, agreement)  # exactly 1 when the bias is
        background_share = np.bincount(columns["background"], minlength=NUM_CLASSES) / size
        np.testing.assert_allclose(background_share, 1 / 6, atol=4.5 * np.sqrt(5 / 36 / size), err_msg=split)
        if split == "train" and shapes.BIAS_PROBABILITY < 1:
            others = columns["background"][columns["background"] != columns["primary"]]
            offsets = (others - columns["primary"][columns["background"] != columns["primary"]]) % NUM_CLASSES
            assert set(offsets.tolist()) == set(range(1, NUM_CLASSES)), split


def test_unbiased_splits_are_distinct_images(splits):
    """validation_unbiased and test_unbiased come from different seeds: no image is in both."""
    first = {image.tobytes() for image in splits["validation_unbiased"]["image"]}
    assert not any(image.tobytes() in first for image in splits["test_unbiased"]["image"])


def test_cue_patches_are_local_and_one_per_object():
    """3.0.0's cue: per object a PATCH_SIZE square of the texture's two colours (TEXTURE_CONTRAST apart in every
    channel), clear of the shapes and their ignore ring (mask 0 there), its class's own texture in the biased
    splits; the rest of the background is one colour plus noise of at most BACKGROUND_NOISE."""
    from gain_jax.data import shapes_render

    design, size = shapes.current_design(), shapes.PATCH_SIZE
    for split in ("train", "validation_unbiased"):
        for index in range(100):
            example = shapes_render.render(split, index, design)
            image, mask = example["image"].astype(int), example["mask"]
            assert len(example["patches"]) == len(example["cues"]) == len(example["classes"])
            if split == "train":
                assert example["cues"] == [int(c) for c in example["classes"]]
            colour_a, colour_b = (np.asarray(c, int) for c in example["colours"])
            np.testing.assert_array_equal(np.abs(colour_a - colour_b), [shapes.TEXTURE_CONTRAST] * 3)
            in_patch = np.zeros(mask.shape, bool)
            for top, left in example["patches"]:
                window = (slice(top, top + size), slice(left, left + size))
                assert (mask[window] == 0).all()
                pixels = image[window].reshape(-1, 3)
                assert ((pixels == colour_a).all(1) | (pixels == colour_b).all(1)).all()
                in_patch[window] = True
            plain = image[(mask == 0) & ~in_patch]
            assert np.abs(plain - colour_a).max() <= shapes.BACKGROUND_NOISE


def test_textures_differ_between_classes():
    """Textures are strongly discriminative, even within a 16x16 patch: a crude statistic of a patch's pixels
    (the fraction of horizontal vs vertical neighbour changes) already separates most of them."""
    from gain_jax.data import shapes_render

    design, size = shapes.current_design(), shapes.PATCH_SIZE
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
