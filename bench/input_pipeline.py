"""Input throughput: the gain_voc2012 tf.data train pipeline against a torchvision DataLoader.

Both decode the same synthetic VOC-sized JPEGs (500x375) with libjpeg's accurate integer IDCT (PIL's pixels;
checked on a few files before timing), resize to 224x224 (bilinear, antialiased), apply AutoAugment (CIFAR10
policy) and a random horizontal flip, and normalize with ImageNet mean/std. The tf.data pipeline also carries
each image's mask through the resize and the geometric ops; the torchvision one (AutoAugment on image
tensors, as upstream) does images only. tf.data runs twice: decoding every pass (`cache_decoded=False`), and
with the decoded, resized split kept in memory (`cache_decoded=True`, the training default): it is decoded
once when the dataset is built (timed apart), and then every pass, the first included, runs only the
shuffle, augmentation and normalization: its rate is the steady state of epoch 2 and later. The DataLoader
decodes in every epoch. Runs measured in one process, on the same cores: torch first (its DataLoader forks
workers before TensorFlow is imported), then TensorFlow.

    python bench/input_pipeline.py [--num-images 300] [--batch-size 32] [--batches 30] [--workers 2]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torchvision  # noqa: F401  (before TensorFlow: the other order segfaults here)
from torchvision import transforms
from torchvision.io import decode_jpeg, read_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def write_mini_vocdevkit(root: Path, num_images: int, seed: int = 0) -> list:
    """VOC-like JPEGs (smooth gradients, ellipses, mild noise: compresses like a photo), annotations,
    masks for a quarter of the images, all ids in train.txt."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    height, width = 375, 500
    y, x = np.mgrid[:height, :width].astype(np.float32)
    ids = []
    for index in range(num_images):
        image_id = f"2012_{index:06d}"
        base = (rng.uniform(0, 255, 3) + rng.uniform(-0.3, 0.3, 3) * x[..., None]
                + rng.uniform(-0.3, 0.3, 3) * y[..., None])
        mask = np.zeros((height, width), np.uint8)
        label = int(rng.integers(len(CLASSES)))
        for _ in range(3):
            cy, cx, ry, rx = rng.uniform(50, 325), rng.uniform(50, 450), rng.uniform(20, 90), rng.uniform(20, 120)
            inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
            base[inside] = rng.uniform(0, 255, 3)
            mask[inside] = label + 1
        pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>{width}</width><height>{height}</height></size><object>"
            f"<name>{CLASSES[label]}</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
            f"<xmax>{width}</xmax><ymax>{height}</ymax></bndbox></object></annotation>")
        if index % 4 == 0:
            palette_image = PIL.Image.fromarray(mask, mode="P")
            palette_image.putpalette(rng.integers(0, 256, 768).tolist())
            palette_image.save(voc / "SegmentationClass" / f"{image_id}.png")
        ids.append(image_id)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids) + "\n")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids[:8]) + "\n")
    return [voc / "JPEGImages" / f"{i}.jpg" for i in ids]


class JpegFiles(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(decode_jpeg(read_file(str(self.paths[index]))))


def same_decoding(paths) -> bool:
    """Whether PIL, torchvision.io.decode_jpeg and gain_jax's tf.data decoder give the same pixels."""
    import gain_jax.data.pipeline as tf_pipeline  # TensorFlow: called after the DataLoader runs (see main)

    for path in paths:
        pil = np.asarray(PIL.Image.open(path).convert("RGB"))
        tv = decode_jpeg(read_file(str(path))).permute(1, 2, 0).numpy()
        tf_pixels = tf_pipeline.decode_image(Path(path).read_bytes()).numpy()
        if not (np.array_equal(pil, tv) and np.array_equal(pil, tf_pixels)):
            return False
    return True


def time_batches(batches, warmup: int, count: int, batch_size: int) -> float:
    """Images per second over `count` batches after `warmup` (graph tracing, worker start-up)."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return count * batch_size / (time.perf_counter() - start)


def torch_loader(paths, image_size, batch_size, workers, autoaugment):
    steps = [transforms.Resize((image_size, image_size), antialias=True)]
    if autoaugment:
        steps.append(transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10))
    steps += [transforms.RandomHorizontalFlip(), transforms.ConvertImageDtype(torch.float32),
              transforms.Normalize(MEAN, STD)]
    loader = torch.utils.data.DataLoader(JpegFiles(paths, transforms.Compose(steps)), batch_size=batch_size,
                                         shuffle=True, drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0)

    def forever():
        while True:
            yield from loader
    return forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="torch DataLoader workers")
    parser.add_argument("--workdir", default=None, help="where to write the JPEGs and the tfds data")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gain_bench_"))
    start = time.perf_counter()
    paths = write_mini_vocdevkit(workdir / "manual", args.num_images)
    print(f"wrote {len(paths)} JPEGs of 500x375 to {workdir / 'manual'} in {time.perf_counter() - start:.1f} s")

    rows = []
    for autoaugment in (True, False):
        loader = torch_loader(paths, args.image_size, args.batch_size, args.workers, autoaugment)
        rate = time_batches(loader, args.warmup, args.batches, args.batch_size)
        rows.append((f"torchvision DataLoader ({args.workers} workers)", autoaugment, rate))
        del loader

    import tensorflow as tf
    import tensorflow_datasets as tfds

    import gain_jax.data as gd

    decoders_agree = same_decoding(paths[:5])
    start = time.perf_counter()
    tfds.builder("gain_voc2012", data_dir=str(workdir / "tfds")).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(workdir / "manual"), try_download_gcs=False))
    print(f"built gain_voc2012 (validating every file) in {time.perf_counter() - start:.1f} s")
    decode_seconds = None
    for cached in (False, True):
        for autoaugment in (True, False):
            start = time.perf_counter()
            dataset = gd.make_dataset("gain_voc2012", "train", data_dir=str(workdir / "tfds"),
                                      manual_dir=str(workdir / "manual"), image_size=args.image_size,
                                      batch_size=args.batch_size, train=True, seed=0, autoaugment=autoaugment,
                                      shuffle_buffer=256, cache_decoded=cached)
            if cached and decode_seconds is None:
                decode_seconds = time.perf_counter() - start  # the split decoded and resized, once
            rate = time_batches(tfds.as_numpy(dataset), args.warmup, args.batches, args.batch_size)
            name = "tf.data, decoded in memory (+mask)" if cached else "tf.data, decoding each pass (+mask)"
            rows.append((name, autoaugment, rate))
            del dataset
    gd.clear_decoded_cache()

    print(f"\n{args.batches} batches of {args.batch_size} at {args.image_size}x{args.image_size} after "
          f"{args.warmup} warm-up batches; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          f"(an idle machine reads about 0); torch {torch.__version__}, tensorflow {tf.__version__}")
    print(f"decoders give the same pixels (PIL, torchvision.io, tf.data's decode_image) on 5 files: "
          f"{'yes' if decoders_agree else 'NO'}")
    print(f"decoded, resized split kept in memory: {len(paths)} images decoded once in {decode_seconds:.1f} s "
          f"({len(paths) / decode_seconds:.1f} images/s), not counted below")
    torch_rate = {autoaugment: rate for name, autoaugment, rate in rows if name.startswith("torchvision")}
    print(f"| {'pipeline':40s} | AutoAugment | images/s | vs DataLoader |")
    print(f"|{'-' * 42}|-------------|----------|---------------|")
    for name, autoaugment, rate in rows:
        print(f"| {name:40s} | {'yes' if autoaugment else 'no':11s} | {rate:8.1f} | "
              f"{rate / torch_rate[autoaugment]:12.2f}x |")
    for autoaugment in (True, False):
        cached_rate = next(rate for name, a, rate in rows if a == autoaugment and "in memory" in name)
        ratio = cached_rate / torch_rate[autoaugment]
        print(f"goal >= 2x the DataLoader, AutoAugment {'on' if autoaugment else 'off'}: {ratio:.2f}x, "
              f"{'met' if ratio >= 2 else 'NOT met'}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
