"""What the loop trains: a `Group` of runs, one run (the N = 1 case) or a seed sweep (`train.seeds`, `--seeds`).

A sweep trains N runs of one configuration that differ only in their seed, together: seed k's run is the run
`--seed k --run_name <run_name>_seed<k>` would be (its own initialization, dropout keys and data order, from its
own input pipeline; its own folder, checkpoints, metrics.json, TensorBoard events and report; a run of the sweep
can be resumed on its own with those flags). Their states and dropout keys are stacked on a leading run axis and
advanced by one program (`steps.make_loop_sweep_step`, over `gain_jax.make_sweep_train_step`), so each seed's
losses and parameters equal its separate run's to float32 rounding. Evaluations, heatmaps and checkpoints take
each seed's slice of the stacked state through the single run's code. One device only (the sweep's batches are
not sharded), union mode only (`config.check_seeds`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from gain_jax.config import Config, RunError
from gain_jax.evaluate import BATCH_KEYS
from gain_jax.train_loop.batches import train_batches
from gain_jax.train_loop.setup import Run, create_run, default_run_name
from gain_jax.train_loop.steps import make_loop_sweep_step
from gain_jax.training import stack_trees, tree_slice


def seed_suffix(seed: int) -> str:
    """What a sweep appends to its run name (and --checkpoint_dir) for seed `seed`'s run: the naming of
    experiments/biased_shapes.py's runs."""
    return f"_seed{seed}"


def member_config(config: Config, seed: int) -> Config:
    """Seed `seed`'s run of the sweep `config` (whose run name is set): --seed k, no --seeds, the run name and
    --checkpoint_dir with `seed_suffix`."""
    log = config.log
    run_name = log.run_name + seed_suffix(seed) if log.run_name is not None else None  # None: a workdir names it
    checkpoint_dir = log.checkpoint_dir + seed_suffix(seed) if log.checkpoint_dir else None
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, seed=seed, seeds=None),
        log=dataclasses.replace(log, run_name=run_name, checkpoint_dir=checkpoint_dir))


def sweep_config(member: Config, seeds: Sequence[int]) -> Config:
    """The sweep of `seeds` that `member` (one of its runs' resolved config) belongs to: `member_config`'s
    inverse, for the command line that resumes it."""
    seed, log = member.train.seed, member.log
    checkpoint_dir = log.checkpoint_dir.removesuffix(seed_suffix(seed)) if log.checkpoint_dir else None
    return dataclasses.replace(
        member, train=dataclasses.replace(member.train, seeds=tuple(seeds)),
        log=dataclasses.replace(log, run_name=log.run_name.removesuffix(seed_suffix(seed)),
                                checkpoint_dir=checkpoint_dir))


@dataclasses.dataclass(frozen=True)
class Group:
    """The runs a loop trains together and their train step: one run with its own step and state, or a sweep's
    runs, whose states, dropout keys and batches are stacked (`stacked`)."""

    runs: tuple[Run, ...]
    train_step: Callable

    @property
    def stacked(self) -> bool:
        return len(self.runs) > 1

    def combine(self, trees: Sequence[Any]) -> Any:
        """The members' states (or dropout keys) as the step takes them."""
        return stack_trees(trees) if self.stacked else trees[0]

    def member(self, tree: Any, index: int) -> Any:
        """Run `index`'s part of what `combine` made."""
        return tree_slice(tree, index) if self.stacked else tree

    def members(self, tree: Any) -> list[Any]:
        return [self.member(tree, index) for index in range(len(self.runs))]

    def label(self, index: int) -> str:
        """What run `index`'s printed lines start with: nothing for one run, "seed k: " in a sweep."""
        return f"seed {self.runs[index].config.train.seed}: " if self.stacked else ""

    def train_batches(self, epoch: int, skip: int = 0, global_step: int = 0) -> Iterator[dict]:
        """`batches.train_batches` of every run, stacked on the run axis in a sweep (each seed's own stream)."""
        streams = [train_batches(run, epoch, skip, global_step) for run in self.runs]
        if not self.stacked:
            return streams[0]
        return ({key: np.stack([batch[key] for batch in batches]) for key in BATCH_KEYS} for batches in zip(*streams))


def create_group(config: Config, workdir: str | None = None, *, resume: bool = False) -> Group:
    """The run of `config`, or with `train.seeds` the sweep's runs (their folders <run folder>_seed<k>, their data
    set, model and compiled steps shared); checked, nothing written (see `setup.create_run`)."""
    if config.train.seeds is None:
        run = create_run(config, workdir, resume=resume)
        return Group((run,), run.train_step)
    config.validate()
    if jax.device_count() > 1 or jax.process_count() > 1:
        raise RunError(f"--seeds trains its runs on one device, this run has {jax.device_count()} (data "
                       f"parallelism and a seed sweep are not combined: run on one device)")
    if config.log.run_name is None and workdir is None:
        config = dataclasses.replace(config, log=dataclasses.replace(config.log, run_name=default_run_name(config)))
    runs: list[Run] = []
    for seed in config.train.seeds:
        member_workdir = workdir.rstrip("/") + seed_suffix(seed) if workdir is not None else None
        runs.append(create_run(member_config(config, seed), member_workdir, resume=resume,
                               like=runs[0] if runs else None))
    if len(runs) == 1:
        return Group(tuple(runs), runs[0].train_step)
    return Group(tuple(runs), make_loop_sweep_step(runs[0].model, config.gain, config.train.sweep_strategy))
