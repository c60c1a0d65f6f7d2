"""The training loop: the start-up (checked for a stop at each safe point, nothing written before the last),
then epochs of steps, each epoch ending with an evaluation, heatmaps and a checkpoint, and the final
evaluation. A stop, or `stop_after` steps, ends the loop through one path (`EndRun`): save a checkpoint at
the step reached, write the status, return.

The accelerator stays busy: step metrics stay on the device and are read back every `log.log_every` steps
(and at the end of each epoch), the next batch is transferred while the current step runs, and nothing in a
step waits for the host. In a multi-host run the processes agree on a stop every `log.log_every` steps and
before each evaluation batch (one collective flag), so every process stops at the same step and writes its
part of one checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import time

import jax
import numpy as np

from gain_jax import checkpoint, quiet
from gain_jax.config import Config, RunError
from gain_jax.train_loop import console
from gain_jax.train_loop.batches import heatmap_batch
from gain_jax.train_loop.checkpoints import restore_runs, save_checkpoint
from gain_jax.train_loop.devices import agree_to_stop, prefetch_to_device
from gain_jax.train_loop.evaluation import evaluate_split, final_splits, heatmap_picture
from gain_jax.train_loop.records import RunRecords, step_means
from gain_jax.train_loop.setup import Position, config_file_record, create_train_state, load_torch_state_dict
from gain_jax.train_loop.steps import STEP_KEYS, loss_switches, phase_text
from gain_jax.train_loop.stopping import StopRequest, check_stop, handle_signals
from gain_jax.train_loop.sweep import Group, create_group
from gain_jax.training import TrainState


class NonFiniteLossError(RunError):
    """The loss of a train step was nan or inf; the run stopped (metrics.json says where)."""


class EndRun(Exception):
    """Ends the loop before its end: the state at the position reached is saved, `reason` is the status."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def train_and_evaluate(config: Config, workdir: str | None = None, *, resume: bool = False, stop_after: int = 0,
                       stop_request: StopRequest | None = None) -> tuple[TrainState, dict] | tuple[list, list]:
    """Train and evaluate a GAIN model as `config` says; write the run folder (see gain_jax.train_loop). With
    `config.train.seeds`, train the runs of those seeds together (`gain_jax.train_loop.sweep`), each in its
    folder <run folder>_seed<k>.

    Args:
      config: the run's settings (validated here).
      workdir: the run folder; default <config.log.logdir>/<config.log.run_name> (a run name from the data
        set, backbone and time when there is none).
      resume: continue from the run's newest checkpoint (same run folder or checkpoint dir); the losses
        are those of an uninterrupted run. An unreadable newest checkpoint is reported (one line on
        stderr), moved aside to <step>.corrupt, and the newest intact one restored.
      stop_after: save and stop after this many train steps of this call (0: run to the end).
      stop_request: a `StopRequest` the caller controls (and whose signal handlers it installs, see
        `handle_signals`); by default SIGINT/SIGTERM stop the run from the very start of this call (the
        handlers are restored afterwards).
    Returns:
      (final state, history): history is what metrics.json holds; history["status"] is "finished",
      "interrupted by SIGINT" (or another signal, or the reason given to `StopRequest.request`) or
      "stopped after N steps". With `train.seeds`: ([final state of each seed], [history of each seed]).
    Raises:
      ConfigError, RunError: a setting, file, folder, data set or checkpoint that does not work (a one-line
        message, raised before anything is written).
      RunInterrupted: a stop was requested during the start-up, before anything was written.
      NonFiniteLossError: a train step's loss was not finite.
    """
    stop = stop_request if stop_request is not None else StopRequest()
    with handle_signals(stop) if stop_request is None else contextlib.nullcontext():
        group, state, dropout_key, records, position = start(config, workdir, resume, stop)
        # from here on the run writes its folder (a sweep: each seed's)
        stop.training = True
        for run_records in records:
            run_records.open()
        managers = [checkpoint.open_manager(run.paths.checkpoint_dir, max_to_keep=run.config.log.keep)
                    for run in group.runs]
        try:
            state, histories = Loop(group, managers, records, stop, stop_after).train(state, dropout_key, position)
        finally:
            with stop.protect():
                for manager in managers:
                    manager.wait_until_finished()
            for run_records, manager in zip(records, managers):
                run_records.close()
                manager.close()
    if config.train.seeds is None:
        return state, histories[0]
    return group.members(state), histories


def start(config: Config, workdir: str | None, resume: bool, stop: StopRequest):
    """The start-up: (group, state, dropout key, [records of each run], position), the state and key as the
    group's step takes them, checked for a stop request at each safe point (RunInterrupted), nothing written."""
    quiet.quiet_libraries(verbose=config.log.verbose)  # before TensorFlow is imported
    check_stop(stop, "while starting")
    torch_state_dict = load_torch_state_dict(config.train.init) if config.train.init else None
    check_stop(stop, "while loading --init")
    group = create_group(config, workdir, resume=resume)
    check_stop(stop, "while preparing the data set")
    initial = [create_train_state(run, torch_state_dict) for run in group.runs]
    del torch_state_dict
    check_stop(stop, "while compiling")
    position, pasts = Position(), [None] * len(group.runs)
    if resume:
        initial, position, pasts = restore_runs(list(group.runs), initial, stop)
    check_stop(stop, "while restoring" if resume else "while compiling")
    records = [RunRecords(run, config_file_record(run), past, position.global_step)
               for run, past in zip(group.runs, pasts)]
    states, dropout_keys = zip(*initial)
    return group, group.combine(states), group.combine(dropout_keys), records, position


def read_back(pending: list[tuple[dict, dict]], group: Group) -> list[list[dict]]:
    """[(record fields, device metrics)] -> each run's step records with host floats, in one transfer."""
    host = jax.device_get([device_metrics for _, device_metrics in pending])
    return [[{**fields, **{key: float(group.member(values[key], index)) for key in STEP_KEYS}}
             for (fields, _), values in zip(pending, host)] for index in range(len(group.runs))]


def first_non_finite(records: list[dict]) -> int | None:
    """Index of the first record whose loss is nan or inf."""
    return next((i for i, record in enumerate(records) if not math.isfinite(record["loss"])), None)


class Loop:
    """One call's training of a group (one run, or a seed sweep's runs together), from a position to the end of
    the run or to a stop. Holds what changes as it goes: the state, the position reached, the steps of this
    call, the metrics not read back yet. `managers` and `records` are each run's, in the group's order."""

    def __init__(self, group: Group, managers: list, records: list[RunRecords], stop: StopRequest,
                 stop_after: int = 0):
        self.group, self.managers, self.records = group, managers, records
        self.run = group.runs[0]  # the settings every run of the group shares (all but seed and folders)
        self.stop, self.stop_after = stop, stop_after
        self.state: TrainState | None = None
        self.dropout_key = None
        self.position = Position()
        self.steps_this_run = 0
        self.pending: list[tuple[dict, dict]] = []
        self.grid_batch = None

    def train(self, state: TrainState, dropout_key: jax.Array, position: Position) -> tuple[TrainState, list[dict]]:
        """(final state, each run's history), as `train_and_evaluate` returns them for one run."""
        self.state, self.dropout_key, self.position = state, dropout_key, position
        train = self.run.config.train
        started = time.time()
        if self.run.is_main:
            print(console.first_line(self.run, jax.device_count()), flush=True)
            if self.group.stacked:
                print(console.sweep_line(self.group.runs), flush=True)
        try:
            if self.run.config.eval.test_first and position.global_step == 0:
                self.evaluate_before_training()
            for epoch in range(position.epoch, train.epochs):
                epoch_started = time.time()
                steps_per_second = self.train_epoch(epoch)
                self.end_epoch(epoch, epoch_started, steps_per_second)
            self.evaluate_final()
        except EndRun as end:
            self.flush()  # no-op when nothing is pending
            with self.stop.protect():
                self.save_checkpoints()
                self.wait_for_checkpoints()
            self.finish(end.reason)
            return self.state, [records.history for records in self.records]
        self.wait_for_checkpoints()
        self.finish("finished")
        if self.run.is_main:
            for index, (run, records, manager) in enumerate(zip(self.group.runs, self.records, self.managers)):
                print(console.report(run, records.history, time.time() - started, manager.latest_step(),
                                     label=self.group.label(index)), flush=True)
        return self.state, [records.history for records in self.records]

    def finish(self, status: str, global_step: int | None = None) -> None:
        for records in self.records:
            records.finish(status, self.position.global_step if global_step is None else global_step)

    def save_checkpoints(self) -> None:
        """Each run's state at the position reached (asynchronously)."""
        for index, (run, manager) in enumerate(zip(self.group.runs, self.managers)):
            save_checkpoint(run, manager, self.group.member(self.state, index),
                            self.group.member(self.dropout_key, index), self.position)

    def wait_for_checkpoints(self) -> None:
        for manager in self.managers:
            manager.wait_until_finished()

    # ------------------------------------------------------------------------------------------ stopping

    def check_stop(self, agree: bool = True) -> None:
        """At a step boundary: EndRun when `stop_after` steps are done or a stop was requested (on any
        process: with several, they agree only when `agree`, at points every process reaches together)."""
        if self.stop_after and self.steps_this_run == self.stop_after:
            raise EndRun(f"stopped after {self.stop_after} steps")
        requested = agree_to_stop(self.stop) if agree or jax.process_count() == 1 else False
        if requested:
            raise EndRun(f"interrupted by {self.stop.signal_name}")

    def evaluate(self, index: int, state: TrainState, split: str) -> dict:
        """Run `index`'s evaluation of a split with its `state`; EndRun when a stop interrupts it."""
        result = evaluate_split(self.group.runs[index], state, split, self.stop)
        if result is None:
            raise EndRun(f"interrupted by {self.stop.signal_name}")
        return result

    # ------------------------------------------------------------------------------------------ steps

    def flush(self) -> list[list[dict]]:
        """Move the pending steps' metrics from the device into each run's records; return them. At the first
        non-finite loss of a run, keep its steps before it and raise NonFiniteLossError."""
        if not self.pending:
            return [[] for _ in self.records]
        per_run = read_back(self.pending, self.group)
        self.pending.clear()
        bad = [first_non_finite(records) for records in per_run]
        for run_records, records, first_bad in zip(self.records, per_run, bad):
            run_records.add_steps(records if first_bad is None else records[:first_bad])
        failed = [(per_run[index][first_bad]["step"], index) for index, first_bad in enumerate(bad)
                  if first_bad is not None]
        if failed:
            _, index = min(failed)  # the earliest step's
            self.fail_non_finite(index, per_run[index][bad[index]])
        return per_run

    def fail_non_finite(self, index: int, record: dict) -> None:
        """Run `index`'s loss was not finite: every run of the group stops, with the status saying whose."""
        self.wait_for_checkpoints()
        manager, run = self.managers[index], self.group.runs[index]
        last_good = manager.latest_step()
        whose = f" of seed {run.config.train.seed}" if self.group.stacked else ""
        self.finish(f"non-finite loss{whose} at step {record['step']}", record["step"])
        where = f"step {last_good} in {run.paths.checkpoint_dir}" if last_good is not None else "none"
        raise NonFiniteLossError(f"loss{whose} is {record['loss']} at step {record['step']} (epoch "
                                 f"{record['epoch']}); stopped, last good checkpoint: {where}")

    def train_epoch(self, epoch: int) -> float | None:
        """Epoch index `epoch`'s steps from the position reached; the steps per second after its first step
        (which includes compilation)."""
        train, log = self.run.config.train, self.run.config.log
        attention_on, mining_on = loss_switches(train, epoch)
        done = self.position.step_in_epoch if epoch == self.position.epoch else 0
        self.position = Position(epoch, done, self.position.global_step)
        batches = prefetch_to_device(self.run.placement, self.group.train_batches(epoch, done,
                                                                                  self.position.global_step))
        epoch_records = [records.steps_of_epoch(epoch + 1) for records in self.records]  # from before a resume
        fields = {"epoch": epoch + 1, "attention": bool(attention_on), "mining": bool(mining_on)}
        progress = console.Progress(self.run, epoch, done)
        timer = StepTimer()
        try:
            while self.position.step_in_epoch < train.steps_per_epoch:
                self.check_stop(agree=self.position.global_step % log.log_every == 0)
                self.step(next(batches), fields, attention_on, mining_on, timer)
                progress.step()
                if self.read_back_due():
                    for records, new in zip(epoch_records, self.flush()):
                        records += new
                    progress.show(step_means([record for records in epoch_records for record in records]))
                if log.heatmap_every and self.position.global_step % log.heatmap_every == 0:
                    self.record_heatmaps()
        finally:
            progress.close()
        return timer.steps_per_second()

    def step(self, batch: dict, fields: dict, attention_on, mining_on, timer: StepTimer) -> None:
        """One train step of the group, dispatched (its metrics join `pending`)."""
        key_on_host = np.asarray(self.dropout_key)  # an input every process holds the same
        dispatched = time.time()
        self.state, step_metrics = self.group.train_step(self.state, batch, key_on_host, self.position.global_step,
                                                         attention_on, mining_on)
        self.position = Position(self.position.epoch, self.position.step_in_epoch + 1, self.position.global_step + 1)
        self.steps_this_run += 1
        self.pending.append(({"step": self.position.global_step, **fields}, step_metrics))
        if self.steps_this_run == 1:
            jax.block_until_ready(step_metrics)
            if self.run.is_main:
                print(f"first train step (compile included): {time.time() - dispatched:.1f} s", flush=True)
        timer.stepped()

    def read_back_due(self) -> bool:
        log, train = self.run.config.log, self.run.config.train
        heatmap_due = log.heatmap_every and self.position.global_step % log.heatmap_every == 0
        return (len(self.pending) >= log.log_every or bool(heatmap_due)
                or self.position.step_in_epoch == train.steps_per_epoch)

    def record_heatmaps(self) -> None:
        if not self.run.config.log.num_heatmaps:
            return
        self.grid_batch = self.grid_batch if self.grid_batch is not None else heatmap_batch(self.run)
        for index, (run, records) in enumerate(zip(self.group.runs, self.records)):
            drawn = heatmap_picture(run, self.group.member(self.state, index), self.grid_batch)
            if drawn is not None:
                records.add_heatmaps(*drawn, self.position.global_step)

    # ------------------------------------------------------------------------------------------ evaluations

    def evaluate_before_training(self) -> None:
        for index, records in enumerate(self.records):
            validation = self.evaluate(index, self.group.member(self.state, index), "validation")
            records.add_evaluation_before_training(validation)
            if self.run.is_main:
                print(f"{self.group.label(index)}before training: {console.summary_line(validation)}", flush=True)

    def epoch_record(self, index: int, epoch: int) -> tuple[dict, list[str]]:
        """Run `index`'s record of epoch index `epoch` (its train means and evaluations) and the splits in it."""
        config = self.run.config
        train, state = config.train, self.group.member(self.state, index)
        attention_on, mining_on = loss_switches(train, epoch)
        record = {"epoch": epoch + 1, "attention": bool(attention_on), "mining": bool(mining_on),
                  "train": step_means(self.records[index].steps_of_epoch(epoch + 1)),
                  "validation": self.evaluate(index, state, "validation")}
        evaluated = ["validation"]
        if epoch + 1 == train.pretrain_epochs < train.epochs:
            # the baseline GAIN's attention mining starts from: the final report compares with it
            for split in final_splits(config)[1:]:
                record[split] = self.evaluate(index, state, split)
                evaluated.append(split)
        return record, evaluated

    def end_epoch(self, epoch: int, epoch_started: float, steps_per_second: float | None) -> None:
        """Evaluate, record, draw the heatmaps and checkpoint at the end of epoch index `epoch`."""
        config = self.run.config
        train, global_step = config.train, self.position.global_step
        epoch_records = [self.epoch_record(index, epoch) for index in range(len(self.records))]
        seconds = time.time() - epoch_started
        for records, (record, evaluated) in zip(self.records, epoch_records):
            record["seconds"] = seconds
            record["steps_per_second"] = steps_per_second
            records.add_epoch(record, global_step, evaluated)
        if not config.log.heatmap_every:
            self.record_heatmaps()
        self.position = Position(epoch + 1, 0, global_step)
        if (epoch + 1) % config.log.checkpoint_every == 0 or epoch + 1 == train.epochs:
            with self.stop.protect():  # the synchronous part (the commit goes on in the background)
                self.save_checkpoints()
        phase = phase_text(config, epoch)
        for index, (records, (record, _)) in enumerate(zip(self.records, epoch_records)):
            records.write()
            if self.run.is_main:
                print(self.group.label(index) + console.epoch_line(config, record, phase), flush=True)

    def evaluate_final(self) -> None:
        """Each run's final splits (the last epoch's validation is reused), at the end of the run."""
        for index, records in enumerate(self.records):
            state, last = self.group.member(self.state, index), records.last_epoch()
            for split in final_splits(self.run.config):
                if split == "validation" and last is not None and "validation" in last:
                    records.add_final(split, last["validation"], self.position.global_step, logged=False)
                else:
                    records.add_final(split, self.evaluate(index, state, split), self.position.global_step)


class StepTimer:
    """Steps per second of an epoch, counted from after its first step (which includes compilation)."""

    def __init__(self):
        self.started: float | None = None
        self.steps = 0

    def stepped(self) -> None:
        if self.started is None:
            self.started = time.time()
        else:
            self.steps += 1

    def steps_per_second(self) -> float | None:
        seconds = time.time() - self.started if self.started is not None else float("nan")
        return self.steps / seconds if self.steps and seconds > 0 else None
