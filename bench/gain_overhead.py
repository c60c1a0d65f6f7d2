"""Step-time ratio of a GAIN train step to a plain classification train step (same model, batch, device).

    python bench/gain_overhead.py                       # small_cnn 64x64 b32 and vgg16 112x112 b4
    python bench/gain_overhead.py --backbone vgg16 --image-size 224 --batch-size 8 --steps 10
    python bench/gain_overhead.py --backbone small_cnn --image-size 32 --batch-size 8 --steps 1 --warmup 1 \
        --voc-batches 2                                 # smoke run

A GAIN step is one classification forward+backward, K head-only VJPs for Grad-CAM and one forward+backward
over the attention-mining batch, so union mode should cost about 2x a classification step (target <= 2.3;
a full backward for Grad-CAM would push it near 2.7). Per-label mode runs its attention-mining stream on
B*K images when padded (K = max_labels slots per image) and on about the B*n real (image, label) pairs when
packed (`gain_jax.pack_labels`; n = mean labels per image, rows rounded up to `gain_jax.gain.row_count`).

Rows, per backbone:
  union (2 labels)          every image carries 2 labels
  per-label K=k padded/packed   every image carries k labels (k = 2, 3); padded: max_labels = k
  per-label VOC padded/packed   label counts drawn from VOC 2012 train's histogram of distinct classes per
                            image (`VOC2012_TRAIN_LABEL_HISTOGRAM`), --voc-batches batches with a fixed
                            seed; padded: max_labels = the batch's largest count (so no image is refused);
                            packed: one program per packed shape. The median over the batches is shown.
Each row prints the GAIN/classification ratio and the target `1 + 0.6 n` (n = the mean labels per image of
the row's batches; union: 2.3), and for small_cnn packed K=2/K=3 the issue-12 targets (<= 2.0, <= 2.5).
"XLA temp MiB" is the compiled step's temporary buffer size (`Compiled.memory_analysis()`: working memory
beyond arguments and outputs, the largest over the row's programs). On a GPU the device's peak bytes in
use over the whole process is printed at the end (JAX cannot reset it per row); on the CPU no peak is
shown (the process's max RSS would cover every row and JAX itself).
Only JAX, flax and optax are imported (runs on a GPU machine without TensorFlow or torch).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gain_jax as gj

# VOC 2012 train (ImageSets/Main/train.txt, 5717 images): number of images with 1, 2, ... distinct classes,
# every annotated object counted, difficult ones included (as gain_voc2012's "labels"); 8863 (image, class)
# pairs, 1.5503 labels per image. Counted from the COCO-format annotations of the split in
# github.com/Edwardwaw/VOC-tools, pascal_train2012.json (commit 8a06bb7; 5717 images, 15774 objects).
# Cross-checked: the 5640 of these images that github.com/YudeWang/SEAM voc12/cls_labels.npy (labels read
# from the VOC2012 XML annotations) also lists have identical class sets; per-class image counts agree with
# the devkit's Table 1 (e.g. aeroplane 328 here with difficult objects, 327 there without).
VOC2012_TRAIN_LABEL_HISTOGRAM = {1: 3437, 2: 1600, 3: 530, 4: 117, 5: 30, 6: 3}
VOC_SEED = 2012
UNION_TARGET = 2.3
# issue 12's targets for small_cnn packed per-label rows with every image carrying k labels
ISSUE_TARGETS = {("small_cnn", 2): 2.0, ("small_cnn", 3): 2.5}


def voc_mean_labels() -> float:
    hist = VOC2012_TRAIN_LABEL_HISTOGRAM
    return sum(k * n for k, n in hist.items()) / sum(hist.values())


def make_classification_step(model):
    """The baseline: BCE-with-logits, Adam, nothing else."""

    def step(state, batch, rng):
        def loss_fn(params):
            variables = gj.training.variables_of(params, state.batch_stats)
            if state.batch_stats:
                logits, new_state = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"],
                                                rngs={"dropout": rng})
            else:
                logits, new_state = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng}), {}
            return optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean(), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             batch_stats=new_state.get("batch_stats", state.batch_stats), opt_state=opt_state), loss

    return jax.jit(step, donate_argnums=(0,))


def labels_with(num_labels: int, batch_size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return labels_with_counts(np.full(batch_size, num_labels), num_classes, rng)


def labels_with_counts(counts, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Multi-hot [B, C] with counts[b] distinct random classes in image b."""
    labels = np.zeros((len(counts), num_classes), np.float32)
    for row, count in zip(labels, counts):
        row[rng.choice(num_classes, int(count), replace=False)] = 1.0
    return labels


def sample_voc_counts(batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Label counts of `batch_size` images drawn (with replacement) from VOC 2012 train's histogram."""
    sizes = np.array(sorted(VOC2012_TRAIN_LABEL_HISTOGRAM))
    weights = np.array([VOC2012_TRAIN_LABEL_HISTOGRAM[k] for k in sizes], np.float64)
    return rng.choice(sizes, size=batch_size, p=weights / weights.sum())


def time_steps(step_fn, state, batch, steps: int, warmup: int, extra_args=()):
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, out = step_fn(state, batch, jax.random.PRNGKey(i), *extra_args)
        jax.block_until_ready((state, out))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), state


def compile_step(jitted, *args):
    """The jitted step compiled ahead of time for these arguments, and its XLA temp bytes (None if unknown)."""
    compiled = jitted.lower(*args).compile()
    try:
        temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # not every backend reports it
        temp = None
    return compiled, temp


@dataclasses.dataclass
class Case:
    name: str
    mode: str                 # "union", "padded" or "packed"
    label_batches: list       # numpy multi-hot [B, C] per timed batch
    target: float
    issue_target: float | None = None


@dataclasses.dataclass
class Row:
    name: str
    baseline: float
    gain: float
    mean_labels: float
    target: float
    issue_target: float | None
    shapes: str
    temp_bytes: int | None

    @property
    def ratio(self) -> float:
        return self.gain / self.baseline


def gain_batch(case: Case, images, labels: np.ndarray) -> tuple[gj.GainConfig, dict, str]:
    counts = (labels > 0).sum(axis=-1)
    batch = {"image": images, "labels": jnp.asarray(labels)}
    if case.mode == "union":
        return gj.GainConfig(mode="union"), batch, "K=1"
    if case.mode == "padded":
        most = int(counts.max())
        return gj.GainConfig(mode="per_label", max_labels=most), batch, f"K={most} R={len(labels) * most}"
    packing = gj.pack_labels(labels)
    batch["packing"] = packing
    shape = f"K={packing.slot_labels.shape[1]} R={packing.rows.shape[0]}"
    return gj.GainConfig(mode="per_label"), batch, shape


def bench(backbone: str, image_size: int, batch_size: int, steps: int, warmup: int, num_classes: int = 20,
          voc_batches: int = 4):
    rng = np.random.default_rng(0)
    model = gj.build_model(backbone, num_classes, dropout_rate=0.5)
    images = jnp.asarray(rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32))
    variables = model.init(jax.random.PRNGKey(0), images[:1])
    tx = optax.adam(1e-4)
    fresh_state = lambda: gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), tx)  # noqa: E731
    key0, on = jax.random.PRNGKey(0), jnp.float32(1.0)

    def time_baseline(labels):
        batch = {"image": images, "labels": jnp.asarray(labels)}
        state = fresh_state()
        compiled, _ = compile_step(make_classification_step(model), state, batch, key0)
        return time_steps(compiled, state, batch, steps, warmup)[0]

    fixed = {k: labels_with(k, batch_size, num_classes, rng) for k in (2, 3)}
    voc_rng = np.random.default_rng(VOC_SEED)
    voc = [labels_with_counts(sample_voc_counts(batch_size, voc_rng), num_classes, voc_rng)
           for _ in range(voc_batches)]
    cases = [Case("union (2 labels)", "union", [fixed[2]], UNION_TARGET)]
    for k in (2, 3):
        cases.append(Case(f"per-label K={k} padded", "padded", [fixed[k]], 1 + 0.6 * k))
        cases.append(Case(f"per-label K={k} packed", "packed", [fixed[k]], 1 + 0.6 * k,
                          ISSUE_TARGETS.get((backbone, k))))
    voc_mean = float(np.mean([(labels > 0).sum(axis=-1).mean() for labels in voc]))
    cases.append(Case("per-label VOC padded", "padded", voc, 1 + 0.6 * voc_mean))
    cases.append(Case("per-label VOC packed", "packed", voc, 1 + 0.6 * voc_mean))

    rows = []
    # interleave baseline and GAIN runs so that machine noise hits both alike
    base_time = time_baseline(fixed[2])
    for case in cases:
        times, shapes, temps = [], [], []
        for labels in case.label_batches:
            cfg, batch, shape = gain_batch(case, images, labels)
            state = fresh_state()
            compiled, temp = compile_step(gj.make_train_step(model, cfg), state, batch, key0, on)
            times.append(time_steps(compiled, state, batch, steps, warmup, extra_args=(on,))[0])
            shapes.append(shape)
            temps.append(temp)
        base_again = time_baseline(case.label_batches[0])
        baseline = statistics.median([base_time, base_again])
        mean_labels = float(np.mean([(labels > 0).sum(axis=-1).mean() for labels in case.label_batches]))
        rows.append(Row(case.name, baseline, statistics.median(times), mean_labels, case.target, case.issue_target,
                        ", ".join(dict.fromkeys(shapes)), None if None in temps else max(temps)))
    return rows


def device_peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # CPU and some plugins do not implement it
        return None
    return (stats or {}).get("peak_bytes_in_use")


def format_row(backbone: str, size: int, batch_size: int, row: Row) -> str:
    met = "yes" if row.ratio <= row.target else "NO"
    line = (f"{backbone:<10} {f'{size}x{size}':>9} {batch_size:>5}  {row.name:<22} {row.mean_labels:>5.2f} "
            f"{row.baseline * 1e3:>11.1f} {row.gain * 1e3:>12.1f} {row.ratio:>6.2f} {f'<={row.target:.2f}':>7} "
            f"{met:>4} ")
    temp = "-" if row.temp_bytes is None else f"{row.temp_bytes / 2**20:.1f}"
    line += f"{temp:>12}  {row.shapes}"
    if row.issue_target is not None:
        line += f"  [issue 12: <={row.issue_target:.1f} {'yes' if row.ratio <= row.issue_target else 'NO'}]"
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="one backbone (default: small_cnn, then vgg16)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, per batch")
    parser.add_argument("--voc-batches", type=int, default=4,
                        help="label batches drawn from the VOC 2012 train histogram (one program each)")
    args = parser.parse_args(argv)
    if args.backbone:
        configs = [(args.backbone, args.image_size or 224, args.batch_size or 8)]
    else:
        configs = [("small_cnn", 64, 32), ("vgg16", 112, 4)]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"VOC 2012 train: {sum(VOC2012_TRAIN_LABEL_HISTOGRAM.values())} images, labels per image "
          f"{dict(VOC2012_TRAIN_LABEL_HISTOGRAM)}, mean {voc_mean_labels():.3f}; {args.voc_batches} batches, "
          f"seed {VOC_SEED}")
    print(f"{'backbone':<10} {'input':>9} {'batch':>5}  {'case':<22} {'n':>5} {'cls step ms':>11} "
          f"{'GAIN step ms':>12} {'ratio':>6} {'target':>7} {'met':>4} {'XLA temp MiB':>12}  shapes (K slots, R rows)")
    for backbone, size, batch_size in configs:
        for row in bench(backbone, size, batch_size, args.steps, args.warmup, voc_batches=args.voc_batches):
            print(format_row(backbone, size, batch_size, row), flush=True)
    peak = device_peak_bytes()
    if peak is not None:
        print(f"device peak bytes in use, whole process (every row): {peak / 2**20:.0f} MiB")
    else:
        print("device peak memory: not reported by this backend (CPU); see the XLA temp column")


if __name__ == "__main__":
    main()
