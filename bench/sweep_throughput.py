"""Wall time of N seeds of `python train.py`'s default configuration, three ways (issue 22, item 2):

- sequential: N `train.py --seed k` processes one after another (today's way; also gives one seed's time);
- sweep: one `train.py --seeds 0,...,N-1` process (`--sweep_strategy` unrolled, and vmap with `--ways`);
- concurrent: N `train.py --seed k` processes at once, each single-threaded: pinned to one core
  (`taskset -c`, core k mod the cores this process may use; XLA:CPU sizes its thread pool from the
  affinity mask, `sched_getaffinity`) and `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false` (a flag jaxlib 0.10.2
  knows; TensorFlow's `intra_op_parallelism_threads` is no XLA flag: XLA_FLAGS ignores it).

    python bench/sweep_throughput.py                     # the figure owed: 5 seeds of the whole default run
    python bench/sweep_throughput.py --seeds 2 --train_args "--steps_per_epoch 20 --epochs 1 --pretrain_epochs 0 \
        --eval_examples 32"                              # a smoke run (minutes)

Printed: per way the wall time of all N seeds, its ratio to one seed (the median wall time of the sequential
runs; issue 22's target: 5 seeds in at most 2.5x one seed), the speed-up over sequential, the CPU seconds
(user + system of the children) and, per seed, the final validation_unbiased mAP (the ways train the same runs:
equal to float32 rounding for the sweep, the run's own numerics for single-threaded XLA). Every way's processes
write under one temporary --logdir; the report is also written to --out (default: bench/results/).
Starts train.py processes (TensorFlow, JAX); the sequential way alone takes N default runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAYS = ("sequential", "sweep_unrolled", "sweep_vmap", "concurrent")
SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false"


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_command(args, logdir: str, run_name: str, seed_flags: list[str]) -> list[str]:
    return ([sys.executable, os.path.join(ROOT, "train.py"), "--logdir", logdir, "--run_name", run_name]
            + seed_flags + shlex.split(args.train_args))


def start(command: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_all(processes: list[tuple[subprocess.Popen, str]]) -> None:
    """Wait for every process; exit with the log's tail when one failed."""
    for process, log_path in processes:
        if process.wait() != 0:
            with open(log_path) as log:
                tail = log.read()[-2000:]
            raise SystemExit(f"sweep_throughput: {shlex.join(process.args)} exited {process.returncode}:\n{tail}")


def final_map(run_dir: str) -> float:
    with open(os.path.join(run_dir, "metrics.json")) as handle:
        return json.load(handle)["final"]["validation_unbiased"]["mAP"]


def run_way(way: str, args, seeds: list[int], logdir: str) -> dict:
    """Train the N seeds `way`'s way: {"wall": s, "cpu": s, "runs": [wall of each sequential run], "mAP": [...]}."""
    folder = os.path.join(logdir, way)
    os.makedirs(folder)
    cpu_before, started, run_walls = children_cpu_seconds(), time.perf_counter(), []
    if way == "sequential":
        for seed in seeds:
            run_started = time.perf_counter()
            command = train_command(args, folder, f"s_seed{seed}", ["--seed", str(seed)])
            log_path = os.path.join(folder, f"seed{seed}.log")
            wait_all([(start(command, log_path), log_path)])
            run_walls.append(time.perf_counter() - run_started)
    elif way.startswith("sweep_"):
        command = train_command(args, folder, "s", ["--seeds", ",".join(map(str, seeds)),
                                                    "--sweep_strategy", way.removeprefix("sweep_")])
        log_path = os.path.join(folder, "sweep.log")
        wait_all([(start(command, log_path), log_path)])
    else:
        cores = sorted(os.sched_getaffinity(0))
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAGS}".strip()}
        pin = shutil.which("taskset")
        processes = []
        for index, seed in enumerate(seeds):
            command = train_command(args, folder, f"s_seed{seed}", ["--seed", str(seed)])
            if pin:
                command = [pin, "-c", str(cores[index % len(cores)])] + command
            log_path = os.path.join(folder, f"seed{seed}.log")
            processes.append((start(command, log_path, env), log_path))
        wait_all(processes)
    wall = time.perf_counter() - started
    return {"wall": wall, "cpu": children_cpu_seconds() - cpu_before, "runs": run_walls,
            "mAP": [final_map(os.path.join(folder, f"s_seed{seed}")) for seed in seeds]}


def report(args, seeds: list[int], results: dict, load_before: float) -> list[str]:
    one_seed = statistics.median(results["sequential"]["runs"])
    runs = ", ".join(f"{wall:.1f}" for wall in results["sequential"]["runs"])
    lines = [f"sweep throughput: {len(seeds)} seeds of: python train.py {args.train_args}".rstrip(),
             f"{platform.node()}, {len(os.sched_getaffinity(0))} usable cores, Python {platform.python_version()}, "
             f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}",
             f"one seed (median of the sequential runs: {runs} s): {one_seed:.1f} s", "",
             f"{'way':<16}{'wall s':>9}{'x one seed':>12}{'speed-up':>10}{'CPU s':>9}"
             "  validation_unbiased mAP per seed"]
    sequential = results["sequential"]["wall"]
    for way, result in results.items():
        maps = " ".join(f"{value:.4f}" for value in result["mAP"])
        lines.append(f"{way:<16}{result['wall']:>9.1f}{result['wall'] / one_seed:>12.2f}"
                     f"{sequential / result['wall']:>10.2f}{result['cpu']:>9.1f}  {maps}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="N: seeds 0..N-1 (default 5)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}; "
                        "sequential always runs (it gives one seed's time)")
    parser.add_argument("--train_args", default="", help="more train.py flags for every run, e.g. a shorter run")
    parser.add_argument("--out", default=None, help="report file (default bench/results/<date>_sweep_throughput_"
                        "<N>seeds.txt)")
    args = parser.parse_args(argv)
    ways = ["sequential"] + [way for way in args.ways.split(",") if way != "sequential"]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown or args.seeds < 1:
        parser.error(f"unknown ways {unknown}" if unknown else "--seeds must be >= 1")
    seeds = list(range(args.seeds))
    results, load_before = {}, os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sweep_throughput_") as logdir:
        for way in ways:
            print(f"  {way} ...", flush=True)
            results[way] = run_way(way, args, seeds, logdir)
            print(f"  {way}: {results[way]['wall']:.1f} s", flush=True)
    lines = report(args, seeds, results, load_before)
    print("\n".join(lines), flush=True)
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   f"{time.strftime('%Y-%m-%d')}_sweep_throughput_{args.seeds}seeds.txt")
    with open(out, "w") as handle:
        handle.write(f"$ python bench/sweep_throughput.py {shlex.join(argv if argv is not None else sys.argv[1:])}\n")
        handle.write("\n".join(lines) + "\n")
    print(f"written to {os.path.relpath(out, ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
