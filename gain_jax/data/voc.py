""""gain_voc2012": PASCAL VOC 2012 (classification labels + segmentation masks) from local files.

`manual_dir` holds `VOCtrainval_11-May-2012.tar`, or the extracted `VOCdevkit/VOC2012` (manual_dir may
also be `VOCdevkit` or `VOC2012` itself). Splits: train and validation, the ids of
`ImageSets/Main/train.txt` and `val.txt`. Per example:
  image     uint8 [H,W,3], the original JPEG bytes (validated by decoding them once at build time); the
            input pipeline decodes them as PIL does (`pipeline.decode_image`), not with tfds' default
            decoder, whose fast IDCT is off by a few grey levels
  labels    float32 multi-hot [20] of every annotated object, difficult ones included
  labels_no_difficult  float32 multi-hot [20] without the difficult objects
  objects   label, bbox (normalized ymin, xmin, ymax, xmax), is_difficult, is_truncated
  mask      uint8 [H,W]: `SegmentationClass/<id>.png` palette indices (0 background, 1..20, 255 ignore),
            or all 255 where the image has no segmentation
  has_mask  bool
  filename  "<id>.jpg"
Anything missing or unreadable raises an error naming the file: no example is skipped silently.
"""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

CLASS_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
TAR_NAME = "VOCtrainval_11-May-2012.tar"
SPLIT_FILES = {"train": "train.txt", "validation": "val.txt"}
IGNORE_INDEX = 255
_VALID_MASK_VALUES = frozenset(range(len(CLASS_NAMES) + 1)) | {IGNORE_INDEX}

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download {TAR_NAME} (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) and put it, or its extracted
`VOCdevkit/VOC2012` folder, in the manual directory (`manual_dir=` of gain_jax.data.input_pipeline, or
tfds' `DownloadConfig(manual_dir=...)`).
"""


class VocFormatError(ValueError):
    """A VOC file exists but its content is not what VOC 2012 specifies."""


def _is_voc2012_root(path) -> bool:
    return (path / "JPEGImages").is_dir() and (path / "ImageSets" / "Main").is_dir()


def find_voc2012_root(directory, extract=None):
    """The VOC2012 folder inside `directory` (or `directory` itself); `extract(tar_path) -> path`
    is used when only the tar is there."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"VOC 2012 manual_dir {directory} does not exist or is not a directory")
    for candidate in (directory, directory / "VOC2012", directory / "VOCdevkit" / "VOC2012"):
        if _is_voc2012_root(candidate):
            return candidate
    tar_path = directory / TAR_NAME
    if tar_path.exists():
        if extract is None:
            raise FileNotFoundError(f"{tar_path} found but not extracted, and no extractor was given")
        extracted = epath.Path(extract(tar_path))
        for candidate in (extracted / "VOCdevkit" / "VOC2012", extracted / "VOC2012", extracted):
            if _is_voc2012_root(candidate):
                return candidate
        raise FileNotFoundError(f"{tar_path} (extracted to {extracted}) holds no VOCdevkit/VOC2012 with "
                                "JPEGImages and ImageSets/Main")
    raise FileNotFoundError(f"VOC 2012 manual_dir {directory} holds neither {TAR_NAME} nor VOCdevkit/VOC2012 "
                            "(nor VOC2012) with JPEGImages and ImageSets/Main\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)


def read_split_ids(root, split: str) -> list:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown gain_voc2012 split {split!r}; splits: {tuple(SPLIT_FILES)}")
    path = epath.Path(root) / "ImageSets" / "Main" / SPLIT_FILES[split]
    if not path.exists():
        raise FileNotFoundError(f"VOC split list {path} is missing")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise VocFormatError(f"VOC split list {path} is empty")
    return ids


def _require_file(path):
    if not path.exists():
        raise FileNotFoundError(f"VOC file {path} is missing")
    return path


def read_jpeg(path) -> tuple:
    """(bytes, height, width) of a JPEG, decoded once in full so that a corrupt file fails here."""
    data = _require_file(path).read_bytes()
    try:
        with PIL.Image.open(path) as image:
            if image.format != "JPEG":
                raise VocFormatError(f"{path}: not a JPEG (PIL reads it as {image.format})")
            image.load()  # raises on truncated or corrupt data
            width, height = image.size
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise VocFormatError(f"{path}: corrupt or unreadable JPEG ({error})") from error
    return data, height, width


def _text(node, tag, path):
    child = node.find(tag)
    if child is None or child.text is None:
        raise VocFormatError(f"{path}: <{node.tag}> has no <{tag}>")
    return child.text.strip()


def read_annotation(path, height: int, width: int) -> list:
    """Objects of an Annotations XML: dicts of label, bbox, is_difficult, is_truncated."""
    try:
        tree = ElementTree.parse(_require_file(path))
    except ElementTree.ParseError as error:
        raise VocFormatError(f"{path}: corrupt annotation XML ({error})") from error
    objects = []
    for node in tree.getroot().findall("object"):
        name = _text(node, "name", path)
        if name not in CLASS_NAMES:
            raise VocFormatError(f"{path}: unknown class {name!r}; VOC classes: {CLASS_NAMES}")
        box = node.find("bndbox")
        if box is None:
            raise VocFormatError(f"{path}: object {name!r} has no <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(_text(box, tag, path)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as error:
            raise VocFormatError(f"{path}: non-numeric bndbox of {name!r} ({error})") from error
        difficult = node.find("difficult")
        truncated = node.find("truncated")
        # VOC boxes are 1-based inclusive pixel indices
        objects.append({
            "label": CLASS_NAMES.index(name),
            "bbox": tfds.features.BBox(ymin=float(np.clip((ymin - 1) / height, 0, 1)),
                                       xmin=float(np.clip((xmin - 1) / width, 0, 1)),
                                       ymax=float(np.clip(ymax / height, 0, 1)),
                                       xmax=float(np.clip(xmax / width, 0, 1))),
            "is_difficult": difficult is not None and (difficult.text or "0").strip() == "1",
            "is_truncated": truncated is not None and (truncated.text or "0").strip() == "1",
        })
    if not objects:
        raise VocFormatError(f"{path}: annotation has no <object>")
    return objects


def read_class_mask(path, height: int, width: int) -> np.ndarray:
    """Class indices of a SegmentationClass PNG: its palette indices, not its RGB colours."""
    try:
        with PIL.Image.open(path) as image:
            if image.format != "PNG":
                raise VocFormatError(f"{path}: not a PNG (PIL reads it as {image.format})")
            if image.mode not in ("P", "L"):
                raise VocFormatError(f"{path}: mode {image.mode}; a VOC class mask is a palette (P) PNG whose "
                                     "indices are the classes")
            mask = np.array(image, dtype=np.uint8)
    except (OSError, SyntaxError) as error:
        raise VocFormatError(f"{path}: corrupt or unreadable PNG ({error})") from error
    if mask.shape != (height, width):
        raise VocFormatError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH), its image {width}x{height}")
    bad = sorted(set(np.unique(mask).tolist()) - _VALID_MASK_VALUES)
    if bad:
        raise VocFormatError(f"{path}: class indices {bad[:10]} outside 0..{len(CLASS_NAMES)} and 255")
    return mask


def _multi_hot(indices) -> np.ndarray:
    labels = np.zeros(len(CLASS_NAMES), np.float32)
    labels[list(indices)] = 1.0
    return labels


def read_example(root, image_id: str) -> dict:
    root = epath.Path(root)
    jpeg, height, width = read_jpeg(root / "JPEGImages" / f"{image_id}.jpg")
    objects = read_annotation(root / "Annotations" / f"{image_id}.xml", height, width)
    mask_path = root / "SegmentationClass" / f"{image_id}.png"
    has_mask = mask_path.exists()
    if has_mask:
        mask = read_class_mask(mask_path, height, width)
    else:
        mask = np.full((height, width), IGNORE_INDEX, np.uint8)
    return {
        "image": jpeg,
        "labels": _multi_hot(o["label"] for o in objects),
        "labels_no_difficult": _multi_hot(o["label"] for o in objects if not o["is_difficult"]),
        "objects": objects,
        "mask": mask,
        "has_mask": has_mask,
        "filename": f"{image_id}.jpg",
    }


class GainVoc2012(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 from local files, with segmentation masks where VOC has them."""

    name = "gain_voc2012"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version: train/validation of ImageSets/Main, class masks."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    # tfds derives this through `importlib_resources`, a package its wheel does not declare.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        num_classes = len(CLASS_NAMES)
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "labels": tfds.features.Tensor(shape=(num_classes,), dtype=np.float32),
                "labels_no_difficult": tfds.features.Tensor(shape=(num_classes,), dtype=np.float32),
                "objects": tfds.features.Sequence({
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "bbox": tfds.features.BBoxFeature(),
                    "is_difficult": tfds.features.Tensor(shape=(), dtype=np.bool_),
                    "is_truncated": tfds.features.Tensor(shape=(), dtype=np.bool_),
                }),
                "mask": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
                "has_mask": tfds.features.Tensor(shape=(), dtype=np.bool_),
                "filename": tfds.features.Text(),
            }),
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
        )

    def _split_generators(self, dl_manager):
        root = find_voc2012_root(dl_manager.manual_dir, extract=dl_manager.extract)
        # read both id lists first: a missing list fails before any example is written
        split_ids = {split: read_split_ids(root, split) for split in SPLIT_FILES}
        return {split: self._generate_examples(root, ids) for split, ids in split_ids.items()}

    def _generate_examples(self, root, ids):
        for image_id in ids:
            yield image_id, read_example(root, image_id)
