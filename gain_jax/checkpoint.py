"""Orbax checkpoints of a training run: the train state and a JSON record of where the run stands.

A checkpoint step (the global train step) holds two items:
    "state": {"step", "params", "batch_stats", "opt_state"} - arrays, restored onto the template's shardings;
    "meta":  JSON - epoch, steps done in that epoch, the run's PRNG key, and the run's config (backbone,
             class names, image size, ...), which is what `gain_jax.explain` needs to rebuild the model.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gain_jax.quiet import capture_fd2
from gain_jax.training import TrainState

STATE_ITEM = "state"
META_ITEM = "meta"
CORRUPT_SUFFIX = ".corrupt"  # a step folder moved aside by `set_aside` (orbax lists only numeric names)


class CheckpointError(Exception):
    """A checkpoint step that cannot be read back (truncated or missing files); the message is one line."""

    def __init__(self, directory: str, step: int, reason: str):
        self.directory, self.step, self.reason = directory, step, reason
        super().__init__(f"checkpoint step {step} in {directory} is unreadable ({reason})")


def _first_line(error: BaseException) -> str:
    """The innermost cause's first line, without TensorStore's spec dumps."""
    while error.__cause__ is not None and error.__cause__ is not error:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    for cut in (" [tensorstore_spec=", " See full TensorStore details", " [source locations="):
        text = text.split(cut)[0]
    text = text.strip()
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _contained(directory: str, step: int) -> Iterator[None]:
    """Run a restore with its failure contained: any exception becomes a CheckpointError, and what orbax,
    TensorStore and asyncio print while failing (absl errors, "Exception ignored" and "Event loop is closed"
    tracebacks of the shard reads still in flight, C++ logs on fd 2) is dropped. Nothing is dropped when
    the restore succeeds: the captured stderr is written back."""
    absl_logger = logging.getLogger("absl")
    level, hooks = absl_logger.level, (sys.unraisablehook, threading.excepthook)
    failure = None
    try:
        with capture_fd2() as capture:
            absl_logger.setLevel(logging.CRITICAL)
            sys.unraisablehook = lambda unraisable: None
            threading.excepthook = lambda args: None
            try:
                yield
            except Exception as error:  # orbax and TensorStore raise many types (ValueError, KeyError, OSError, ...)
                failure = CheckpointError(directory, step, _first_line(error))
                _settle(capture.file)  # the reads still in flight fail (and print) a moment later
                capture.write_back = lambda captured: b""
    finally:
        sys.unraisablehook, threading.excepthook = hooks
        absl_logger.setLevel(level)
    if failure is not None:
        _drop_stragglers()
        raise failure


def _is_straggler(unraisable) -> bool:
    """An "Exception ignored" report of a failed restore's leftovers: an orbax read coroutine collected
    late, or a TensorStore callback finding asyncio's loop closed."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    return isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)


def _drop_stragglers() -> None:
    """From the first failed restore on, drop its leftovers' reports (they can come much later, when the
    coroutines are collected); every other report goes to the hook in place before."""
    if getattr(sys.unraisablehook, "_gain_jax_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_straggler(unraisable):
            previous(unraisable)

    hook._gain_jax_filter = True
    sys.unraisablehook = hook


def _settle(captured, quiet_for: float = 0.3, at_most: float = 3.0) -> None:
    """Collect the failed restore's coroutines and wait until nothing more is written for `quiet_for` s."""
    deadline = time.monotonic() + at_most
    size = -1
    while time.monotonic() < deadline:
        gc.collect()
        time.sleep(quiet_for)
        current = os.fstat(captured.fileno()).st_size
        if current == size:
            return
        size = current


def open_manager(directory: str, max_to_keep: int | None = None, create: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` keeping the newest `max_to_keep` steps (None: all); with
    `create=False` the directory must exist (for readers)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=(STATE_ITEM, META_ITEM))


def _state_tree(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, meta: Mapping[str, Any]) -> None:
    """Save `state` and `meta` as checkpoint `step` (asynchronously: call `manager.wait_until_finished()`
    before the process exits)."""
    manager.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(_state_tree(state)),
        META_ITEM: ocp.args.JsonSave(dict(meta)),
    }), force=True)


def _directory(manager: ocp.CheckpointManager) -> str:
    return os.fspath(manager.directory)


def restore(manager: ocp.CheckpointManager, step: int, template: TrainState) -> tuple[TrainState, dict]:
    """Checkpoint `step` restored into the structure, dtypes and shardings of `template`.

    Raises:
      CheckpointError: the step's files are missing, truncated or do not fit `template`.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(template))
    with _contained(_directory(manager), step):
        restored = manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(abstract),
            META_ITEM: ocp.args.JsonRestore(),
        }))
        meta = restored[META_ITEM]
        if not isinstance(meta, Mapping):
            raise ValueError(f"its {META_ITEM} record is {type(meta).__name__}, not a JSON object")
    tree = restored[STATE_ITEM]
    state = template.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                             opt_state=tree["opt_state"])
    return state, dict(meta)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """Only the JSON record of checkpoint `step` (CheckpointError if it cannot be read)."""
    with _contained(_directory(manager), step):
        meta = manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
        if not isinstance(meta, Mapping):
            raise ValueError(f"its {META_ITEM} record is {type(meta).__name__}, not a JSON object")
    return dict(meta)


def restore_variables(manager: ocp.CheckpointManager, step: int) -> dict:
    """The model variables ({"params"[, "batch_stats"]}) of checkpoint `step` as host numpy arrays,
    without the optimizer state's structure (for inference). CheckpointError if it cannot be read."""
    with _contained(_directory(manager), step):
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore()}))
        tree = jax.tree.map(np.asarray, restored[STATE_ITEM])
        if "params" not in tree:
            raise ValueError(f"its {STATE_ITEM} item holds no params")
    variables = {"params": tree["params"]}
    if tree.get("batch_stats"):
        variables["batch_stats"] = tree["batch_stats"]
    return variables


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Rename an unreadable step's folder to <step>.corrupt (kept for inspection, no longer listed);
    return the new path."""
    source = os.path.join(_directory(manager), str(step))
    target = source + CORRUPT_SUFFIX
    suffix = 1
    while os.path.exists(target):
        suffix += 1
        target = f"{source}{CORRUPT_SUFFIX}{suffix}"
    os.replace(source, target)
    manager.reload()
    return target


def key_to_json(key: jax.Array) -> list[int]:
    """A raw uint32 PRNG key (jax.random.PRNGKey) as a JSON list."""
    return [int(v) for v in np.asarray(jax.random.key_data(key)).reshape(-1)]


def key_from_json(values: list[int]) -> jax.Array:
    return jax.numpy.asarray(np.asarray(values, dtype=np.uint32))
