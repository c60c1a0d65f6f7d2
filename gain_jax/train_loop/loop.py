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
from gain_jax.train_loop.batches import heatmap_batch, train_batches
from gain_jax.train_loop.checkpoints import restore_run, save_checkpoint
from gain_jax.train_loop.devices import agree_to_stop, prefetch_to_device
from gain_jax.train_loop.evaluation import evaluate_split, final_splits, heatmap_picture
from gain_jax.train_loop.records import RunRecords, step_means
from gain_jax.train_loop.setup import (
    Position,
    Run,
    config_file_record,
    create_run,
    create_train_state,
    load_torch_state_dict,
)
from gain_jax.train_loop.steps import STEP_KEYS, loss_switches, phase_text
from gain_jax.train_loop.stopping import StopRequest, check_stop, handle_signals
from gain_jax.training import TrainState


class NonFiniteLossError(RunError):
    """The loss of a train step was nan or inf; the run stopped (metrics.json says where)."""


class EndRun(Exception):
    """Ends the loop before its end: the state at the position reached is saved, `reason` is the status."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def train_and_evaluate(config: Config, workdir: str | None = None, *, resume: bool = False, stop_after: int = 0,
                       stop_request: StopRequest | None = None) -> tuple[TrainState, dict]:
    """Train and evaluate a GAIN model as `config` says; write the run folder (see gain_jax.train_loop).

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
      "stopped after N steps".
    Raises:
      ConfigError, RunError: a setting, file, folder, data set or checkpoint that does not work (a one-line
        message, raised before anything is written).
      RunInterrupted: a stop was requested during the start-up, before anything was written.
      NonFiniteLossError: a train step's loss was not finite.
    """
    stop = stop_request if stop_request is not None else StopRequest()
    with handle_signals(stop) if stop_request is None else contextlib.nullcontext():
        run, state, dropout_key, records, position = start(config, workdir, resume, stop)
        # from here on the run writes its folder
        stop.training = True
        records.open()
        manager = checkpoint.open_manager(run.paths.checkpoint_dir, max_to_keep=run.config.log.keep)
        try:
            loop = Loop(run, manager, records, stop, stop_after)
            return loop.train(state, dropout_key, position)
        finally:
            with stop.protect():
                manager.wait_until_finished()
            records.close()
            manager.close()


def start(config: Config, workdir: str | None, resume: bool, stop: StopRequest):
    """The start-up: (run, state, dropout key, records, position), checked for a stop request at each safe
    point (RunInterrupted), nothing written."""
    quiet.quiet_libraries(verbose=config.log.verbose)  # before TensorFlow is imported
    check_stop(stop, "while starting")
    torch_state_dict = load_torch_state_dict(config.train.init) if config.train.init else None
    check_stop(stop, "while loading --init")
    run = create_run(config, workdir, resume=resume)
    check_stop(stop, "while preparing the data set")
    state, dropout_key = create_train_state(run, torch_state_dict)
    del torch_state_dict
    check_stop(stop, "while compiling")
    position, past = Position(), None
    if resume:
        reader = checkpoint.open_manager(run.paths.checkpoint_dir, create=False)
        try:
            check_stop(stop, "while compiling", reader)
            state, dropout_key, position, past = restore_run(run, reader, state, dropout_key)
        finally:
            reader.close()
    check_stop(stop, "while restoring" if resume else "while compiling")
    records = RunRecords(run, config_file_record(run), past, position.global_step)
    return run, state, dropout_key, records, position


def read_back(pending: list[tuple[dict, dict]]) -> list[dict]:
    """[(record fields, device metrics)] -> step records with host floats, in one transfer."""
    host = jax.device_get([device_metrics for _, device_metrics in pending])
    return [{**fields, **{key: float(values[key]) for key in STEP_KEYS}} for (fields, _), values in zip(pending, host)]


def first_non_finite(records: list[dict]) -> int | None:
    """Index of the first record whose loss is nan or inf."""
    return next((i for i, record in enumerate(records) if not math.isfinite(record["loss"])), None)


class Loop:
    """One call's training, from a position to the end of the run or to a stop. Holds what changes as it
    goes: the state, the position reached, the steps of this call, the metrics not read back yet."""

    def __init__(self, run: Run, manager, records: RunRecords, stop: StopRequest, stop_after: int = 0):
        self.run, self.manager, self.records, self.stop, self.stop_after = run, manager, records, stop, stop_after
        self.state: TrainState | None = None
        self.dropout_key = None
        self.position = Position()
        self.steps_this_run = 0
        self.pending: list[tuple[dict, dict]] = []
        self.grid_batch = None

    def train(self, state: TrainState, dropout_key: jax.Array, position: Position) -> tuple[TrainState, dict]:
        self.state, self.dropout_key, self.position = state, dropout_key, position
        train = self.run.config.train
        started = time.time()
        if self.run.is_main:
            print(console.first_line(self.run, jax.device_count()), flush=True)
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
                save_checkpoint(self.run, self.manager, self.state, self.dropout_key, self.position)
                self.manager.wait_until_finished()
            self.records.finish(end.reason, self.position.global_step)
            return self.state, self.records.history
        self.manager.wait_until_finished()
        self.records.finish("finished", self.position.global_step)
        if self.run.is_main:
            print(console.report(self.run, self.records.history, time.time() - started, self.manager.latest_step()),
                  flush=True)
        return self.state, self.records.history

    # ------------------------------------------------------------------------------------------ stopping

    def check_stop(self, agree: bool = True) -> None:
        """At a step boundary: EndRun when `stop_after` steps are done or a stop was requested (on any
        process: with several, they agree only when `agree`, at points every process reaches together)."""
        if self.stop_after and self.steps_this_run == self.stop_after:
            raise EndRun(f"stopped after {self.stop_after} steps")
        requested = agree_to_stop(self.stop) if agree or jax.process_count() == 1 else False
        if requested:
            raise EndRun(f"interrupted by {self.stop.signal_name}")

    def evaluate(self, split: str) -> dict:
        """A split's evaluation; EndRun when a stop interrupts it."""
        result = evaluate_split(self.run, self.state, split, self.stop)
        if result is None:
            raise EndRun(f"interrupted by {self.stop.signal_name}")
        return result

    # ------------------------------------------------------------------------------------------ steps

    def flush(self) -> list[dict]:
        """Move the pending steps' metrics from the device into the records; return them. At the first
        non-finite loss, keep the steps before it and raise NonFiniteLossError."""
        if not self.pending:
            return []
        records = read_back(self.pending)
        self.pending.clear()
        bad = first_non_finite(records)
        self.records.add_steps(records if bad is None else records[:bad])
        if bad is not None:
            self.fail_non_finite(records[bad])
        return records

    def fail_non_finite(self, record: dict) -> None:
        self.manager.wait_until_finished()
        last_good = self.manager.latest_step()
        self.records.finish(f"non-finite loss at step {record['step']}", record["step"])
        where = f"step {last_good} in {self.run.paths.checkpoint_dir}" if last_good is not None else "none"
        raise NonFiniteLossError(f"loss is {record['loss']} at step {record['step']} (epoch {record['epoch']}); "
                                 f"stopped, last good checkpoint: {where}")

    def train_epoch(self, epoch: int) -> float | None:
        """Epoch index `epoch`'s steps from the position reached; the steps per second after its first step
        (which includes compilation)."""
        train, log = self.run.config.train, self.run.config.log
        attention_on, mining_on = loss_switches(train, epoch)
        done = self.position.step_in_epoch if epoch == self.position.epoch else 0
        self.position = Position(epoch, done, self.position.global_step)
        batches = prefetch_to_device(self.run.placement, train_batches(self.run, epoch, done,
                                                                       self.position.global_step))
        epoch_records = self.records.steps_of_epoch(epoch + 1)  # from before a resume
        fields = {"epoch": epoch + 1, "attention": bool(attention_on), "mining": bool(mining_on)}
        progress = console.Progress(self.run, epoch, done)
        timer = StepTimer()
        try:
            while self.position.step_in_epoch < train.steps_per_epoch:
                self.check_stop(agree=self.position.global_step % log.log_every == 0)
                self.step(next(batches), fields, attention_on, mining_on, timer)
                progress.step()
                if self.read_back_due():
                    epoch_records += self.flush()
                    progress.show(step_means(epoch_records))
                if log.heatmap_every and self.position.global_step % log.heatmap_every == 0:
                    self.record_heatmaps()
        finally:
            progress.close()
        return timer.steps_per_second()

    def step(self, batch: dict, fields: dict, attention_on, mining_on, timer: StepTimer) -> None:
        """One train step, dispatched (its metrics join `pending`)."""
        key_on_host = np.asarray(self.dropout_key)  # an input every process holds the same
        dispatched = time.time()
        self.state, step_metrics = self.run.train_step(self.state, batch, key_on_host, self.position.global_step,
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
        drawn = heatmap_picture(self.run, self.state, self.grid_batch)
        if drawn is not None:
            self.records.add_heatmaps(*drawn, self.position.global_step)

    # ------------------------------------------------------------------------------------------ evaluations

    def evaluate_before_training(self) -> None:
        validation = self.evaluate("validation")
        self.records.add_evaluation_before_training(validation)
        if self.run.is_main:
            print(f"before training: {console.summary_line(validation)}", flush=True)

    def end_epoch(self, epoch: int, epoch_started: float, steps_per_second: float | None) -> None:
        """Evaluate, record, draw the heatmaps and checkpoint at the end of epoch index `epoch`."""
        config = self.run.config
        train, global_step = config.train, self.position.global_step
        attention_on, mining_on = loss_switches(train, epoch)
        record = {"epoch": epoch + 1, "attention": bool(attention_on), "mining": bool(mining_on),
                  "train": step_means(self.records.steps_of_epoch(epoch + 1)),
                  "validation": self.evaluate("validation")}
        evaluated = ["validation"]
        if epoch + 1 == train.pretrain_epochs < train.epochs:
            # the baseline GAIN's attention mining starts from: the final report compares with it
            for split in final_splits(config)[1:]:
                record[split] = self.evaluate(split)
                evaluated.append(split)
        record["seconds"] = time.time() - epoch_started
        record["steps_per_second"] = steps_per_second
        self.records.add_epoch(record, global_step, evaluated)
        if not config.log.heatmap_every:
            self.record_heatmaps()
        self.position = Position(epoch + 1, 0, global_step)
        if (epoch + 1) % config.log.checkpoint_every == 0 or epoch + 1 == train.epochs:
            with self.stop.protect():  # the synchronous part (the commit goes on in the background)
                save_checkpoint(self.run, self.manager, self.state, self.dropout_key, self.position)
        self.records.write()
        if self.run.is_main:
            print(console.epoch_line(config, record, phase_text(attention_on, mining_on)), flush=True)

    def evaluate_final(self) -> None:
        """The final splits (the last epoch's validation is reused), at the end of the run."""
        last = self.records.last_epoch()
        for split in final_splits(self.run.config):
            if split == "validation" and last is not None and "validation" in last:
                self.records.add_final(split, last["validation"], self.position.global_step, logged=False)
            else:
                self.records.add_final(split, self.evaluate(split), self.position.global_step)


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
