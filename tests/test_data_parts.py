"""The "gain_parts" tfds builder: what each image holds (body, part, background), the body's reliability, the
masks, the "part erased" counterfactual, the builder configs and what the pipeline passes on; the held-out
streams and `pipeline.parts_evaluation_batches`. Expectations derive from the generator's constants
(parts.PART_FRACTIONS, BODY_RADIUS_RANGE, ...). The tfds build uses small split sizes (monkeypatched) to stay in
the fast tier."""
import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

import gain_jax.data as gd
from gain_jax import config as run_config
from gain_jax import datasets
from gain_jax.data import parts, pipeline, shapes

NUM_CLASSES = len(parts.CLASS_NAMES)
SIZE = parts.IMAGE_SIZE
SMALL_SPLITS = {"train": 24, "validation": 12, "test": 8}


def example_arrays(split, index, **options):
    example = parts.generate_example(split, index, **options)
    return {**example, "image": shapes.decode_png(example["image"])}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """gain_parts (its default config) built with SMALL_SPLITS in a temporary data_dir."""
    directory = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parts, "SPLIT_SIZES", SMALL_SPLITS)
        builder = tfds.builder("gain_parts", data_dir=directory)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return directory


def test_registered_with_its_configs_in_the_pipeline_and_the_flags():
    assert "gain_parts" in tfds.list_builders()
    names = ("gain_parts", *(f"gain_parts/{name}" for name in parts.CONFIG_NAMES))
    assert len(parts.CONFIG_NAMES) == len(parts.PART_FRACTIONS) * len(parts.BODY_RELIABILITIES) == 12
    for name in names:
        info = gd.dataset_info(name)
        assert info.num_classes == NUM_CLASSES == 4 and info.class_names == parts.CLASS_NAMES
        assert info.image_size == SIZE == 112 and info.splits == ("train", "validation", "test")
    # the flags' choices (gain_jax.config cannot import the data package) list the same names
    assert set(names) <= set(run_config.DATASETS) and set(datasets.GAIN_PARTS_CONFIGS) == set(names[1:])
    builder = tfds.builder("gain_parts/part08_rel100")
    assert (builder.builder_config.part_fraction, builder.builder_config.body_reliability) == (0.08, 1.0)
    assert tfds.builder("gain_parts").builder_config.name == parts.DEFAULT_CONFIG == "part04_rel060"
    assert str(builder.version) in builder.RELEASE_NOTES


@pytest.mark.parametrize("fraction", parts.PART_FRACTIONS)
def test_masks_part_size_and_placement(fraction):
    areas = []
    for index in range(30):
        example = example_arrays("train", index, part_fraction=fraction)
        body, part, mask = example["body_mask"].astype(bool), example["part_mask"].astype(bool), example["mask"]
        class_id = int(np.argmax(example["labels"]))
        assert example["labels"].sum() == 1 and example["has_mask"]
        assert part.any() and body.any() and not (body & part).any()
        # the VOC mask marks the whole object (body and part), a 1-pixel ignore ring, background elsewhere
        np.testing.assert_array_equal(mask == class_id + 1, body | part)
        assert set(np.unique(mask[~(body | part)])) <= {0, 255} and (mask == 255).any()
        # the part lies on the body, with body around it (its ring of neighbouring pixels is body)
        assert (parts._dilate(part) <= (body | part)).all()
        areas.append(part.sum() / (body | part).sum())
    # the part's share of the object is part_fraction up to pixelation (a disc of a few px radius)
    assert abs(np.mean(areas) - fraction) < 0.2 * fraction
    assert max(areas) < 2 * fraction


def test_the_body_spans_several_grad_cam_cells_and_the_shift_fill_lands_on_background():
    cell = SIZE // 14  # small_cnn's Grad-CAM grid at 112 px
    for index in range(40):
        example = example_arrays("validation", index)
        obj = (example["body_mask"] | example["part_mask"]).astype(bool)
        ys, xs = np.nonzero(obj)
        assert min(np.ptp(ys), np.ptp(xs)) + 1 >= 4 * cell
        # GAIN's "shift" fill rolls the image by half its size: the rolled object never covers the object
        assert not (np.roll(obj, (SIZE // 2, SIZE // 2), axis=(0, 1)) & obj).any()


def test_only_the_part_is_saturated_and_the_counterfactual_differs_on_the_part_only():
    for index in range(20):
        example = example_arrays("test", index)
        image = example["image"].astype(int)
        spread = image.max(axis=-1) - image.min(axis=-1)  # 0 for grey, large for saturated colours
        part = example["part_mask"].astype(bool)
        assert spread[part].min() > spread[~part].max()
        # the part's colour is its class's
        class_id = int(np.argmax(example["labels"]))
        centre = image[part].mean(axis=0)
        assert np.abs(centre - parts.PART_COLOURS[class_id]).max() <= parts.PART_COLOUR_JITTER
        erased = example_arrays("test", index, with_part=False)
        changed = (erased["image"] != example["image"]).any(axis=-1)
        assert changed.any() and not (changed & ~part).any()
        # where the part was, the body shows: no saturated colour, the body's grey levels
        erased_spread = np.ptp(erased["image"][part].astype(int), axis=-1)
        assert erased_spread.max() <= 2 * (parts.TINT + parts.BACKGROUND_NOISE)
        body_levels = image[example["body_mask"].astype(bool)].mean(axis=-1)
        erased_levels = erased["image"][part].astype(int).mean(axis=-1)
        assert body_levels.min() <= erased_levels.min() and erased_levels.max() <= body_levels.max()
        for key in ("mask", "body_mask", "part_mask", "labels"):
            np.testing.assert_array_equal(erased[key], example[key])


@pytest.mark.parametrize("reliability", parts.BODY_RELIABILITIES)
def test_body_texture_is_the_class_own_at_the_configured_rate(reliability):
    count = 300
    draws = [parts.generate_example("train", index, body_reliability=reliability) for index in range(count)]
    classes = np.array([int(np.argmax(example["labels"])) for example in draws])
    textures = np.array([example["body_texture"] for example in draws])
    rate = np.mean(classes == textures)
    if reliability == 1.0:
        assert rate == 1.0
    else:  # binomial: 4 standard deviations
        assert abs(rate - reliability) < 4 * np.sqrt(reliability * (1 - reliability) / count)
        # the other textures are spread over the other classes'
        assert len(set(textures[classes != textures])) == NUM_CLASSES
    assert np.bincount(classes, minlength=NUM_CLASSES).min() > count / NUM_CLASSES / 2


def test_no_background_shortcut():
    """The background's mean colour, noise and the object's place do not depend on the class."""
    by_class = {c: [] for c in range(NUM_CLASSES)}
    for index in range(200):
        example = example_arrays("train", index)
        background = example["mask"] == 0
        by_class[int(np.argmax(example["labels"]))].append(
            [example["image"][background].mean(), np.argwhere(~background).mean()])
    means = np.array([np.mean(rows, axis=0) for rows in by_class.values()])
    spread = np.array([np.std(rows, axis=0) for rows in by_class.values()]).mean(axis=0)
    counts = np.array([len(rows) for rows in by_class.values()])
    # class means of the background grey and of the object's position agree within 4 standard errors
    assert (np.ptp(means, axis=0) < 4 * spread * np.sqrt(2 / counts.min())).all()


def test_deterministic_and_configs_differ():
    first, again = parts.generate_example("validation", 3), parts.generate_example("validation", 3)
    assert first["image"] == again["image"] and first["filename"] == "parts_validation_000003"
    other = parts.generate_example("validation", 3, part_fraction=0.08)
    assert other["image"] != first["image"]
    assert parts.example_index("parts_validation_000003") == ("validation", 3)
    with pytest.raises(ValueError, match="not a gain_parts filename"):
        parts.example_index("shapes_train_000001")
    with pytest.raises(ValueError, match="unknown gain_parts split"):
        parts.generate_example("validation_unbiased", 0)
    with pytest.raises(ValueError, match="part_fraction"):
        parts.generate_example("train", 0, part_fraction=0.0)
    with pytest.raises(ValueError, match="body_reliability"):
        parts.generate_example("train", 0, body_reliability=1.5)


def generation_digest(split, indices, **options) -> str:
    """sha256 (16 hex digits) of everything generate_example gives for `indices`, with and without the part."""
    digest = hashlib.sha256()
    for index in indices:
        for with_part in (True, False):
            example = example_arrays(split, index, with_part=with_part, **options)
            for key in ("labels", "mask", "body_mask", "part_mask", "image"):
                digest.update(np.ascontiguousarray(example[key]).tobytes())
            digest.update(f"{example['filename']} {example['body_texture']} {example['has_mask']}".encode())
    return digest.hexdigest()[:16]


def test_the_splits_generate_what_gain_parts_1_0_0_generated():
    """The held-out streams left the splits' images as they were (digests taken at d3b6365, before them): the
    data set's version did not change."""
    assert str(parts.GainParts.VERSION) == "1.0.0"
    expected = {"train": ("8d47583b82af685c", "0d9797e00feee202"), "validation": ("819c78b98b74977f",
                "486c74bf2bdd8c9a"), "test": ("f6ab775676290c11", "019336ab07778e47")}
    for split, (default, other) in expected.items():
        assert generation_digest(split, (0, 1, 499)) == default
        assert generation_digest(split, (7,), part_fraction=0.08, body_reliability=1.0) == other


def test_heldout_streams_are_new_images_of_the_same_generator():
    stream = parts.heldout_split(7)
    assert stream == "heldout7" and stream not in parts.SPLIT_SIZES
    first = example_arrays(stream, 2)
    assert first["filename"] == "parts_heldout7_000002" and parts.example_index(first["filename"]) == (stream, 2)
    # the same seed gives the same images, another seed and every split other ones at the same index
    np.testing.assert_array_equal(example_arrays(stream, 2)["image"], first["image"])
    for other in ("train", "validation", "test", parts.heldout_split(8), parts.heldout_split(0)):
        assert not np.array_equal(example_arrays(other, 2)["image"], first["image"]), other
    # the same generator: its part-erased counterfactual, through the filename as the study reads it
    erased = parts.part_erased_images([b"parts_heldout7_000002"], parts.PART_FRACTIONS[0], parts.BODY_RELIABILITIES[0])
    changed = (erased[0] != first["image"]).any(axis=-1)
    assert changed.any() and not (changed & ~first["part_mask"].astype(bool)).any()
    for seed in (-1, 2 ** 32, 1.0, True):
        with pytest.raises(ValueError, match="held-out seed"):
            parts.heldout_split(seed)
    for name in ("heldout007", "heldout", "heldout-1", "heldout4294967296", "heldouts"):
        with pytest.raises(ValueError, match="unknown gain_parts split"):
            parts.generate_example(name, 0)
        with pytest.raises(ValueError, match="not a gain_parts filename"):
            parts.example_index(f"parts_{name}_000000")
    with pytest.raises(ValueError, match="index"):
        parts.generate_example(stream, parts.HELDOUT_MAX_IMAGES)


def test_evaluation_batches_are_the_pipeline_s(data_dir):
    """A split's examples through `pipeline.parts_evaluation_batches` are the evaluation pipeline's batches of them,
    key by key, bit for bit (at the native size and resized): a held-out stream is evaluated as test would be."""
    for options in ({}, {"image_size": 56}):
        expected = list(gd.input_pipeline("gain_parts", "test[:8]", data_dir=data_dir, batch_size=3, train=False,
                                          **options))
        order = [parts.example_index(name.decode())[1] for batch in expected for name in batch["filename"]]
        assert sorted(order) == list(range(8))  # the stored order, not the indices'
        batches = list(pipeline.parts_evaluation_batches("test", order, batch_size=3, **options))
        assert [len(batch["labels"]) for batch in batches] == [3, 3, 2]
        assert len(batches) == len(expected)
        for batch, reference in zip(batches, expected):
            assert list(batch) == list(reference) == list(pipeline.output_keys("gain_parts"))
            for key, value in reference.items():
                assert (batch[key].dtype, batch[key].shape) == (value.dtype, value.shape), key
                np.testing.assert_array_equal(batch[key], value, err_msg=key)
    stream = list(pipeline.parts_evaluation_batches(parts.heldout_split(3), range(5), batch_size=4))
    assert [batch["filename"][0] for batch in stream] == [b"parts_heldout3_000000", b"parts_heldout3_000004"]


@pytest.mark.slow
def test_builder_matches_the_generator(data_dir):
    builder = tfds.builder("gain_parts", data_dir=data_dir)
    for split, size in SMALL_SPLITS.items():
        rows = list(tfds.as_numpy(builder.as_dataset(split=split)))
        assert len(rows) == size
        row = next(r for r in rows if r["filename"].decode() == f"parts_{split}_000001")
        example = example_arrays(split, 1)
        for key in ("image", "mask", "body_mask", "part_mask", "labels"):
            np.testing.assert_array_equal(row[key], example[key])
        assert row["body_texture"] == example["body_texture"]


@pytest.mark.slow
def test_pipeline_passes_the_part_masks_in_evaluation_only(data_dir):
    batch = next(gd.input_pipeline("gain_parts", "validation", data_dir=data_dir, batch_size=4, train=False))
    assert set(batch) == set(pipeline.output_keys("gain_parts")) == set(pipeline.OUTPUT_KEYS) | {
        "body_texture", "body_mask", "part_mask"}
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["part_mask"].shape == (4, SIZE, SIZE)
    for b, name in enumerate(batch["filename"]):
        example = example_arrays(*parts.example_index(name.decode()))
        np.testing.assert_array_equal(batch["part_mask"][b], example["part_mask"])
        np.testing.assert_array_equal(batch["body_mask"][b], example["body_mask"])
    # resized with the image, nearest like the mask
    small = next(gd.input_pipeline("gain_parts", "validation", data_dir=data_dir, batch_size=4, train=False,
                                   image_size=56))
    assert small["part_mask"].shape == (4, 56, 56) and small["mask"].shape == (4, 56, 56)
    labels = np.argmax(small["labels"], axis=1)[:, None, None]
    np.testing.assert_array_equal(small["mask"] == labels + 1, (small["body_mask"] | small["part_mask"]) > 0)
    assert not (small["body_mask"] & small["part_mask"]).any() and small["part_mask"].any()
    # training batches (flipped: the masks would not follow) carry the per-example key only
    train = next(gd.input_pipeline("gain_parts", "train", data_dir=data_dir, batch_size=4, shuffle_buffer=8))
    assert set(train) == set(pipeline.output_keys("gain_parts", train=True)) == set(pipeline.OUTPUT_KEYS) | {
        "body_texture"}
