"""The "gain_shapes" tfds builder: content, class balance and the background bias it is built to have."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import gain_jax.data as gd
from gain_jax.data import shapes

NUM_CLASSES = len(shapes.CLASS_NAMES)


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
                    "object_labels": tf.pad(object_labels, [[0, 3 - tf.size(object_labels)]], constant_values=-1)}
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
    assert info.splits == ("train", "validation", "test_unbiased")


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
            assert 1 <= labels.sum() <= 3
            assert set(np.flatnonzero(labels)) == set(objects.tolist())
            values = set(np.unique(mask).tolist())
            assert values <= set(range(NUM_CLASSES + 1)) | {255}
            assert 0 in values and 255 in values  # background and the ignore ring
            assert {v - 1 for v in values - {0, 255}} == set(objects.tolist())


def test_objects_are_small_so_the_background_dominates(splits):
    mask = splits["train"]["mask"]
    background_fraction = (mask == 0).mean(axis=(1, 2))
    assert background_fraction.mean() > 0.85
    assert background_fraction.min() > 0.6


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
    """Background texture = the primary class's own texture: ~90% in train/validation, chance (1/6)
    in test_unbiased. In the biased splits the other 10% spread over the 5 other textures."""
    for split, columns in splits.items():
        size = len(columns["primary"])
        agreement = (columns["background"] == columns["primary"]).mean()
        expected = 1 / 6 if split == "test_unbiased" else shapes.BIAS_PROBABILITY
        tolerance = 4.5 * np.sqrt(expected * (1 - expected) / size)
        assert abs(agreement - expected) < tolerance, (split, agreement)
        background_share = np.bincount(columns["background"], minlength=NUM_CLASSES) / size
        np.testing.assert_allclose(background_share, 1 / 6, atol=4.5 * np.sqrt(5 / 36 / size), err_msg=split)


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
