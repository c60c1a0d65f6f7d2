"""The run's records: `history` (what metrics.json holds), metrics.json itself, TensorBoard and the heatmap
PNGs. `RunRecords` is their one writer; process 0 writes the files, the others keep the history only.

Every TensorBoard scalar is written at the global step (the number of train steps done), the train steps'
mean at each read-back, an epoch's evaluations at its last step, the evaluations before training at 0.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from gain_jax import viz
from gain_jax.config import RunError
from gain_jax.train_loop.setup import Run, data_package
from gain_jax.train_loop.steps import STEP_KEYS


def write_json_atomic(path: str, payload) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=1, allow_nan=True)
    os.replace(temporary, path)


def open_summary_writer(run: Run):
    """A TensorBoard writer on the run folder (process 0 only, else None)."""
    if not run.is_main:
        return None
    data_package()
    import tensorflow as tf  # noqa: PLC0415  (loaded by gain_jax.data already)

    return tf.summary.create_file_writer(run.paths.run_dir)


def log_scalars(writer, prefix: str, values: Mapping[str, Any], step: int) -> None:
    """`prefix/key` for each finite number of `values`, at `step` (nothing without a writer)."""
    if writer is None:
        return
    import tensorflow as tf  # noqa: PLC0415  (loaded by gain_jax.data already)

    with writer.as_default(step=step):
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                tf.summary.scalar(f"{prefix}/{key}", value)


def step_means(records: list[dict]) -> dict:
    """The mean of each step metric over `records` (nan for none)."""
    return {key: float(np.mean([r[key] for r in records])) if records else float("nan") for key in STEP_KEYS}


def read_previous_history(run: Run) -> dict | None:
    """The run's metrics.json before a resume (None if there is none); RunError if it is not readable."""
    path = run.paths.metrics_path
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            previous = json.load(handle)
    except OSError as error:
        raise RunError(f"--resume: cannot read {path} ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"--resume: {path} is not valid JSON ({error}); it holds the run's step and epoch "
                       f"records: repair it, or move it away to resume without them") from None
    if not isinstance(previous, dict) or not all(isinstance(previous.get(key, []), list)
                                                 for key in ("steps", "epochs")):
        raise RunError(f"--resume: {path} is not a metrics.json of a run (no steps/epochs lists); "
                       f"move it away to resume without it")
    return previous


class RunRecords:
    """The history of a run (status, per-step and per-epoch records, final results) and where it goes:
    metrics.json (rewritten atomically at each epoch end and when the run ends) and TensorBoard.

    `past` ({"steps", "epochs"}) holds the records of a resumed run up to its checkpoint."""

    def __init__(self, run: Run, config_record: Mapping[str, Any], past: Mapping[str, list] | None = None,
                 global_step: int = 0):
        past = past or {}
        self.history = {"status": "running", "config": dict(config_record), "global_step": global_step,
                        "steps": list(past.get("steps", [])), "epochs": list(past.get("epochs", [])), "final": {},
                        "paths": {"run_dir": run.paths.run_dir, "checkpoint_dir": run.paths.checkpoint_dir,
                                  "heatmap_dir": run.paths.heatmap_dir}}
        self._run = run
        self.writer = None

    def open(self) -> None:
        """Create the run folder's files: config.json, heatmaps/ and the TensorBoard writer (process 0)."""
        if self._run.is_main:
            os.makedirs(self._run.paths.heatmap_dir, exist_ok=True)
            write_json_atomic(self._run.paths.config_path, self.history["config"])
        self.writer = open_summary_writer(self._run)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def write(self) -> None:
        """metrics.json (process 0)."""
        if self._run.is_main:
            write_json_atomic(self._run.paths.metrics_path, self.history)

    def steps_of_epoch(self, epoch: int) -> list[dict]:
        """The step records of 1-based `epoch` so far (those before a resume included)."""
        return [record for record in self.history["steps"] if record["epoch"] == epoch]

    def add_steps(self, records: list[dict]) -> None:
        """Step records read back from the device; TensorBoard gets their mean (each step's values are in
        metrics.json): one write per read-back keeps TensorFlow's per-op cost out of the step loop."""
        self.history["steps"].extend(records)
        if records:
            self.history["global_step"] = records[-1]["step"]
            log_scalars(self.writer, "train", step_means(records), records[-1]["step"])

    def add_epoch(self, record: Mapping[str, Any], global_step: int, evaluated: Iterable[str]) -> None:
        """An epoch's record: its train means ("train", as epoch_train/* in TensorBoard) and the splits
        `evaluated` after it, all at the epoch's last step (metrics.json: at the next `write`)."""
        self.history["epochs"].append(dict(record))
        log_scalars(self.writer, "epoch_train", record["train"], global_step)
        for split in evaluated:
            log_scalars(self.writer, split, record[split], global_step)

    def add_evaluation_before_training(self, validation: Mapping[str, Any]) -> None:
        """eval.test_first: the untrained model's validation, as epoch 0, at step 0."""
        self.history["epochs"].append({"epoch": 0, "validation": validation})
        log_scalars(self.writer, "validation", validation, 0)

    def last_epoch(self) -> Mapping[str, Any] | None:
        return self.history["epochs"][-1] if self.history["epochs"] else None

    def add_final(self, split: str, result: Mapping[str, Any], global_step: int, logged: bool = True) -> None:
        """A split's result at the end of the run (`logged`: to TensorBoard too; the last epoch's validation
        is there already)."""
        self.history["final"][split] = result
        if logged:
            log_scalars(self.writer, split, result, global_step)

    def finish(self, status: str, global_step: int) -> None:
        """The run's end: its status ("finished", "interrupted by ...", "stopped after N steps", "non-finite
        loss at step N") and step count, in metrics.json."""
        self.history.update(status=status, global_step=global_step)
        self.write()

    def add_heatmaps(self, picture: np.ndarray, captions: list[str], step: int) -> None:
        """A heatmap grid as heatmaps/step_<step>.png and in TensorBoard (process 0)."""
        if not self._run.is_main:
            return
        viz.save_png(os.path.join(self._run.paths.heatmap_dir, f"step_{step:07d}.png"), picture)
        import tensorflow as tf  # noqa: PLC0415  (loaded by gain_jax.data already)

        with self.writer.as_default(step=step):
            tf.summary.image("heatmaps/validation (input, overlay, masked)", picture[None], max_outputs=1)
            tf.summary.text("heatmaps/validation captions", "\n\n".join(
                f"{row}: {caption}" for row, caption in enumerate(captions)))
