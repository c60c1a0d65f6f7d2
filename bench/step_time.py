"""Training-step time of gain_jax against the PyTorch reference (gain_torch_ref), same machine, same inputs.

    python bench/step_time.py                        # CPU: small_cnn 64x64 b32, vgg16 112x112 b2
    python bench/step_time.py --full                 # vgg16 at 224x224 b4 (the default on a GPU)
    python bench/step_time.py --backbone vgg16 --image-size 224 --batch-size 4 --steps 10
    python bench/step_time.py --gpu                  # issue 12 item 5: vgg19 224x224 b8, union and per-label

A step is what training does: GAIN forward (classification stream, Grad-CAM, soft mask, attention-mining
stream), the losses, backward and one Adam update. Both sides start from the same weights (the torch model's
state dict imported with `gain_jax.from_torchvision`), see the same images and labels, and run dropout and
BatchNorm in training mode. Warm-up steps (JAX compilation, torch's allocator) are excluded; the median of
the timed steps is reported (the one-image-at-a-time loops: one timed pass over the B images, after `--warmup`
untimed single-image steps).

Cases: union mode, and per-label mode with 1, 2 and 3 labels per image (max_labels = labels, so no padded
slot). Then the per-label step on a batch of B images against the original repository's way: one image at
a time, the reference's per-label path on batch 1 (a loop over the image's labels), one Adam step per image,
B times, with upstream's batch-1 total `n_labels * L_cl + L_am`. JAX on batch 1, B times, is shown too, to
separate the gain from batching from the framework difference.

Every row also gives images/s of each side (batch / median step time) and memory: "JAX MiB", XLA's buffer
assignment of the compiled JAX step (arguments: weights, Adam state, batch; plus outputs and temp buffers,
minus outputs aliased to the donated state); "JAX peak", the JAX device's peak bytes in use over the process
so far (`memory_stats()`, GPU only: JAX cannot reset it, so a row's figure covers the rows before it; the
cases run in order of growing attention-mining batch); "torch peak", `torch.cuda.max_memory_allocated`
reset before the case (CUDA only: model, Adam state, images, activations). "n/a" where not available.

--gpu: the configuration of issue 12, item 5: vgg19 at 224x224, batch 8, union and per-label (1, 2, 3 labels),
JAX against the reference, no one-image-at-a-time loop; it prints whether JAX reaches 3x the reference's
images/s. --backbone, --image-size and --batch-size still override it (a CPU smoke run of the same path).

Imports JAX, flax, optax, torch and torchvision, never TensorFlow (no gain_jax.data; checked at the end): runs on
a GPU machine. Torch runs on CUDA when available (else CPU with `torch.set_num_threads(--torch-threads)`,
default: all cores). Unless XLA_PYTHON_CLIENT_MEM_FRACTION or XLA_PYTHON_CLIENT_PREALLOCATE is set, JAX
preallocates half the GPU's memory (not 75%), so that torch, in the same process, has the other half.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

import torch
import torchvision  # noqa: F401  - before anything that could pull in TensorFlow (segfault otherwise)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not {"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"} & set(os.environ):
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.5"  # torch shares the GPU with JAX in this process

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gain_jax as gj
import gain_torch_ref as ref
from bench.gain_overhead import compile_step, device_peak_bytes, labels_with, time_steps, xla_program_bytes

NUM_CLASSES = 20  # VOC's class count, as gain_overhead.py
LEARNING_RATE = 1e-4
DROPOUT = 0.5
LABEL_COUNTS = (1, 2, 3)
GPU_CONFIG = ("vgg19", 224, 8)  # issue 12, item 5
GOAL = 3.0                      # issue 12, item 5: JAX images/s >= 3x the reference's (on a GPU)


# ---------------------------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def torch_device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu, torch.set_num_threads({torch.get_num_threads()})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run_once, steps: int, warmup: int, device: torch.device | None = None) -> float:
    """Median wall time of `run_once()` over `steps` calls after `warmup` untimed ones; `run_once` must
    block until its work is done (JAX), or `device` is synchronized (torch)."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        run_once()
        if device is not None:
            synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_seconds(per_image_steps, warmup: int, device: torch.device | None = None) -> float:
    """Wall time of one pass over the B per-image steps, after `warmup` of them ran untimed (compilation,
    allocator). One pass is already a sum of B step times, so it is not repeated."""
    for step in per_image_steps[:warmup]:
        step()
    if device is not None:
        synchronize(device)
    start = time.perf_counter()
    for step in per_image_steps:
        step()
    if device is not None:
        synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- torch side

def torch_step_fn(model, optimizer, images, labels, cfg: ref.RefConfig, upstream_total_labels: int | None = None):
    """One reference train step as a closure; `upstream_total_labels` = n uses n * L_cl + L_am (batch-1 script)."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = ref.gain_forward(model, images, labels, cfg, train=True)
        losses = ref.gain_losses(out, labels, cfg)
        total = (ref.upstream_per_label_total(losses, upstream_total_labels) if upstream_total_labels
                 else losses["total"])
        total.backward()
        optimizer.step()

    return step


def fresh_torch(initial_state: dict, backbone: str, device: torch.device):
    model = ref.build_model(backbone, NUM_CLASSES, dropout=DROPOUT).to(device)
    model.load_state_dict(initial_state)
    model.train()
    return model, torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)


# ---------------------------------------------------------------------------------------------- a configuration

@dataclasses.dataclass
class Row:
    case: str
    jax_ms: float
    torch_ms: float
    batch_size: int = 1
    jax_xla_bytes: int | None = None     # the compiled JAX step: arguments + outputs + temp - aliased
    jax_peak_bytes: int | None = None    # JAX device peak bytes in use, process so far (GPU)
    torch_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated over this case (CUDA)

    @property
    def ratio(self) -> float:
        return self.torch_ms / self.jax_ms

    @property
    def jax_images_per_s(self) -> float:
        return self.batch_size / (self.jax_ms / 1e3)

    @property
    def torch_images_per_s(self) -> float:
        return self.batch_size / (self.torch_ms / 1e3)


def torch_reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def torch_peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


@dataclasses.dataclass
class Setup:
    """One configuration's models, from the same weights, and its inputs on both sides."""
    backbone: str
    batch_size: int
    initial_state: dict      # the torch model's state dict (the reference starts from it)
    variables: dict          # the same weights for gain_jax
    jax_model: object
    images_jax: object
    images_torch: torch.Tensor
    logit_difference: float  # max |torch logits - JAX logits|, evaluation mode: the weights match
    rng: np.random.Generator

    def fresh_jax_state(self, tx):
        return gj.create_train_state(jax.tree_util.tree_map(jnp.copy, self.variables), tx)


def setup_config(backbone: str, image_size: int, batch_size: int, torch_device: torch.device) -> Setup:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    torch_model = ref.build_model(backbone, NUM_CLASSES, dropout=DROPOUT)
    initial_state = {key: value.detach().clone() for key, value in torch_model.state_dict().items()}
    variables = gj.from_torchvision(backbone, {k: v.numpy() for k, v in initial_state.items()}, NUM_CLASSES)
    jax_model = gj.build_model(backbone, NUM_CLASSES, dropout_rate=DROPOUT)
    del torch_model

    images_nhwc = rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32)
    images_jax = jnp.asarray(images_nhwc)
    images_torch = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()).to(torch_device)

    # same weights and inputs: the two models' evaluation logits agree
    check_model, _ = fresh_torch(initial_state, backbone, torch_device)
    with torch.no_grad():
        check_model.eval()
        torch_logits = check_model(images_torch).cpu().numpy()
    jax_logits = np.asarray(jax_model.apply(variables, images_jax, train=False))
    return Setup(backbone, batch_size, initial_state, variables, jax_model, images_jax, images_torch,
                 float(np.max(np.abs(torch_logits - jax_logits))), rng)


def bench_config(backbone: str, image_size: int, batch_size: int, steps: int, warmup: int,
                 torch_device: torch.device, batch_one_loop: bool = True) -> tuple[list[Row], list[Row], float]:
    """(main rows, per-image-loop rows, max |logit difference| of the two models at the start)."""
    setup = setup_config(backbone, image_size, batch_size, torch_device)
    rng, initial_state, jax_model = setup.rng, setup.initial_state, setup.jax_model
    images_jax, images_torch, logit_difference = setup.images_jax, setup.images_torch, setup.logit_difference
    tx = optax.adam(LEARNING_RATE)

    def fresh_jax_state():
        return setup.fresh_jax_state(tx)

    attention_on = (jnp.float32(1.0),)
    cases = [("union (2 labels)", "union", 2)] + [(f"per-label, {n} label{'s' * (n > 1)}", "per_label", n)
                                                  for n in LABEL_COUNTS]
    rows, loop_rows = [], []
    for name, mode, num_labels in cases:
        labels_np = labels_with(num_labels, batch_size, NUM_CLASSES, rng)
        max_labels = num_labels if mode == "per_label" else 4
        jax_cfg = gj.GainConfig(mode=mode, max_labels=max_labels)
        ref_cfg = ref.RefConfig(mode=mode, max_labels=max_labels)
        batch = {"image": images_jax, "labels": jnp.asarray(labels_np)}
        labels_torch = torch.from_numpy(labels_np).to(torch_device)

        jax_state = fresh_jax_state()
        compiled, _ = compile_step(gj.make_train_step(jax_model, jax_cfg), jax_state, batch, jax.random.PRNGKey(0),
                                   *attention_on)
        jax_seconds, jax_state = time_steps(compiled, jax_state, batch, steps, warmup, extra_args=attention_on)
        jax_xla = xla_program_bytes(compiled, with_arguments=True)
        jax_peak = device_peak_bytes()
        del compiled, jax_state
        torch_reset_peak(torch_device)
        model, optimizer = fresh_torch(initial_state, backbone, torch_device)
        torch_seconds = median_seconds(torch_step_fn(model, optimizer, images_torch, labels_torch, ref_cfg),
                                       steps, warmup, torch_device)
        torch_peak = torch_peak_bytes(torch_device)
        del model, optimizer
        rows.append(Row(name, jax_seconds * 1e3, torch_seconds * 1e3, batch_size, jax_xla, jax_peak, torch_peak))
        print(f"  {backbone} {name}: JAX {jax_seconds * 1e3:.1f} ms, torch {torch_seconds * 1e3:.1f} ms",
              flush=True)

        if mode != "per_label" or not batch_one_loop:
            continue
        # the original's way: batch 1, one Adam step per image, B images
        model, optimizer = fresh_torch(initial_state, backbone, torch_device)
        per_image_steps = [torch_step_fn(model, optimizer, images_torch[b:b + 1], labels_torch[b:b + 1], ref_cfg,
                                         upstream_total_labels=num_labels) for b in range(batch_size)]

        torch_loop_seconds = loop_seconds(per_image_steps, warmup, torch_device)
        del model, optimizer, per_image_steps

        jax_step = gj.make_train_step(jax_model, jax_cfg)
        jax_state = [fresh_jax_state()]
        single_batches = [{"image": images_jax[b:b + 1], "labels": batch["labels"][b:b + 1]}
                          for b in range(batch_size)]
        keys = [jax.random.PRNGKey(b) for b in range(batch_size)]

        def jax_single_step(single, key, state_box=jax_state, step_fn=jax_step):
            def step():
                state_box[0], metrics = step_fn(state_box[0], single, key, *attention_on)
                jax.block_until_ready((state_box[0], metrics))
            return step

        jax_loop_seconds = loop_seconds([jax_single_step(single, key) for single, key in zip(single_batches, keys)],
                                        warmup)
        jax_state.clear()
        loop_rows.append((num_labels, jax_seconds * 1e3, jax_loop_seconds * 1e3, torch_loop_seconds * 1e3))
        print(f"  {backbone} per-label {num_labels}: JAX b1 x{batch_size} {jax_loop_seconds * 1e3:.1f} ms, "
              f"torch b1 x{batch_size} {torch_loop_seconds * 1e3:.1f} ms", flush=True)
    return rows, loop_rows, logit_difference


def default_step_runs(backbone: str, image_size: int, batch_size: int, steps: int, warmup: int, runs: int,
                      torch_device: torch.device) -> list[tuple[float, float, float]]:
    """--default-step: the default GAIN step (`GainConfig()`, union) of JAX and of the reference, `runs` runs in
    this process, each `steps` JAX and `steps` torch steps alternating one by one (the order swapped every
    round), so that the machine's load hits both alike. [(JAX median s, torch median s, load average)]."""
    setup = setup_config(backbone, image_size, batch_size, torch_device)
    labels_np = labels_with(2, batch_size, NUM_CLASSES, setup.rng)
    batch = {"image": setup.images_jax, "labels": jnp.asarray(labels_np)}
    labels_torch = torch.from_numpy(labels_np).to(torch_device)
    attention_on = jnp.float32(1.0)
    jax_state = setup.fresh_jax_state(optax.adam(LEARNING_RATE))
    compiled, _ = compile_step(gj.make_train_step(setup.jax_model, gj.GainConfig()), jax_state, batch,
                               jax.random.PRNGKey(0), attention_on)
    model, optimizer = fresh_torch(setup.initial_state, backbone, torch_device)
    torch_step = torch_step_fn(model, optimizer, setup.images_torch, labels_torch, ref.RefConfig())
    step_index = 0

    def jax_step():
        nonlocal jax_state, step_index
        jax_state, metrics = compiled(jax_state, batch, jax.random.PRNGKey(step_index), attention_on)
        jax.block_until_ready((jax_state, metrics))
        step_index += 1

    for _ in range(warmup):
        jax_step()
        torch_step()
    synchronize(torch_device)
    results = []
    for run in range(runs):
        times = {jax_step: [], torch_step: []}
        for round_index in range(steps):
            for step in ((jax_step, torch_step) if round_index % 2 == 0 else (torch_step, jax_step)):
                start = time.perf_counter()
                step()
                synchronize(torch_device)
                times[step].append(time.perf_counter() - start)
        jax_seconds, torch_seconds = statistics.median(times[jax_step]), statistics.median(times[torch_step])
        results.append((jax_seconds, torch_seconds, os.getloadavg()[0]))
        print(f"  run {run + 1}: JAX {jax_seconds * 1e3:.1f} ms, torch {torch_seconds * 1e3:.1f} ms, "
              f"ratio {torch_seconds / jax_seconds:.3f}", flush=True)
    return results


def print_default_step(backbone: str, image_size: int, batch_size: int, results) -> None:
    print(f"\ndefault GAIN step (GainConfig(): union, 2 labels per image), {backbone} {image_size}x{image_size} "
          f"batch {batch_size}; JAX and torch steps alternating; ratio = torch ms / JAX ms = JAX steps/s / torch "
          "steps/s (>= 1: JAX at least as fast)")
    print(f"{'run':<6}{'JAX ms':>9}{'JAX steps/s':>13}{'torch ms':>10}{'torch steps/s':>15}{'ratio':>8}{'load':>7}")
    for run, (jax_seconds, torch_seconds, load) in enumerate(results, 1):
        print(f"{run:<6}{jax_seconds * 1e3:>9.1f}{1 / jax_seconds:>13.2f}{torch_seconds * 1e3:>10.1f}"
              f"{1 / torch_seconds:>15.2f}{torch_seconds / jax_seconds:>8.3f}{load:>7.1f}")
    ratios = [torch_seconds / jax_seconds for jax_seconds, torch_seconds, _ in results]
    best = max(range(len(ratios)), key=ratios.__getitem__)
    print(f"best of {len(ratios)} runs: ratio {ratios[best]:.3f} (run {best + 1}; all: "
          f"{', '.join(f'{ratio:.3f}' for ratio in ratios)}); JAX {1 / results[best][0]:.2f} steps/s, torch "
          f"{1 / results[best][1]:.2f} steps/s")


# ---------------------------------------------------------------------------------------------- main

def default_configs(on_gpu: bool, full: bool):
    if on_gpu or full:
        return [("small_cnn", 64, 32), ("vgg16", 224, 4)]
    return [("small_cnn", 64, 32), ("vgg16", 112, 2)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None,
                        help="one backbone (vgg16, vgg19, resnet18, resnet50, small_cnn); "
                             "default: small_cnn, then vgg16")
    parser.add_argument("--image-size", type=int, default=None, help="with --backbone (default 224)")
    parser.add_argument("--batch-size", type=int, default=None, help="with --backbone (default 4)")
    parser.add_argument("--full", action="store_true", help="vgg16 at 224x224 batch 4 on CPU too (slow)")
    parser.add_argument("--gpu", action="store_true",
                        help=f"issue 12 item 5: {GPU_CONFIG[0]} {GPU_CONFIG[1]}x{GPU_CONFIG[1]} batch {GPU_CONFIG[2]}, "
                             f"union and per-label, no one-image loop, images/s against the {GOAL:g}x goal "
                             "(--backbone, --image-size, --batch-size override it)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads on CPU (default: every core, %(default)s here)")
    parser.add_argument("--torch-device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--no-batch-one-loop", action="store_true",
                        help="skip the one-image-at-a-time comparison")
    parser.add_argument("--default-step", action="store_true",
                        help="only the default GAIN step (union) of small_cnn 64x64 batch 32 (or --backbone ...), "
                             "JAX and torch steps alternating, --runs runs: steps/s of each and the ratio, best run")
    parser.add_argument("--runs", type=int, default=3, help="with --default-step: runs in this process")
    args = parser.parse_args(argv)
    for flag in ("steps", "torch_threads", "runs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1 (the first JAX step compiles), got {args.warmup}")

    torch_device = torch.device(args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.torch_threads)
    jax_device = jax.devices()[0]
    on_gpu = jax_device.platform == "gpu" or torch_device.type == "cuda"
    if args.default_step and (args.gpu or args.full):
        parser.error("--default-step takes neither --gpu nor --full")
    if args.default_step:
        configs = [(args.backbone or "small_cnn", args.image_size or 64, args.batch_size or 32)]
    elif args.gpu:
        configs = [(args.backbone or GPU_CONFIG[0], args.image_size or GPU_CONFIG[1],
                    args.batch_size or GPU_CONFIG[2])]
        args.no_batch_one_loop = True
        if jax_device.platform != "gpu" or torch_device.type != "cuda":
            print(f"WARNING: --gpu without a GPU for both sides (JAX on {jax_device.platform}, torch on "
                  f"{torch_device.type}): these are not GPU figures\n")
    elif args.backbone:
        configs = [(args.backbone, args.image_size or 224, args.batch_size or 4)]
    else:
        if args.image_size or args.batch_size:
            parser.error("--image-size and --batch-size go with --backbone")
        configs = default_configs(on_gpu, args.full)

    print(f"machine: {platform.node()}, {os.cpu_count()} cores ({cpu_model()}), "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"JAX {jax.__version__} on {jax_device.platform} ({jax_device.device_kind}); "
          f"torch {torch.__version__} on {torch_device_name(torch_device)}")
    print(f"median of {args.steps} steps after {args.warmup} warm-up steps; Adam lr {LEARNING_RATE}, dropout "
          f"{DROPOUT}, {NUM_CLASSES} classes, float32\n", flush=True)

    if args.default_step:
        (backbone, size, batch_size), = configs
        print(f"{backbone} {size}x{size} batch {batch_size}, default GAIN step, {args.runs} runs:", flush=True)
        runs = default_step_runs(backbone, size, batch_size, args.steps, args.warmup, args.runs, torch_device)
        print_default_step(backbone, size, batch_size, runs)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        check_no_tensorflow()
        return

    results = []
    for backbone, size, batch_size in configs:
        print(f"{backbone} {size}x{size} batch {batch_size}:", flush=True)
        rows, loop_rows, logit_difference = bench_config(backbone, size, batch_size, args.steps, args.warmup,
                                                         torch_device, not args.no_batch_one_loop)
        results.append((backbone, size, batch_size, rows, loop_rows, logit_difference))

    print("\nGAIN train step (forward, losses, backward, Adam), same inputs and initial weights; "
          "ratio = torch / JAX = JAX images/s / torch images/s (> 1: JAX faster)")
    print("memory, MiB: JAX XLA = compiled step's arguments + outputs + temp - aliased; JAX peak = device peak "
          "bytes in use, process so far (GPU); torch peak = torch.cuda.max_memory_allocated over the case")
    goal_header = f"{f'>={GOAL:g}x':>7}" if args.gpu else ""
    print(f"{'backbone':<10}{'input':>9}{'batch':>6}  {'case':<22}{'JAX ms':>10}{'torch ms':>10}{'JAX img/s':>11}"
          f"{'torch img/s':>12}{'ratio':>7}{goal_header}{'JAX XLA':>9}{'JAX peak':>10}{'torch peak':>12}")
    for backbone, size, batch_size, rows, _, _ in results:
        for row in rows:
            goal = f"{'yes' if row.ratio >= GOAL else 'NO':>7}" if args.gpu else ""
            print(f"{backbone:<10}{f'{size}x{size}':>9}{batch_size:>6}  {row.case:<22}{row.jax_ms:>10.1f}"
                  f"{row.torch_ms:>10.1f}{row.jax_images_per_s:>11.1f}{row.torch_images_per_s:>12.1f}"
                  f"{row.ratio:>7.2f}{goal}{mib(row.jax_xla_bytes):>9}{mib(row.jax_peak_bytes):>10}"
                  f"{mib(row.torch_peak_bytes):>12}")

    if any(loop_rows for *_, loop_rows, _ in results):
        print("\nper-label mode, B images: one batched JAX step against one image at a time (batch 1, B Adam steps; "
              "the original's way)\nspeed-up = time of the loop / time of the batched JAX step")
        print(f"{'backbone':<10}{'input':>9}{'B':>4}{'labels':>7}{'JAX batch B':>13}{'JAX b1 xB':>11}"
              f"{'torch b1 xB':>13}{'vs JAX b1':>11}{'vs torch b1':>13}")
        for backbone, size, batch_size, _, loop_rows, _ in results:
            for num_labels, batched, jax_loop, torch_loop in loop_rows:
                print(f"{backbone:<10}{f'{size}x{size}':>9}{batch_size:>4}{num_labels:>7}{batched:>10.1f} ms"
                      f"{jax_loop:>8.1f} ms{torch_loop:>10.1f} ms{jax_loop / batched:>10.2f}x"
                      f"{torch_loop / batched:>12.2f}x")

    print("\nstart weights check (max |logit difference|, evaluation mode): " + ", ".join(
        f"{backbone} {diff:.1e}" for backbone, _, _, _, _, diff in results))
    print(f"load average {os.getloadavg()[0]:.1f} at the end (a shared machine inflates both sides alike only "
          f"roughly: compare ratios, not absolute times)")
    if args.gpu and not (jax_device.platform == "gpu" and torch_device.type == "cuda"):
        print("(--gpu ran without a GPU for both sides: not GPU figures)")
    check_no_tensorflow()


def check_no_tensorflow() -> None:
    tensorflow = sorted(name for name in sys.modules if name == "tensorflow" or name.startswith("tensorflow."))
    if tensorflow:
        raise SystemExit(f"TensorFlow was imported ({', '.join(tensorflow[:5])}): this benchmark must run without it")
    print("TensorFlow imported: no")


if __name__ == "__main__":
    main()
