"""The "gain_voc2012" tfds builder on a mini VOCdevkit written by the test: labels, masks, errors."""
import tarfile

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import gain_jax.data as gd
from gain_jax.data import pipeline, voc

CLASSES = voc.CLASS_NAMES

# id -> (height, width, [(class, difficult, (xmin, ymin, xmax, ymax))], has segmentation)
IMAGES = {
    "2007_000001": (30, 40, [("dog", False, (3, 4, 20, 25)), ("person", False, (22, 2, 39, 29)),
                             ("dog", False, (1, 1, 8, 8))], True),
    "2007_000002": (36, 28, [("cat", False, (2, 2, 27, 35)), ("bottle", True, (10, 10, 14, 20))], True),
    "2007_000003": (32, 32, [("aeroplane", False, (1, 1, 32, 32)), ("tvmonitor", True, (5, 5, 9, 9))], False),
    "2008_000004": (24, 30, [("train", False, (4, 4, 26, 20))], True),
    "2008_000005": (28, 28, [("sheep", True, (2, 3, 20, 21)), ("cow", False, (1, 1, 28, 28))], True),
}
TRAIN_IDS = ["2007_000001", "2007_000002", "2007_000003"]
VAL_IDS = ["2008_000004", "2008_000005"]


def _palette_png(path, indices):
    image = PIL.Image.fromarray(indices, mode="P")
    palette = np.random.default_rng(0).integers(0, 256, (256, 3), dtype=np.uint8)
    palette[255] = (224, 224, 192)  # VOC's ignore colour
    image.putpalette(palette.reshape(-1).tolist())
    image.save(path)


def expected_mask(image_id):
    """Class boxes drawn in order (index = class + 1) with a 2-pixel 255 border, like VOC's."""
    height, width, objects, _ = IMAGES[image_id]
    mask = np.zeros((height, width), np.uint8)
    for name, _, (xmin, ymin, xmax, ymax) in objects:
        mask[ymin - 1:ymax, xmin - 1:xmax] = 255
        mask[ymin + 1:ymax - 2, xmin + 1:xmax - 2] = CLASSES.index(name) + 1
    return mask


def expected_image(image_id):
    """Gradients under strong noise: saved at quality 90, a JPEG whose fast and accurate IDCTs differ."""
    height, width, _, _ = IMAGES[image_id]
    y, x = np.mgrid[:height, :width]
    seed = int(image_id[-1])
    smooth = np.stack([(x * 6 + seed * 40) % 256, (y * 7) % 256, ((x + y) * 3) % 256], -1)
    noise = np.random.default_rng(seed).integers(-60, 61, smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def pil_pixels(path):
    """What PIL (hence torchvision's PIL loader and the original PyTorch code) decodes."""
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _annotation_xml(image_id):
    height, width, objects, _ = IMAGES[image_id]
    parts = [f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>"
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, difficult, (xmin, ymin, xmax, ymax) in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                     f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def write_voc(root):
    """root/VOCdevkit/VOC2012 with IMAGES; returns the VOC2012 path."""
    voc_root = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main"):
        (voc_root / sub).mkdir(parents=True)
    for image_id, (_, _, _, has_mask) in IMAGES.items():
        PIL.Image.fromarray(expected_image(image_id)).save(voc_root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        (voc_root / "Annotations" / f"{image_id}.xml").write_text(_annotation_xml(image_id))
        if has_mask:
            _palette_png(voc_root / "SegmentationClass" / f"{image_id}.png", expected_mask(image_id))
    (voc_root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(TRAIN_IDS) + "\n")
    (voc_root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(VAL_IDS) + "\n")
    return voc_root


def _build(manual_dir, data_dir):
    builder = tfds.builder("gain_voc2012", data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual_dir), try_download_gcs=False))
    return builder


def _read_split(builder, split):
    """The stored examples, the image as its stored (encoded) bytes."""
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return {e["filename"].decode(): e for e in tfds.as_numpy(dataset)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    manual_dir = tmp_path_factory.mktemp("manual")
    write_voc(manual_dir)
    data_dir = tmp_path_factory.mktemp("tfds")
    return manual_dir, data_dir, _build(manual_dir, data_dir)


def test_registered_and_described():
    assert "gain_voc2012" in tfds.list_builders()
    info = gd.dataset_info("gain_voc2012")
    assert info.num_classes == 20 and info.class_names == CLASSES == gd.VOC_CLASS_NAMES
    assert info.image_size == 224 and info.splits == ("train", "validation")


def test_splits_labels_objects_masks(built):
    manual_dir, _, builder = built
    for split, ids in (("train", TRAIN_IDS), ("validation", VAL_IDS)):
        examples = _read_split(builder, split)
        assert sorted(examples) == sorted(f"{i}.jpg" for i in ids)
        for image_id in ids:
            example = examples[f"{image_id}.jpg"]
            height, width, objects, has_mask = IMAGES[image_id]
            # the JPEG file's bytes stored unchanged (the pipeline's decoding: test_pipeline_decodes_like_pil)
            jpeg_path = manual_dir / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{image_id}.jpg"
            assert example["image"] == jpeg_path.read_bytes()
            all_labels = np.zeros(20, np.float32)
            all_labels[[CLASSES.index(name) for name, _, _ in objects]] = 1
            easy_labels = np.zeros(20, np.float32)
            easy_labels[[CLASSES.index(name) for name, difficult, _ in objects if not difficult]] = 1
            np.testing.assert_array_equal(example["labels"], all_labels)  # difficult objects kept
            np.testing.assert_array_equal(example["labels_no_difficult"], easy_labels)
            np.testing.assert_array_equal(example["objects"]["label"], [CLASSES.index(n) for n, _, _ in objects])
            np.testing.assert_array_equal(example["objects"]["is_difficult"], [d for _, d, _ in objects])
            xmin, ymin, xmax, ymax = objects[0][2]
            np.testing.assert_allclose(example["objects"]["bbox"][0],
                                       [(ymin - 1) / height, (xmin - 1) / width, ymax / height, xmax / width],
                                       rtol=1e-6)
            assert example["has_mask"] == has_mask
            assert example["mask"].dtype == np.uint8 and example["mask"].shape == (height, width)
            if has_mask:  # palette indices, exactly, 255 borders included
                np.testing.assert_array_equal(example["mask"], expected_mask(image_id))
            else:
                assert np.all(example["mask"] == 255)


@pytest.mark.parametrize("layout", ["VOC2012", "VOCdevkit", "tar"])
def test_other_manual_dir_layouts(tmp_path, built, layout):
    """manual_dir may be VOC2012 itself, VOCdevkit, or hold only VOCtrainval_11-May-2012.tar."""
    voc_root = write_voc(tmp_path / "written")
    if layout == "VOC2012":
        manual_dir = voc_root
    elif layout == "VOCdevkit":
        manual_dir = voc_root.parent
    else:
        manual_dir = tmp_path / "manual"
        manual_dir.mkdir()
        with tarfile.open(manual_dir / voc.TAR_NAME, "w") as tar:
            tar.add(voc_root.parent, arcname="VOCdevkit")
    examples = _read_split(_build(manual_dir, tmp_path / "tfds"), "validation")
    reference = _read_split(built[2], "validation")
    assert sorted(examples) == sorted(reference)
    for name, example in examples.items():
        np.testing.assert_array_equal(example["mask"], reference[name]["mask"])
        np.testing.assert_array_equal(example["labels"], reference[name]["labels"])


# ---------------------------------------------------------------------------------------------------------
# errors name the file and the problem; nothing is skipped


def _break(voc_root, what):
    if what == "corrupt_jpeg":
        path = voc_root / "JPEGImages" / "2007_000002.jpg"
        path.write_bytes(path.read_bytes()[:200])  # truncated
        return path, "corrupt or unreadable JPEG"
    if what == "garbage_jpeg":
        path = voc_root / "JPEGImages" / "2007_000002.jpg"
        path.write_bytes(b"not an image at all")
        return path, "corrupt or unreadable JPEG"
    if what == "corrupt_xml":
        path = voc_root / "Annotations" / "2007_000001.xml"
        path.write_text("<annotation><object><name>dog</name>")
        return path, "corrupt annotation XML"
    if what == "unknown_class":
        path = voc_root / "Annotations" / "2007_000001.xml"
        path.write_text(path.read_text().replace("<name>person</name>", "<name>unicorn</name>"))
        return path, "unknown class 'unicorn'"
    if what == "corrupt_png":
        path = voc_root / "SegmentationClass" / "2007_000001.png"
        path.write_bytes(path.read_bytes()[:60])
        return path, "corrupt or unreadable PNG"
    if what == "rgb_png":
        path = voc_root / "SegmentationClass" / "2007_000001.png"
        PIL.Image.open(path).convert("RGB").save(path)
        return path, "mode RGB"
    if what == "bad_mask_value":
        path = voc_root / "SegmentationClass" / "2007_000001.png"
        bad = expected_mask("2007_000001")
        bad[0, 0] = 42
        _palette_png(path, bad)
        return path, r"class indices \[42\]"
    if what == "mask_size":
        path = voc_root / "SegmentationClass" / "2007_000001.png"
        _palette_png(path, np.zeros((10, 10), np.uint8))
        return path, "mask is 10x10"
    if what == "missing_jpeg":
        path = voc_root / "JPEGImages" / "2007_000003.jpg"
        path.unlink()
        return path, "is missing"
    if what == "missing_xml":
        path = voc_root / "Annotations" / "2008_000004.xml"
        path.unlink()
        return path, "is missing"
    if what == "missing_split_list":
        path = voc_root / "ImageSets" / "Main" / "val.txt"
        path.unlink()
        return path, "is missing"
    raise AssertionError(what)


ERRORS = ["corrupt_jpeg", "garbage_jpeg", "corrupt_xml", "unknown_class", "corrupt_png", "rgb_png",
          "bad_mask_value", "mask_size", "missing_jpeg", "missing_xml", "missing_split_list"]


@pytest.mark.parametrize("what", ERRORS)
def test_bad_files_raise_naming_the_file(tmp_path, what):
    voc_root = write_voc(tmp_path)
    path, problem = _break(voc_root, what)
    split = "validation" if what in ("missing_xml", "missing_split_list") else "train"
    ids = VAL_IDS if split == "validation" else TRAIN_IDS
    with pytest.raises((ValueError, FileNotFoundError), match=problem) as raised:
        if what == "missing_split_list":
            voc.read_split_ids(voc_root, split)
        else:
            for image_id in ids:
                voc.read_example(voc_root, image_id)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("what", ["corrupt_jpeg", "missing_split_list"])
def test_builder_fails_instead_of_skipping(tmp_path, what):
    voc_root = write_voc(tmp_path / "manual")
    path, problem = _break(voc_root, what)
    with pytest.raises((ValueError, FileNotFoundError), match=problem) as raised:
        _build(tmp_path / "manual", tmp_path / "tfds")
    assert str(path) in str(raised.value)


def test_manual_dir_without_voc(tmp_path):
    (tmp_path / "something_else").mkdir()
    (tmp_path / "something_else" / "readme.txt").write_text("no VOC here")
    with pytest.raises(FileNotFoundError, match="holds neither VOCtrainval_11-May-2012.tar nor VOCdevkit"):
        voc.find_voc2012_root(tmp_path / "something_else")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        voc.find_voc2012_root(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="holds neither") as raised:
        _build(tmp_path / "something_else", tmp_path / "tfds")
    assert str(tmp_path / "something_else") in str(raised.value)


# ---------------------------------------------------------------------------------------------------------
# through the input pipeline


def test_input_pipeline_on_voc(built):
    manual_dir, data_dir, _ = built
    batches = list(gd.input_pipeline("gain_voc2012", "validation", data_dir=data_dir, manual_dir=manual_dir,
                                     image_size=20, batch_size=4, train=False))
    assert [b["image"].shape for b in batches] == [(2, 20, 20, 3)]
    batch = batches[0]
    for position, filename in enumerate(batch["filename"]):
        image_id = filename.decode()[:-4]
        assert batch["has_mask"][position] == IMAGES[image_id][3]
        source_values = set(np.unique(expected_mask(image_id)).tolist())
        assert set(np.unique(batch["mask"][position]).tolist()) <= source_values  # nearest: no new values
    train = next(gd.input_pipeline("gain_voc2012", "train", data_dir=data_dir, manual_dir=manual_dir,
                                   image_size=20, batch_size=4, train=True))
    assert train["image"].shape == (4, 20, 20, 3) and train["mask"].shape == (4, 20, 20)
    # the image without a segmentation keeps an all-ignore mask, augmented or not
    for position, filename in enumerate(train["filename"]):
        if filename == b"2007_000003.jpg":
            assert np.all(train["mask"][position] == 255)


def test_pipeline_decodes_like_pil(built):
    """The pipeline's pixels are PIL's, bit for bit, where TensorFlow's default (fast IDCT) decoder is not."""
    manual_dir, data_dir, _ = built
    jpeg_dir = manual_dir / "VOCdevkit" / "VOC2012" / "JPEGImages"
    fast_differs = []
    for split, ids in (("train", TRAIN_IDS), ("validation", VAL_IDS)):
        decoded = {e["filename"].decode(): e["image"] for e in tfds.as_numpy(
            pipeline.decoded_examples("gain_voc2012", split, data_dir=data_dir, manual_dir=manual_dir))}
        assert sorted(decoded) == sorted(f"{i}.jpg" for i in ids)
        for filename, image in decoded.items():
            reference = pil_pixels(jpeg_dir / filename)
            assert image.dtype == np.uint8 and image.shape == reference.shape == IMAGES[filename[:-4]][:2] + (3,)
            np.testing.assert_array_equal(image, reference, err_msg=filename)
            fast = tf.io.decode_jpeg((jpeg_dir / filename).read_bytes(), channels=3).numpy()
            fast_differs.append(not np.array_equal(fast, reference))
    assert all(fast_differs)  # the images are such that a fast-IDCT decoder fails the comparison above

    # end to end at an identity setting: 2008_000005 is 28x28, eval (no augmentation), image_size 28
    batches = gd.input_pipeline("gain_voc2012", "validation", data_dir=data_dir, manual_dir=manual_dir,
                                image_size=28, batch_size=1, train=False)
    batch = next(b for b in batches if b["filename"][0] == b"2008_000005.jpg")
    pixels = (batch["image"][0].astype(np.float64) * gd.IMAGENET_STD + gd.IMAGENET_MEAN) * 255.0
    assert np.abs(pixels - np.round(pixels)).max() < 1e-3
    np.testing.assert_array_equal(np.round(pixels).astype(np.uint8), pil_pixels(jpeg_dir / "2008_000005.jpg"))


def test_decode_image_matches_pil_on_noise_and_reads_png(tmp_path):
    """`pipeline.decode_image` on JPEGs written here (random noise, quality 90, 4:2:0 and 4:4:4, grey)."""
    rng = np.random.default_rng(7)
    cases = [("noise_420.jpg", rng.integers(0, 256, (45, 61, 3), dtype=np.uint8), {"subsampling": 2}),
             ("noise_444.jpg", rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), {"subsampling": 0}),
             ("noise_grey.jpg", rng.integers(0, 256, (40, 40), dtype=np.uint8), {})]
    for name, pixels, options in cases:
        path = tmp_path / name
        PIL.Image.fromarray(pixels).save(path, quality=90, **options)
        reference = pil_pixels(path)
        decoded = pipeline.decode_image(path.read_bytes()).numpy()
        np.testing.assert_array_equal(decoded, reference, err_msg=name)
        fast = tf.io.decode_jpeg(path.read_bytes(), channels=3).numpy()
        assert not np.array_equal(fast, reference), name  # TensorFlow's default would fail this test
    png = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    PIL.Image.fromarray(png).save(tmp_path / "lossless.png")
    np.testing.assert_array_equal(pipeline.decode_image((tmp_path / "lossless.png").read_bytes()).numpy(), png)


def test_tfds_voc2012_features_map_onto_ours(tmp_path):
    """tfds' own "voc/2012" (not downloaded here): labels from its label list, no mask."""
    features = tfds.builder("voc/2012", data_dir=str(tmp_path)).info.features  # offline: the spec only
    assert {"image", "image/filename", "labels"} <= set(features.keys())
    assert tuple(features["labels"].feature.names) == CLASSES  # same class indices as ours
    example = {
        "image": tf.zeros((7, 9, 3), tf.uint8),
        "image/filename": tf.constant("2008_000123.jpg"),
        "labels": tf.constant([3, 14, 3], tf.int64),
        "labels_no_difficult": tf.constant([3], tf.int64),
    }
    mapped = pipeline._common_features("voc/2012", 20)(example)
    assert set(mapped) == set(pipeline.OUTPUT_KEYS)
    expected = np.zeros(20, np.float32)
    expected[[3, 14]] = 1
    np.testing.assert_array_equal(mapped["labels"].numpy(), expected)
    assert mapped["mask"].shape == (7, 9) and mapped["mask"].dtype == tf.uint8
    assert np.all(mapped["mask"].numpy() == 255) and not mapped["has_mask"].numpy()
    assert mapped["filename"].numpy() == b"2008_000123.jpg"
    assert gd.dataset_info("voc/2012").num_classes == 20
