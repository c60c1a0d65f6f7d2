"""Where the default GAIN step (union) of small_cnn 64x64 b32 spends its time on XLA:CPU: a jax.profiler trace of
5 steps, each op's time joined with its instruction in the compiled program, grouped by kind (YNNPACK
convolutions, dots and reductions, Eigen convolutions, transposes, XLA's own elementwise loops), then the top ops.

    python bench/profiles/small_cnn_union_cpu/trace_step.py [--top 30]

Run from the repository root. Op times are summed over both threads and include the time an op waited for a
core, so on a loaded machine they are inflated; read shares, not milliseconds. Also prints the process's CPU
time per step (all threads) beside the wall time.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import profile_common as common

common.add_repository_paths()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gain_jax as gj  # noqa: E402

STEPS = 5


def entry_instructions(hlo: str) -> dict:
    """{instruction name: its definition} of the program's entry computation."""
    found = {}
    for line in hlo.split("ENTRY", 1)[1].splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def kind_of(name: str, definition: str, computations: dict) -> str:
    if "__ynn_fusion" in definition:
        body = computations.get(re.search(r"calls=%([\w.\-]+)", definition).group(1), "")
        return "YNNPACK convolution" if " convolution(" in body else "YNNPACK dot" if " dot(" in body \
            else "YNNPACK reduction"
    if " convolution(" in definition:
        return "Eigen convolution"
    return "transpose" if name.startswith("transpose") else "XLA elementwise/other"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=30, help="ops listed one by one")
    args = parser.parse_args()
    setup = common.small_cnn_setup()
    labels = np.zeros((32, 20), np.float32)
    for row in labels:
        row[setup.rng.choice(20, 2, replace=False)] = 1.0
    batch = {"image": setup.images, "labels": jnp.asarray(labels)}
    state = setup.fresh()
    compiled = gj.make_train_step(setup.model, gj.GainConfig()).lower(state, batch, setup.key0, setup.on).compile()
    for _ in range(3):
        state, metrics = compiled(state, batch, setup.key0, setup.on)
        jax.block_until_ready(metrics)
    directory = os.path.join(common.OUT, "small_cnn_union_trace")
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(STEPS):
            state, metrics = compiled(state, batch, setup.key0, setup.on)
            jax.block_until_ready(metrics)
    wall = (time.perf_counter() - wall_start) / STEPS * 1e3
    cpu = (time.process_time() - cpu_start) / STEPS * 1e3
    totals, _ = common.aggregate_trace(directory, strip_suffix=False)
    hlo = compiled.as_text()
    computations = {m.group(1): m.group(0) for m in re.finditer(r"^%([\w.\-]+) \(.*?\n}\n", hlo, re.S | re.M)}
    instructions = entry_instructions(hlo)
    groups = collections.Counter()
    for name, micros in totals.items():
        groups[kind_of(name, instructions[name], computations) if name in instructions else "runtime"] += micros
    total = sum(groups.values())
    print(f"load average {os.getloadavg()[0]:.1f}; wall {wall:.1f} ms/step, process CPU {cpu:.1f} ms/step, "
          f"op time {total / STEPS / 1e3:.1f} ms/step")
    for kind, micros in groups.most_common():
        print(f"  {kind:<24}{micros / STEPS / 1e3:8.1f} ms {100 * micros / total:5.1f}%")
    print("top ops:")
    for name, micros in totals.most_common(args.top):
        definition = re.sub(r"calls=%[\w.]+|, metadata=.*", "", instructions.get(name, "?"))
        print(f"  {micros / STEPS / 1e3:7.2f} ms  {name:<30} {definition[:110]}")


if __name__ == "__main__":
    main()
