"""XLA:CPU flag sets against the default: the GAIN train step and a plain classification step under each
XLA_FLAGS set, next to the PyTorch reference step (gain_torch_ref) on the same weights and batch (issue 12,
item 4: torch/JAX >= 1.6 at vgg16 96x96 batch 4, union).

    python bench/xla_flags.py                          # vgg16 96x96 b4 and small_cnn 64x64 b32, the default sets
    python bench/xla_flags.py --list-sets              # the known sets and their flags
    python bench/xla_flags.py --sets no_ynn onednn_dot --configs vgg16:96:4 --steps 10
    python bench/xla_flags.py --sets default --flags 'vec512=--xla_cpu_prefer_vector_width=512'
    python bench/xla_flags.py --configs small_cnn:32:2 --sets default --steps 1 --warmup 1   # smoke run

XLA reads XLA_FLAGS once per process, so every (flag set, configuration) runs in a fresh child process of this
script (`--child`) with XLA_FLAGS set to exactly that set's flags (an XLA_FLAGS of the calling shell is not
passed on). The child builds the JAX model from the torch model's initial state dict (`gain_jax.from_torchvision`,
as bench/step_time.py), takes the same images and labels (2 per image, 20 classes; written by the parent to a
temporary .npz), compiles the default union GAIN train step (`GainConfig(mode="union", max_labels=4)`, attention
mining on; the step step_time.py times) and the plain BCE + Adam step of bench/gain_overhead.py, runs each once
(its loss: the first step's, from the initial weights), then `--warmup` untimed and `--steps` timed steps (median
reported). The parent times the reference step (torch, same weights, images and labels) before and after the
children of a configuration and shows the mean of the two medians.

Columns: `GAIN ms` / `cls ms` the JAX steps; `torch ms` the reference step; `torch/JAX` = torch ms / GAIN ms
(> 1: JAX faster; `goal` whether it reaches issue 12's 1.6); `vs default` = the default set's GAIN ms / this
set's (> 1: the flags help); `loss rel diff` the largest relative difference of the set's first-step losses
(GAIN and cls) from the default set's, "DIFFERS" beyond `ROUNDOFF_RTOL` (float32 roundoff of a reordered
sum is far below it; a different algorithm or fast math may not be); `library calls` the GAIN step's compiled
HLO: fusions and custom calls handed to YNNPACK (`ynn`), XNNPACK (`xnn`) or oneDNN (`onednn`), which shows
whether a flag changed anything at all; `compile s` the GAIN step's compilation. A set that XLA rejects (an
unknown flag or an illegal value aborts the process) or that crashes is one line with its reason; the run goes
on, and exits non-zero only if the default set fails.

Imports torch and torchvision (the parent) and JAX, flax, optax (the children), never TensorFlow.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GOAL = 1.6             # issue 12, item 4: torch ms / JAX ms at vgg16 96x96 batch 4, union
ROUNDOFF_RTOL = 1e-4   # first-step loss, relative to the default set's: beyond this the flags changed the math
UNION_LABELS = 2       # labels per image, as step_time.py's union case
RESULT_MARK = "XLA_FLAGS_RESULT "
DEFAULT_CONFIGS = ("vgg16:96:4", "small_cnn:64:32")

_NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
# What jaxlib 0.10.2 does by default: dots and convolutions go to YNNPACK (`__ynn_fusion`, fusion types
# individual_dot and individual_convolution); elementwise and reduction fusions are XLA's own LLVM code. The
# repeated-enum flags take a comma list of LIBRARY_FUSION_TYPE_* names without the prefix (dot, eltwise, reduce,
# individual_dot, individual_convolution; case-insensitive): plain names replace the default list, "+name" /
# "-name" edit it, an empty value clears it.
FLAG_SETS = {
    "default": "",
    "no_ynn": _NO_YNN,                                      # XLA's own dot/conv emitters (Eigen) throughout
    "ynn_conv_only": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    "ynn_dot_only": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "ynn_fused": "--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise,+reduce",  # dots with their epilogues
    "onednn_dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "onednn_no_ynn": f"{_NO_YNN} --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise"
                     " --xla_cpu_experimental_onednn_custom_call=true",
    "xnn_no_ynn": f"{_NO_YNN} --xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"
                  " --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "fast_runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "sched_memory": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "sched_concurrency": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "vector512": "--xla_cpu_prefer_vector_width=512",
    "no_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
    "tiling_propagation": "--xla_cpu_experimental_enable_tiling_propagation=true",
    # known, not run unless named: no effect expected or clearly slower
    "thunk_runtime_off": "--xla_cpu_use_thunk_runtime=false",  # deprecated: accepted, logged, ignored
    "single_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "strict_dot_conv_math": "--xla_cpu_strict_dot_conv_math=true",
    "max_isa_avx2": "--xla_cpu_max_isa=AVX2",
}
DEFAULT_SETS = ("default", "no_ynn", "ynn_conv_only", "ynn_dot_only", "ynn_fused", "onednn_dot", "onednn_no_ynn",
                "xnn_no_ynn", "fast_math", "fast_runtime", "sched_memory", "sched_concurrency", "vector512",
                "no_fusion_emitters", "tiling_propagation")
LIBRARIES = ("ynn", "xnn", "onednn")


def library_calls(hlo_text: str) -> dict:
    """How many fusions and custom calls of the compiled HLO each library (ynn, xnn, onednn) runs."""
    counts = {}
    for library in LIBRARIES:
        fusions = len(re.findall(rf'"kind":"__{library}_fusion"', hlo_text))
        calls = len(re.findall(rf'custom_call_target="[^"]*{library}[^"]*"', hlo_text, re.IGNORECASE))
        if fusions + calls:
            counts[library] = fusions + calls
    return counts


# ---------------------------------------------------------------------------------------------- child (JAX)

def child(spec: dict) -> None:
    """One flag set, one configuration, in this fresh process: prints RESULT_MARK + JSON as its last line."""
    import jax  # here, not at the top: the parent never initializes JAX, the child never imports torch
    import jax.numpy as jnp
    import optax

    import gain_jax as gj
    from bench.gain_overhead import compile_step, make_classification_step, time_steps

    data = np.load(spec["data"])
    state_dict = {key[len("state/"):]: data[key] for key in data.files if key.startswith("state/")}
    backbone = spec["backbone"]
    model = gj.build_model(backbone, spec["num_classes"], dropout_rate=spec["dropout"])
    variables = gj.from_torchvision(backbone, state_dict, spec["num_classes"])
    tx = optax.adam(spec["learning_rate"])
    batch = {"image": jnp.asarray(data["images"]), "labels": jnp.asarray(data["labels"])}
    key0, attention_on = jax.random.PRNGKey(0), (jnp.float32(1.0),)

    def fresh_state():
        return gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), tx)

    def measure(jitted, extra_args):
        state = fresh_state()
        start = time.perf_counter()
        compiled, _ = compile_step(jitted, state, batch, key0, *extra_args)
        compile_seconds = time.perf_counter() - start
        state, out = compiled(state, batch, key0, *extra_args)  # the first step: its loss, from the initial weights
        loss = float(out["loss"] if isinstance(out, dict) else out)
        seconds, _ = time_steps(compiled, state, batch, spec["steps"], spec["warmup"], extra_args=extra_args)
        return seconds, loss, compile_seconds, compiled

    gain_cfg = gj.GainConfig(mode="union", max_labels=4)  # step_time.py's union case
    gain_s, gain_loss, gain_compile_s, compiled = measure(gj.make_train_step(model, gain_cfg), attention_on)
    calls = library_calls(compiled.as_text())
    del compiled
    cls_s, cls_loss, _, _ = measure(make_classification_step(model), ())
    print(RESULT_MARK + json.dumps(dict(gain_ms=gain_s * 1e3, cls_ms=cls_s * 1e3, gain_loss=gain_loss,
                                        cls_loss=cls_loss, compile_s=gain_compile_s, library_calls=calls,
                                        jax_version=jax.__version__, device=jax.devices()[0].device_kind)),
          flush=True)


# ---------------------------------------------------------------------------------------------- parent

@dataclasses.dataclass
class Result:
    name: str
    flags: str
    values: dict | None = None  # the child's JSON
    failure: str | None = None  # why there are no values


def failure_reason(returncode: int, stdout: str, stderr: str) -> str:
    """One line: how the child ended and XLA's own complaint where it gave one."""
    how = (f"killed by {signal.Signals(-returncode).name}" if returncode < 0 and -returncode in signal.valid_signals()
           else f"exit {returncode}")
    lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    telling = [line for line in lines if re.search(r"Unknown flag|Illegal value|Check failed|Error|error:", line)]
    detail = re.sub(r"^[FEWI]\d{4} [\d:.]+\s+\d+ \S+\] ", "", (telling or lines or ["no output"])[0])  # glog prefix
    return f"{how}: {detail[:300]}"


def run_child(spec: dict, flags: str, timeout: float) -> tuple[dict | None, str | None]:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    try:
        result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"no result within {timeout:.0f} s (--child-timeout)"
    marked = [line for line in result.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if result.returncode != 0 or not marked:
        return None, failure_reason(result.returncode, result.stdout, result.stderr)
    return json.loads(marked[-1][len(RESULT_MARK):]), None


def parse_config(text: str) -> tuple[str, int, int]:
    try:
        backbone, size, batch = text.split(":")
        return backbone, int(size), int(batch)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BACKBONE:SIZE:BATCH (e.g. vgg16:96:4), got {text!r}") from None


def parse_named_flags(text: str) -> tuple[str, str]:
    name, separator, flags = text.partition("=")
    if not separator or not name or not flags.strip().startswith("--"):
        raise argparse.ArgumentTypeError(f"expected NAME='--xla_flag=value ...', got {text!r}")
    return name, flags.strip()


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-30)


def format_calls(calls: dict) -> str:
    return " ".join(f"{library} {count}" for library, count in sorted(calls.items())) or "-"


def prepare(config: tuple[str, int, int], data_path: str, steps: int, warmup: int):
    """Writes the torch model's initial state dict, the images and the labels of `config` to `data_path`
    (for the children); returns the children's spec and a function timing the reference step (ms)."""
    # torch and torchvision before anything that might pull in TensorFlow (nothing here does)
    import torch
    import torchvision  # noqa: F401

    import gain_torch_ref as ref
    from bench.gain_overhead import labels_with
    from bench.step_time import DROPOUT, LEARNING_RATE, NUM_CLASSES, fresh_torch, median_seconds, torch_step_fn

    backbone, size, batch_size = config
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = ref.build_model(backbone, NUM_CLASSES, dropout=DROPOUT)
    initial_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    images = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
    labels = labels_with(UNION_LABELS, batch_size, NUM_CLASSES, rng)
    np.savez(data_path, images=images, labels=labels,
             **{f"state/{key}": value.numpy() for key, value in initial_state.items()})
    images_torch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    labels_torch = torch.from_numpy(labels)
    ref_cfg = ref.RefConfig(mode="union", max_labels=4)
    cpu = torch.device("cpu")

    def time_torch() -> float:
        model, optimizer = fresh_torch(initial_state, backbone, cpu)
        return 1e3 * median_seconds(torch_step_fn(model, optimizer, images_torch, labels_torch, ref_cfg), steps,
                                    warmup, cpu)

    # the children import neither torch nor step_time.py: its constants travel in the spec
    spec = dict(backbone=backbone, steps=steps, warmup=warmup, data=data_path, num_classes=NUM_CLASSES,
                dropout=DROPOUT, learning_rate=LEARNING_RATE)
    return spec, time_torch


def main(argv=None):
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=parse_config, default=[parse_config(c) for c in DEFAULT_CONFIGS],
                        metavar="BACKBONE:SIZE:BATCH", help=f"default: {' '.join(DEFAULT_CONFIGS)}")
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), metavar="NAME",
                        help="known flag sets to run (--list-sets); 'default' always runs, first")
    parser.add_argument("--flags", nargs="+", type=parse_named_flags, default=[], metavar="NAME='--xla_...'",
                        help="extra sets: a name and its XLA_FLAGS, run after --sets")
    parser.add_argument("--list-sets", action="store_true", help="print the known sets and exit")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per step function (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (after the first, loss, step)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: every core, %(default)s here)")
    parser.add_argument("--child-timeout", type=float, default=1800, help="seconds per child process")
    args = parser.parse_args(argv)
    if args.list_sets:
        for name, flags in FLAG_SETS.items():
            print(f"{name:<22}{'[runs by default] ' if name in DEFAULT_SETS else ''}{flags or '(no flags)'}")
        return
    unknown = [name for name in args.sets if name not in FLAG_SETS]
    if unknown:
        parser.error(f"unknown set(s) {', '.join(unknown)}; known: {', '.join(FLAG_SETS)} (or use --flags)")
    for flag in ("steps", "warmup", "torch_threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    sets = [("default", "")] + [(name, FLAG_SETS[name]) for name in dict.fromkeys(args.sets) if name != "default"]
    sets += args.flags
    if len({name for name, _ in sets}) != len(sets):
        parser.error("set names must be unique")

    import torch

    from bench.step_time import cpu_model

    torch.set_num_threads(args.torch_threads)
    print(f"machine: {os.cpu_count()} cores ({cpu_model()}), load average {os.getloadavg()[0]:.1f} at start")
    if os.environ.get("XLA_FLAGS"):
        print(f"(XLA_FLAGS of this shell, {os.environ['XLA_FLAGS']!r}, is not passed to the children)")
    print(f"torch {torch.__version__}, torch.set_num_threads({torch.get_num_threads()}); median of {args.steps} "
          f"steps after {args.warmup} warm-up steps; union, {UNION_LABELS} labels per image, float32\n", flush=True)

    results, torch_ms, jax_version = {}, {}, None
    with tempfile.TemporaryDirectory(prefix="xla_flags_") as scratch:
        for config in args.configs:
            backbone, size, batch_size = config
            spec, time_torch = prepare(config, os.path.join(scratch, f"{backbone}_{size}_{batch_size}.npz"),
                                       args.steps, args.warmup)
            print(f"{backbone} {size}x{size} batch {batch_size}:", flush=True)
            before = time_torch()
            print(f"  torch: {before:.1f} ms", flush=True)
            for name, flags in sets:
                values, failure = run_child(spec, flags, args.child_timeout)
                results[config, name] = Result(name, flags, values, failure)
                if values:
                    jax_version = jax_version or values["jax_version"]
                    print(f"  {name}: GAIN {values['gain_ms']:.1f} ms, cls {values['cls_ms']:.1f} ms", flush=True)
                else:
                    print(f"  {name}: FAILED ({failure})", flush=True)
            after = time_torch()
            print(f"  torch again: {after:.1f} ms", flush=True)
            torch_ms[config] = (before + after) / 2

    print(f"\nJAX {jax_version or '(no child reported)'} on the CPU; torch/JAX = torch ms / GAIN ms (> 1: JAX faster; "
          f"goal {GOAL:g} at vgg16 96x96 b4); vs default = default GAIN ms / set GAIN ms (> 1: faster than default)")
    print(f"{'config':<20}{'set':<22}{'GAIN ms':>9}{'cls ms':>9}{'GAIN/cls':>9}{'torch ms':>10}{'torch/JAX':>10}"
          f"{'goal':>5}{'vs default':>11}{'loss rel diff':>15}  {'library calls':<22}{'compile s':>9}")
    default_failed = False
    for config in args.configs:
        backbone, size, batch_size = config
        label = f"{backbone} {size}x{size} b{batch_size}"
        reference = results[config, "default"].values
        default_failed |= reference is None
        for name, _ in sets:
            result = results[config, name]
            if result.values is None:
                print(f"{label:<20}{name:<22}FAILED: {result.failure}")
                continue
            v = result.values
            ratio = torch_ms[config] / v["gain_ms"]
            if reference is None:
                versus, loss_note = "n/a", "n/a"
            else:
                versus = f"{reference['gain_ms'] / v['gain_ms']:.2f}"
                difference = max(relative_difference(v["gain_loss"], reference["gain_loss"]),
                                 relative_difference(v["cls_loss"], reference["cls_loss"]))
                loss_note = f"{difference:.1e}{' DIFFERS' if difference > ROUNDOFF_RTOL else ''}"
            print(f"{label:<20}{name:<22}{v['gain_ms']:>9.1f}{v['cls_ms']:>9.1f}{v['gain_ms'] / v['cls_ms']:>9.2f}"
                  f"{torch_ms[config]:>10.1f}{ratio:>10.2f}{'yes' if ratio >= GOAL else 'no':>5}{versus:>11}"
                  f"{loss_note:>15}  {format_calls(v['library_calls']):<22}{v['compile_s']:>9.1f}")
    print("\nsets:")
    for name, flags in sets:
        print(f"  {name:<22}XLA_FLAGS={shlex.quote(flags)}")
    print(f"loss rel diff: first-step losses (GAIN, cls) relative to the default set's, DIFFERS beyond "
          f"{ROUNDOFF_RTOL:g}; library calls: fusions/custom calls of the compiled GAIN step run by YNNPACK, "
          "XNNPACK, oneDNN")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    tensorflow = sorted(name for name in sys.modules if name == "tensorflow" or name.startswith("tensorflow."))
    if tensorflow:
        raise SystemExit(f"TensorFlow was imported ({', '.join(tensorflow[:5])}): this benchmark must run without it")
    if default_failed:
        raise SystemExit("the default set failed (see above)")


if __name__ == "__main__":
    main()
