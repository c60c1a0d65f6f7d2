#!/usr/bin/env python
"""Train GAIN (Guided Attention Inference Network) with gain_jax.

    python train.py                          # GAIN's mask loss on the embedded gain_shapes set, small_cnn, ~1 min (CPU)
    python train.py --am_weight 0.1          # GAIN_ext: attention mining added (the settings chosen on gain_shapes)
    python train.py --dataset gain_voc2012 --manual_dir ~/VOC --backbone vgg19 --init vgg19-dcbb9e9d.pth \
        --image_size 224 --batch_size 8 --lr 1e-4 --epochs 50 --pretrain_epochs 5
    python train.py --config runs/<run>/config.json --lr 1e-4 --run_name again   # a saved run, one change
    python train.py --seeds 0,1,2,3,4 --run_name five   # 5 seeds in one program: runs/five_seed0 ... five_seed4

The defaults train GAIN_ext's mask loss alone (gain_jax.config.BENCHMARK_GAIN: --ex_weight 1 --am_weight 0, with
--ex_fraction 1 and --epochs 6), the configuration that the validation splits of the embedded benchmark,
gain_shapes 2.0.0, support against the baseline and against adding attention mining (5 seeds, intervals:
experiments/README.md); --am_weight 0.1 adds attention mining with the settings chosen there (--am_batchnorm
batch --score sigmoid). Not upstream's: `--am_weight 1 --am_batchnorm frozen --score softmax --ex_weight 0` gives
upstream's GAIN semantics (those of gain_jax.GainConfig()).
Every flag is listed by `python train.py --help`; the flags are generated from gain_jax.config and the loop is
gain_jax.train_loop.train_and_evaluate. A run writes, under <logdir>/<run_name>/: config.json, metrics.json
(per-step losses, per-epoch evaluations, final results), TensorBoard events, heatmaps/*.png and checkpoints/.
Exit status: 0 done (or stopped by --stop_after), 1 error, 130 interrupted (a checkpoint is saved when
training had started; Ctrl-C during the start-up writes nothing). A first Ctrl-C stops at the next step
boundary after saving, a second one only says so, a third quits at once (never while a checkpoint is
being written).
"""
from __future__ import annotations

import signal
import sys


def _interrupted_while_importing(signum, frame):
    print(f"train.py: interrupted by {signal.Signals(signum).name} while starting, before training: nothing "
          "written", file=sys.stderr, flush=True)
    sys.exit(130)  # stopping.EXIT_STATUS, not imported yet


if __name__ == "__main__":
    # before this file's own imports (a loaded machine can take a second over them): a Ctrl-C there is a clean
    # exit 130 too, until main() installs the loop's handlers
    signal.signal(signal.SIGINT, _interrupted_while_importing)
    signal.signal(signal.SIGTERM, _interrupted_while_importing)

import argparse  # noqa: E402

from gain_jax.train_loop import stopping  # noqa: E402  neither JAX nor TensorFlow: cheap, before everything else

EXIT_ERROR = 1
EXIT_INTERRUPTED = stopping.EXIT_STATUS


def build_parser() -> argparse.ArgumentParser:
    from gain_jax import config as run_config  # imports jax: after main() installs its signal handler

    parser = argparse.ArgumentParser(
        prog="train.py", description="Train GAIN (Guided Attention Inference Network, CVPR 2018) with gain_jax. "
        "The defaults train GAIN_ext's mask loss alone, the configuration chosen on the embedded gain_shapes "
        "benchmark (experiments/README.md); --am_weight 0.1 adds attention mining; --am_weight 1 --am_batchnorm "
        "frozen --score softmax --ex_weight 0 gives upstream's GAIN semantics.")
    group = parser.add_argument_group("run")
    group.add_argument("--config", default=None, metavar="JSON",
                       help="start from a saved run's config.json; flags given on the command line override it")
    group.add_argument("--resume", action="store_true",
                       help="continue the run from its newest checkpoint (same --run_name or --checkpoint_dir); "
                            "losses match an uninterrupted run. An unreadable newest checkpoint (truncated or "
                            "missing files) is reported in one line, moved aside to <step>.corrupt, and the "
                            "newest intact one is restored instead")
    group.add_argument("--stop_after", type=int, default=0,
                       help="save a checkpoint and exit after N train steps of this invocation (time-limited jobs; "
                            "--resume continues); 0 = run to the end (default: 0)")
    run_config.add_flags(parser)
    group = parser.add_argument_group("multi-host (jax.distributed.initialize)")
    group.add_argument("--coordinator_address", default=None, help="host:port of process 0; set to run multi-host")
    group.add_argument("--num_processes", type=int, default=None, help="number of processes (hosts)")
    group.add_argument("--process_id", type=int, default=None, help="index of this process")
    return parser


def resume_hint(config, status: str, histories: list[dict]) -> str:
    """The line an interrupted or stopped run (or seed sweep, `histories` holding each seed's) ends with: how many
    steps are saved, and how to go on."""
    where = f"--logdir {config.log.logdir} --run_name {config.log.run_name}"
    if config.log.checkpoint_dir:
        where += f" --checkpoint_dir {config.log.checkpoint_dir}"
    if config.train.seeds is not None:
        where += f" --seeds {','.join(map(str, config.train.seeds))}"
    saved_in = ", ".join(history["paths"]["checkpoint_dir"] for history in histories)
    return (f"train.py: {status} at step {histories[0]['global_step']}: checkpoint{'s' if len(histories) > 1 else ''} "
            f"saved in {saved_in}; continue with --resume {where}")


def run(args, stop) -> int:
    """The run of the parsed flags; `stop` (a `StopRequest`, its handlers installed) stops it."""
    from gain_jax import config as run_config

    base = run_config.load_config(args.config) if args.config else None
    config = run_config.config_from_flags(args, base)
    if args.stop_after < 0:
        raise run_config.ConfigError(f"--stop_after must be >= 0, got {args.stop_after}")
    import jax  # after the flags: `--help` and flag errors stay fast

    if args.coordinator_address:
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
        # its preemption notifier takes SIGTERM over: give it back to the run (the processes agree on a stop
        # themselves, gain_jax.train_loop.devices.agree_to_stop); main() restores the handlers of before
        stopping.install_handlers(stop)
    elif args.num_processes not in (None, 1):
        raise run_config.RunError("--num_processes > 1 needs --coordinator_address")
    from gain_jax import train_loop  # imports TensorFlow only when a run starts (after torch, for --init)

    _, history = train_loop.train_and_evaluate(config, resume=args.resume, stop_after=args.stop_after,
                                               stop_request=stop)
    histories = history if config.train.seeds is not None else [history]  # a seed sweep: each seed's
    status = histories[0]["status"]  # the seeds of a sweep stop together
    if status == "finished":
        return 0
    if jax.process_index() == 0:
        resolved = run_config.config_from_dict(histories[0]["config"])
        if config.train.seeds is not None:
            resolved = train_loop.sweep_config(resolved, config.train.seeds)
        print(resume_hint(resolved, status, histories), file=sys.stderr, flush=True)
    return 0 if status.startswith("stopped after") else EXIT_INTERRUPTED


def main(argv=None, exiting: bool = False) -> int:
    """The program; with `exiting` (when run as a script) SIGINT/SIGTERM are ignored once it returns: the run's
    files are complete by then, and a late Ctrl-C must not kill the interpreter's shutdown (exit -2 instead
    of the status). Python keeps SIG_IGN through finalization, unlike a Python-level handler."""
    # first: a Ctrl-C while jax, orbax and TensorFlow load must not raise inside them (the loop's own policy,
    # from a module that imports neither)
    stop = stopping.StopRequest()
    previous = stopping.install_handlers(stop)
    try:
        from gain_jax import config as run_config

        args = build_parser().parse_args(argv)
        return run(args, stop)
    except run_config.RunInterrupted as interruption:
        print(f"train.py: {interruption}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except run_config.RunError as error:
        print(f"train.py: error: {error}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("train.py: interrupted; the checkpoints already written are complete", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if exiting else handler)


if __name__ == "__main__":
    sys.exit(main(exiting=True))
