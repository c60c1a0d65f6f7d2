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
With `GainConfig.am_labels_per_image = 1` (one label per image drawn each step, an unbiased estimate of
per-label L_am; not upstream's) it runs on B rows whatever the label counts.

Rows, per backbone:
  union (2 labels)          every image carries 2 labels
  per-label K=k padded/packed   every image carries k labels (k = 2, 3); padded: max_labels = k
  per-label VOC padded/packed   label counts that follow VOC 2012 train's histogram of distinct classes per
                            image (`VOC2012_TRAIN_LABEL_HISTOGRAM`; a systematic sample of B x --voc-batches
                            images, shuffled into --voc-batches batches with a fixed seed); padded:
                            max_labels = the batch's largest count (so no image is refused);
                            packed: one program per packed shape. The median over the batches is shown.
  per-label K=2/K=3/VOC sampled   the packed rows' label batches with am_labels_per_image = 1: one label per
                            image (drawn with a fixed seed) goes through the attention-mining stream
Each row prints the GAIN/classification ratio and the target `1 + 0.6 n` (n = the mean labels per image of
the row's batches; union: 2.3), and for small_cnn packed and sampled K=2/K=3 the issue-12 targets (<= 2.0,
<= 2.5).
"flops" is the GAIN step's floating-point operations over the plain step's, by XLA's cost analysis of the two
compiled programs (`Compiled.cost_analysis()`; the mean over the row's programs): the work the time ratio is
measured against. A target below it asks the GAIN step to run its flops faster than the plain step runs its own.
"XLA temp MiB" is the compiled step's temporary buffer size (`Compiled.memory_analysis()`: working memory
beyond arguments and outputs, the largest over the row's programs). On a GPU the device's peak bytes in
use over the whole process is printed at the end (JAX cannot reset it per row).
"cls peak MiB" / "GAIN peak MiB" / "mem ratio": the memory one step needs beyond what is resident before it
(weights, Adam state, batch, the compiled program), for the plain step and the row's GAIN step, and their
ratio. On the CPU it is measured: each program runs in a fresh child process of this script
(`--memory-child`), which compiles it, returns freed heap to the OS (malloc_trim), reads its resident set
size, resets the kernel's peak-RSS mark (/proc/self/clear_refs 5), runs `--memory-steps` steps and reads the
peak (VmHWM): peak minus the RSS before the first step. On a GPU (no per-row reset of the device peak, and
compilation's autotuning allocates device memory too) it is XLA's figure for the compiled program: output +
temp bytes minus the output bytes aliased to donated arguments (`Compiled.memory_analysis()`). The largest
over the row's programs is shown. `--no-memory` skips the children.
Only JAX, flax and optax are imported (runs on a GPU machine without TensorFlow or torch).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import statistics
import subprocess
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
SAMPLE_SEED = 12  # the sampled rows' draw of attention-mining labels (the same in a --memory-child)
SAMPLED_LABELS = 1  # GainConfig.am_labels_per_image of the sampled rows


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


def voc_label_counts(num_images: int, rng: np.random.Generator) -> np.ndarray:
    """Label counts of `num_images` images that follow VOC 2012 train's histogram as closely as
    `num_images` allows: the counts of the images at evenly spaced quantiles of the 5717 sorted counts
    (systematic sampling), in an order shuffled by `rng`. A random draw of a few images can be far off
    the population's mean (16 images drawn at random gave 1.12 labels per image, against 1.55)."""
    sizes = sorted(VOC2012_TRAIN_LABEL_HISTOGRAM)
    population = np.repeat(sizes, [VOC2012_TRAIN_LABEL_HISTOGRAM[k] for k in sizes])  # sorted
    positions = ((np.arange(num_images) + 0.5) * len(population) / num_images).astype(int)
    return rng.permutation(population[positions])


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


def xla_cost_analysis(compiled) -> dict:
    """XLA's cost analysis of a compiled program ("flops", "bytes accessed", ...); {} if not reported."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # not every backend reports it
        return {}
    return (analysis[0] if isinstance(analysis, list) else analysis) or {}  # a list in older jax


def xla_flops(compiled) -> float | None:
    """The compiled program's floating-point operations by XLA's cost analysis; None if not reported."""
    flops = xla_cost_analysis(compiled).get("flops")
    return None if flops is None else float(flops)


def xla_program_bytes(compiled, with_arguments: bool = False) -> int | None:
    """What the compiled program allocates when it runs, by XLA's buffer assignment: outputs + temp buffers -
    outputs aliased to donated arguments (+ the arguments with `with_arguments`); None if not reported."""
    try:
        analysis = compiled.memory_analysis()
        total = analysis.output_size_in_bytes + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes
        return total + (analysis.argument_size_in_bytes if with_arguments else 0)
    except Exception:  # not every backend reports it
        return None


# ---------------------------------------------------------------------------------------------- host memory

def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: the resident set size's high-water mark (since start or the last reset_peak_rss)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0); raises OSError where not allowed."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def trim_heap() -> None:
    """Give freed malloc memory back to the OS (glibc), so that it does not hide a later allocation."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def step_host_memory(compiled, state, batch, steps: int, extra_args=()) -> int:
    """Peak RSS while `steps` steps run minus the RSS before the first one (the program already compiled)."""
    trim_heap()
    before = rss_bytes()
    reset_peak_rss()
    for i in range(steps):
        state, out = compiled(state, batch, jax.random.PRNGKey(i), *extra_args)
        jax.block_until_ready((state, out))
    return peak_rss_bytes() - before


@dataclasses.dataclass
class Case:
    name: str
    mode: str                 # "union", "padded" or "packed"
    label_batches: list       # numpy multi-hot [B, C] per timed batch
    target: float
    issue_target: float | None = None
    am_labels: int = 0        # packed: GainConfig.am_labels_per_image (0 = every label)


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
    flops_ratio: float | None = None    # GAIN step's flops / the plain step's (mean over the row's programs)
    peak_bytes: int | None = None       # GAIN step, largest over the row's programs (see the module docstring)
    cls_peak_bytes: int | None = None   # the plain classification step

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
    rng = np.random.default_rng(SAMPLE_SEED) if case.am_labels else None
    packing = gj.pack_labels(labels, am_labels_per_image=case.am_labels, rng=rng)
    batch["packing"] = packing
    shape = f"K={packing.slot_labels.shape[1]} R={packing.rows.shape[0]}"
    return gj.GainConfig(mode="per_label", am_labels_per_image=case.am_labels), batch, shape


@dataclasses.dataclass
class Setup:
    model: object
    images: jax.Array
    fresh_state: object       # () -> a new TrainState from the same initial weights
    fixed: dict               # k -> multi-hot [B, C] with k labels per image
    cases: list


def setup(backbone: str, image_size: int, batch_size: int, num_classes: int = 20, voc_batches: int = 4) -> Setup:
    """Model, images, initial weights and the rows' label batches; deterministic (a --memory-child rebuilds
    exactly the parent's)."""
    rng = np.random.default_rng(0)
    model = gj.build_model(backbone, num_classes, dropout_rate=0.5)
    images = jnp.asarray(rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32))
    variables = model.init(jax.random.PRNGKey(0), images[:1])
    tx = optax.adam(1e-4)
    fresh_state = lambda: gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), tx)  # noqa: E731

    fixed = {k: labels_with(k, batch_size, num_classes, rng) for k in (2, 3)}
    voc_rng = np.random.default_rng(VOC_SEED)
    voc_counts = voc_label_counts(batch_size * voc_batches, voc_rng).reshape(voc_batches, batch_size)
    voc = [labels_with_counts(counts, num_classes, voc_rng) for counts in voc_counts]
    cases = [Case("union (2 labels)", "union", [fixed[2]], UNION_TARGET)]
    for k in (2, 3):
        cases.append(Case(f"per-label K={k} padded", "padded", [fixed[k]], 1 + 0.6 * k))
        cases.append(Case(f"per-label K={k} packed", "packed", [fixed[k]], 1 + 0.6 * k,
                          ISSUE_TARGETS.get((backbone, k))))
    voc_mean = float(np.mean([(labels > 0).sum(axis=-1).mean() for labels in voc]))
    cases.append(Case("per-label VOC padded", "padded", voc, 1 + 0.6 * voc_mean))
    cases.append(Case("per-label VOC packed", "packed", voc, 1 + 0.6 * voc_mean))
    # appended, so that the other rows keep their --memory-child case indices
    for k in (2, 3):
        cases.append(Case(f"per-label K={k} sampled", "packed", [fixed[k]], 1 + 0.6 * k,
                          ISSUE_TARGETS.get((backbone, k)), am_labels=SAMPLED_LABELS))
    cases.append(Case("per-label VOC sampled", "packed", voc, 1 + 0.6 * voc_mean, am_labels=SAMPLED_LABELS))
    return Setup(model, images, fresh_state, fixed, cases)


CLS_CASE = -1  # --memory-child's case index of the plain classification step


def programs(bench_setup: Setup, case_index: int):
    """(compiled step, state, batch, extra args, shape, XLA temp bytes, XLA program bytes, XLA flops) for each
    program of a row (the row's label batches), compiled one at a time; CLS_CASE: the classification step."""
    key0, on = jax.random.PRNGKey(0), jnp.float32(1.0)
    model, images = bench_setup.model, bench_setup.images
    if case_index == CLS_CASE:
        batch = {"image": images, "labels": jnp.asarray(bench_setup.fixed[2])}
        state = bench_setup.fresh_state()
        compiled, temp = compile_step(make_classification_step(model), state, batch, key0)
        yield compiled, state, batch, (), "", temp, xla_program_bytes(compiled), xla_flops(compiled)
        return
    case = bench_setup.cases[case_index]
    for labels in case.label_batches:
        cfg, batch, shape = gain_batch(case, images, labels)
        state = bench_setup.fresh_state()
        compiled, temp = compile_step(gj.make_train_step(model, cfg), state, batch, key0, on)
        yield compiled, state, batch, (on,), shape, temp, xla_program_bytes(compiled), xla_flops(compiled)


def memory_child(spec: dict) -> None:
    """Run in a fresh process: the host memory of each program of one row; prints one JSON line."""
    bench_setup = setup(spec["backbone"], spec["image_size"], spec["batch_size"], spec["num_classes"],
                        spec["voc_batches"])
    peaks = []
    for compiled, state, batch, extra, *_ in programs(bench_setup, spec["case"]):
        try:
            peaks.append(step_host_memory(compiled, state, batch, spec["steps"], extra))
        except OSError as error:  # no /proc or clear_refs not writable
            print(json.dumps({"peak_bytes": None, "error": str(error)}))
            return
        del compiled, state, batch
    print(json.dumps({"peak_bytes": max(peaks)}))


def host_memory(backbone: str, image_size: int, batch_size: int, num_classes: int, voc_batches: int,
                case_index: int, steps: int) -> int | None:
    """`memory_child` of one row in a fresh interpreter (same environment); None if it could not measure."""
    spec = dict(backbone=backbone, image_size=image_size, batch_size=batch_size, num_classes=num_classes,
                voc_batches=voc_batches, case=case_index, steps=steps)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)],
                            capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        print(f"  memory child for case {case_index} failed (exit {result.returncode}): "
              f"{result.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])["peak_bytes"]


def bench(backbone: str, image_size: int, batch_size: int, steps: int, warmup: int, num_classes: int = 20,
          voc_batches: int = 4, memory_steps: int | None = 2):
    """The rows of one backbone; `memory_steps` None: no peak-memory columns."""
    bench_setup = setup(backbone, image_size, batch_size, num_classes, voc_batches)
    on_cpu = jax.default_backend() == "cpu"

    def time_baseline(labels):
        batch = {"image": bench_setup.images, "labels": jnp.asarray(labels)}
        state = bench_setup.fresh_state()
        compiled, _ = compile_step(make_classification_step(bench_setup.model), state, batch, jax.random.PRNGKey(0))
        return time_steps(compiled, state, batch, steps, warmup)[0], xla_flops(compiled)

    def largest(values):
        return None if not values or None in values else max(values)

    rows, xla_bytes = [], {}
    # interleave baseline and GAIN runs so that machine noise hits both alike
    base_time, base_flops = time_baseline(bench_setup.fixed[2])
    for index, case in enumerate(bench_setup.cases):
        times, shapes, temps, program_bytes, flops = [], [], [], [], []
        for compiled, state, batch, extra, shape, temp, footprint, program_flops in programs(bench_setup, index):
            times.append(time_steps(compiled, state, batch, steps, warmup, extra_args=extra)[0])
            shapes.append(shape)
            temps.append(temp)
            program_bytes.append(footprint)
            flops.append(program_flops)
        xla_bytes[index] = largest(program_bytes)
        flops_ratio = None if None in flops or not base_flops else float(np.mean(flops)) / base_flops
        base_again, _ = time_baseline(case.label_batches[0])
        baseline = statistics.median([base_time, base_again])
        mean_labels = float(np.mean([(labels > 0).sum(axis=-1).mean() for labels in case.label_batches]))
        rows.append(Row(case.name, baseline, statistics.median(times), mean_labels, case.target, case.issue_target,
                        ", ".join(dict.fromkeys(shapes)), largest(temps), flops_ratio))

    if memory_steps is not None:
        # after every timed step: the children do not run while anything is timed
        if on_cpu:
            measure = lambda index: host_memory(backbone, image_size, batch_size, num_classes,  # noqa: E731
                                                voc_batches, index, memory_steps)
            cls_peak = measure(CLS_CASE)
            for index, row in enumerate(rows):
                row.peak_bytes, row.cls_peak_bytes = measure(index), cls_peak
        else:
            cls_peak = next(programs(bench_setup, CLS_CASE))[6]
            for index, row in enumerate(rows):
                row.peak_bytes, row.cls_peak_bytes = xla_bytes[index], cls_peak
    return rows


def device_peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # CPU and some plugins do not implement it
        return None
    return (stats or {}).get("peak_bytes_in_use")


def format_row(backbone: str, size: int, batch_size: int, row: Row, memory: bool = False) -> str:
    met = "yes" if row.ratio <= row.target else "NO"
    line = (f"{backbone:<10} {f'{size}x{size}':>9} {batch_size:>5}  {row.name:<22} {row.mean_labels:>5.2f} "
            f"{row.baseline * 1e3:>11.1f} {row.gain * 1e3:>12.1f} {row.ratio:>6.2f} {f'<={row.target:.2f}':>7} "
            f"{met:>4} ")
    line += f"{'-' if row.flops_ratio is None else f'{row.flops_ratio:.2f}':>6} "
    temp = "-" if row.temp_bytes is None else f"{row.temp_bytes / 2**20:.1f}"
    line += f"{temp:>12}"
    if memory:
        mib = lambda value: "n/a" if value is None else f"{value / 2**20:.1f}"  # noqa: E731
        ratio = ("n/a" if row.peak_bytes is None or not row.cls_peak_bytes
                 else f"{row.peak_bytes / row.cls_peak_bytes:.2f}")
        line += f" {mib(row.cls_peak_bytes):>12} {mib(row.peak_bytes):>13} {ratio:>9}"
    line += f"  {row.shapes}"
    if row.issue_target is not None:
        line += f"  [issue 12: <={row.issue_target:.1f} {'yes' if row.ratio <= row.issue_target else 'NO'}]"
    return line


MEMORY_NOTE = {
    "cpu": "peak MiB (CPU): host RSS high-water mark while the step runs minus the RSS before its first run, each "
           "program in a fresh child process; mem ratio = GAIN / cls",
    "other": "peak MiB: XLA's buffer assignment of the compiled step (outputs + temp - outputs aliased to donated "
             "arguments), what a step allocates on the device beyond its arguments; mem ratio = GAIN / cls",
}


def main(argv=None):
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        return memory_child(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="one backbone (default: small_cnn, then vgg16)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, per batch")
    parser.add_argument("--voc-batches", type=int, default=4,
                        help="label batches drawn from the VOC 2012 train histogram (one program each)")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="steps each CPU memory child runs (its peak covers them all, the first included)")
    parser.add_argument("--no-memory", action="store_true",
                        help="no peak-memory columns (on the CPU: no child processes)")
    args = parser.parse_args(argv)
    if args.memory_steps < 1:
        parser.error(f"--memory-steps must be >= 1, got {args.memory_steps}")
    if args.backbone:
        configs = [(args.backbone, args.image_size or 224, args.batch_size or 8)]
    else:
        configs = [("small_cnn", 64, 32), ("vgg16", 112, 4)]
    memory = not args.no_memory
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"VOC 2012 train: {sum(VOC2012_TRAIN_LABEL_HISTOGRAM.values())} images, labels per image "
          f"{dict(VOC2012_TRAIN_LABEL_HISTOGRAM)}, mean {voc_mean_labels():.3f}; {args.voc_batches} batches, "
          f"seed {VOC_SEED}")
    if memory:
        print(MEMORY_NOTE["cpu" if jax.default_backend() == "cpu" else "other"])
    memory_header = f" {'cls peak MiB':>12} {'GAIN peak MiB':>13} {'mem ratio':>9}" if memory else ""
    print(f"{'backbone':<10} {'input':>9} {'batch':>5}  {'case':<22} {'n':>5} {'cls step ms':>11} "
          f"{'GAIN step ms':>12} {'ratio':>6} {'target':>7} {'met':>4} {'flops':>6} {'XLA temp MiB':>12}"
          f"{memory_header}  shapes (K slots, R rows)")
    for backbone, size, batch_size in configs:
        for row in bench(backbone, size, batch_size, args.steps, args.warmup, voc_batches=args.voc_batches,
                         memory_steps=args.memory_steps if memory else None):
            print(format_row(backbone, size, batch_size, row, memory), flush=True)
    peak = device_peak_bytes()
    if peak is not None:
        print(f"device peak bytes in use, whole process (every row): {peak / 2**20:.0f} MiB")
    else:
        print("device peak memory: not reported by this backend (CPU); see the XLA temp and peak columns")


if __name__ == "__main__":
    main()
