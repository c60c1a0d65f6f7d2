"""Saving a run's state at a position, and resuming from the newest intact checkpoint.

A checkpoint (gain_jax.checkpoint, Orbax) holds the state and a meta record: position (epoch, step in it,
global step), the dropout key and the run's record (`setup.run_record`). An unreadable newest checkpoint
(truncated or missing files) is reported in one line, the newest intact one restored, and the unreadable
ones moved aside (<step>.corrupt).
"""
from __future__ import annotations

import sys

import jax

from gain_jax import checkpoint
from gain_jax.config import RunError, changed_settings, resume_mismatches
from gain_jax.train_loop.records import read_previous_history
from gain_jax.train_loop.setup import Position, Run, run_record
from gain_jax.train_loop.stopping import StopRequest, check_stop
from gain_jax.training import TrainState


def save_checkpoint(run: Run, manager, state: TrainState, dropout_key: jax.Array, position: Position) -> None:
    """Checkpoint the state at `position` (asynchronously), unless this very step is saved already."""
    if manager.latest_step() == position.global_step:
        return  # e.g. stopped right after an epoch's checkpoint
    meta = {"epoch": position.epoch, "step_in_epoch": position.step_in_epoch, "global_step": position.global_step,
            "dropout_key": checkpoint.key_to_json(dropout_key), "config": run_record(run)}
    checkpoint.save(manager, position.global_step, state, meta)


def _restore_step(run: Run, manager, step: int, state: TrainState) -> tuple[TrainState, jax.Array, Position, dict]:
    """Checkpoint `step`'s state, dropout key, position and saved config; CheckpointError if unreadable,
    RunError if its must-match settings differ from the run's."""
    saved = checkpoint.read_meta(manager, step).get("config", {})
    mismatches = resume_mismatches(saved, run.config)
    if mismatches:
        name, saved_value, value = mismatches[0]
        raise RunError(f"--resume: checkpoint {run.paths.checkpoint_dir} was trained with --{name} "
                       f"{saved_value!r}, this run has {value!r}")
    state, meta = checkpoint.restore(manager, step, state)
    try:
        position = Position(int(meta["epoch"]), int(meta["step_in_epoch"]), int(meta["global_step"]))
        return state, checkpoint.key_from_json(meta["dropout_key"]), position, saved
    except (KeyError, TypeError, ValueError) as error:
        raise checkpoint.CheckpointError(run.paths.checkpoint_dir, step, f"its meta record lacks {error}") from None


def _newest_restorable(run: Run, manager, state: TrainState):
    """(`_restore_step` of the newest checkpoint that restores, the unreadable newer ones' errors)."""
    directory = run.paths.checkpoint_dir
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise RunError(f"--resume: no checkpoint in {directory}, nothing to resume (start the run without "
                       f"--resume)")
    unreadable: list[checkpoint.CheckpointError] = []
    for step in steps:
        try:
            return _restore_step(run, manager, step, state), unreadable
        except checkpoint.CheckpointError as error:
            unreadable.append(error)
    first = unreadable[0]
    raise RunError(f"--resume: no checkpoint in {directory} can be restored: step {first.step} "
                   f"({first.reason})" + (f" and {len(unreadable) - 1} older ones" if len(unreadable) > 1 else "")
                   + "; start the run again without --resume under another --run_name")


def restore_run(run: Run, manager, state: TrainState, dropout_key: jax.Array
                ) -> tuple[TrainState, jax.Array, Position, dict]:
    """The newest intact checkpoint's state, dropout key and position, and the run's records up to it
    ({"steps", "epochs"} from its metrics.json). Unreadable newer checkpoints are reported in one line and
    moved aside (once the older one is restored); RunError if none can be restored or the settings differ
    from the run's."""
    previous = read_previous_history(run)  # before anything changes on disk
    (state, restored_key, position, saved), unreadable = _newest_restorable(run, manager, state)
    directory = run.paths.checkpoint_dir
    changed = changed_settings(saved, run.config)
    if changed and run.is_main:
        print("resuming with settings that differ from the run's: " + ", ".join(
            f"--{name} {before!r} -> {after!r}" for name, before, after in changed), flush=True)
    if unreadable and run.is_main:
        names = ", ".join(str(error.step) for error in unreadable)
        moved = [checkpoint.set_aside(manager, error.step) for error in unreadable]
        print(f"WARNING: --resume: checkpoint step {unreadable[0].step} in {directory} is unreadable "
              f"({unreadable[0].reason}); resuming from step {position.global_step}, the newest intact one "
              f"(step{'s' if len(moved) > 1 else ''} {names} moved aside to {', '.join(moved)})",
              file=sys.stderr, flush=True)
    past = {"steps": [], "epochs": []}
    if previous is not None:
        # records past the checkpoint belong to steps the resumed run repeats
        past["steps"] = [r for r in previous.get("steps", []) if r["step"] <= position.global_step]
        past["epochs"] = [r for r in previous.get("epochs", []) if r["epoch"] <= position.epoch]
    print(f"resumed {directory} at step {position.global_step} (epoch {position.epoch + 1}, "
          f"{position.step_in_epoch} steps into it)", flush=True)
    return state, restored_key, position, past


def restore_runs(runs: list[Run], initial: list[tuple[TrainState, jax.Array]], stop: StopRequest
                 ) -> tuple[list[tuple[TrainState, jax.Array]], Position, list[dict]]:
    """`restore_run` of each run (one, or a seed sweep's) from its own checkpoints: [(state, dropout key)], the
    position, and each run's past records. The runs of a sweep continue together, so their newest intact
    checkpoints must be at one step (RunError otherwise); a stop request is checked before each."""
    restored = []
    for run, (state, dropout_key) in zip(runs, initial):
        reader = checkpoint.open_manager(run.paths.checkpoint_dir, create=False)
        try:
            check_stop(stop, "while compiling", reader)
            restored.append(restore_run(run, reader, state, dropout_key))
        finally:
            reader.close()
    positions = [position for _, _, position, _ in restored]
    if any(position != positions[0] for position in positions):
        steps = ", ".join(f"seed {run.config.train.seed} at step {position.global_step}"
                          for run, position in zip(runs, positions))
        raise RunError(f"--resume: the seeds' checkpoints are at different steps ({steps}): resume each on its own "
                       f"(--seed k --run_name <run_name>_seed<k>, without --seeds)")
    return [(state, key) for state, key, _, _ in restored], positions[0], [past for *_, past in restored]
