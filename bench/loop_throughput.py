"""Train-loop throughput: steps per second of the former loop (every step's metrics read back to the host,
top-k accuracy computed there, no transfer ahead) against gain_jax.train_loop's (metrics stay on the device
and are read back every --log_every steps, the next batch is transferred while a step runs).

    python bench/loop_throughput.py                      # small_cnn, 64x64, batch 32, 60 steps, 2 repeats
    python bench/loop_throughput.py --backbone resnet18 --steps 30

Every loop trains the same program on the same batches from the same initial state (GAIN with attention
mining on) in this one process; the first step (compilation) is not timed. The new loop runs inside
`train_and_evaluate` (one epoch; its evaluation is one batch and not timed): the figure is the epoch
record's `steps_per_second`.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np

import gain_jax as gj
from gain_jax import metrics, train_loop
from gain_jax.config import Config, DataConfig, EvalConfig, LogConfig, TrainConfig


def bench_config(args, logdir: str, run_name: str, log_every: int) -> Config:
    return Config(
        gain=gj.GainConfig(),  # upstream's GAIN, as measured in bench/README.md (train.py's default is GAIN_ext)
        data=DataConfig(data_dir=args.data_dir, image_size=args.image_size),
        train=TrainConfig(backbone=args.backbone, batch_size=args.batch_size, epochs=1, steps_per_epoch=args.steps,
                          pretrain_epochs=0),
        eval=EvalConfig(eval_examples=args.batch_size),
        log=LogConfig(logdir=logdir, run_name=run_name, num_heatmaps=0, log_every=log_every)).validate()


def former_loop(config: Config, workdir: str) -> tuple[float, list[float]]:
    """train.py's loop before the library, step by step as it was: a host->device transfer, the step, four
    float() reads, top-k accuracy on the host from the logits, TensorBoard scalars and the progress bar's
    epoch means. Returns (steps per second after the first, losses)."""
    from tqdm import tqdm

    run = train_loop.create_run(config, workdir)
    state, dropout_key = train_loop.create_train_state(run)
    train_step = gj.make_train_step(run.model, run.config.gain)
    writer = train_loop.open_summary_writer(run)
    batches = train_loop.train_batches(run, epoch=0)  # the same batches as the library's first epoch
    attention_on = np.float32(1.0)
    records, timed_from = [], None
    sink = open(os.devnull, "w")  # the bar is drawn, as on a terminal, but not shown
    progress = tqdm(total=config.train.steps_per_epoch, file=sink)
    for step in range(config.train.steps_per_epoch):
        batch = next(batches)
        rng = jax.random.fold_in(dropout_key, step)
        state, step_metrics = train_step(state, train_loop.batch_to_device(run.placement, batch), rng, attention_on)
        record = {key: float(step_metrics[key]) for key in train_loop.LOSS_KEYS}
        if not math.isfinite(record["loss"]):
            raise SystemExit(f"loss is {record['loss']} at step {step + 1}")
        record["topk_accuracy"] = metrics.topk_accuracy(np.asarray(step_metrics["logits"]), batch["labels"])
        records.append(record)
        train_loop.log_scalars(writer, "train", record, step + 1)
        progress.update(1)
        progress.set_postfix({key: f"{np.mean([r[key] for r in records]):.4f}" for key in ("loss", "cl", "am")})
        if timed_from is None:
            timed_from = time.time()
    elapsed = time.time() - timed_from
    progress.close()
    sink.close()
    writer.flush()
    return (config.train.steps_per_epoch - 1) / elapsed, [record["loss"] for record in records]


def library_loop(config: Config) -> tuple[float, list[float]]:
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        _, history = train_loop.train_and_evaluate(config)
    return history["epochs"][0]["steps_per_second"], [record["loss"] for record in history["steps"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="train steps per loop (the first is not timed)")
    parser.add_argument("--log_every", type=int, default=10, help="the new loop's read-back interval")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all loops, interleaved")
    parser.add_argument("--data_dir", default=None, help="tfds data dir; default: tfds' default")
    args = parser.parse_args(argv)

    print(f"loop throughput: {args.backbone}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{args.steps} steps (first not timed), GAIN with attention mining; {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s) ({jax.devices()[0].device_kind}), {os.cpu_count()} CPU cores",
          flush=True)
    loops = {"former (per step: read back, host top-k, TensorBoard)": None,
             "library, log_every=1": 1,
             f"library, log_every={args.log_every}": args.log_every}
    rates: dict[str, list[float]] = {name: [] for name in loops}
    losses = {}
    with tempfile.TemporaryDirectory() as logdir:
        for repeat in range(args.repeats):
            for index, (name, log_every) in enumerate(loops.items()):
                run_name = f"r{repeat}_{index}"
                config = bench_config(args, logdir, run_name, log_every or 1)
                if log_every is None:
                    rate, losses[name] = former_loop(config, os.path.join(logdir, run_name))
                else:
                    rate, losses[name] = library_loop(config)
                rates[name].append(rate)
                print(f"  round {repeat + 1}: {name}: {rate:.2f} steps/s", flush=True)
    print(f"\n{'loop':<55}{'steps/s (median)':>18}{'all rounds':>24}")
    for name, values in rates.items():
        print(f"{name:<55}{np.median(values):>18.2f}{', '.join(f'{v:.2f}' for v in values):>24}")
    baseline = np.median(rates[next(iter(loops))])
    for name in list(loops)[1:]:
        print(f"{name}: {np.median(rates[name]) / baseline:.2f}x the former loop")
    differences = [np.max(np.abs(np.asarray(values) - np.asarray(losses[next(iter(loops))])))
                   for values in losses.values()]
    print(f"max |loss difference| between the loops: {max(differences):.2e} (same batches, keys and state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
