"""The run's evaluations: a split through `gain_jax.evaluate` on the run's devices, the splits of the end of
a run, and the heatmap grid of the first validation images."""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from tqdm import tqdm

from gain_jax import datasets, viz
from gain_jax import evaluate as evaluation
from gain_jax.config import Config
from gain_jax.train_loop import console
from gain_jax.train_loop.batches import pipeline
from gain_jax.train_loop.devices import agree_to_stop, batch_to_device, rows_to_host
from gain_jax.train_loop.setup import Run
from gain_jax.train_loop.stopping import StopRequest
from gain_jax.training import TrainState


def final_splits(config: Config) -> tuple[str, ...]:
    """The splits evaluated at the end of the run (`gain_jax.datasets.final_splits`)."""
    return datasets.final_splits(config.data.dataset, config.eval.test)


def evaluate_split(run: Run, state: TrainState, split: str, stop: StopRequest | None = None) -> dict | None:
    """`gain_jax.evaluate` over a split (its first `eval.eval_examples`), None if stopped (on any process of
    a multi-host run: they agree before each batch)."""
    size = run.split_sizes[split]
    if run.config.eval.eval_examples:
        size = min(size, run.config.eval.eval_examples)
    batches = tqdm(pipeline(run, f"{split}[:{size}]", train=False, seed=0), desc=f"eval {split}", leave=False,
                   total=math.ceil(size / run.config.train.batch_size),
                   disable=not (run.is_main and console.is_terminal()))
    return evaluation.evaluate_with_step(
        run.eval_step, state, batches, run.class_names, cam_threshold=run.config.eval.cam_threshold,
        pointing_tolerance=run.pointing_tolerance,
        to_device=lambda batch: batch_to_device(run.placement, batch, global_rows=True), to_host=rows_to_host,
        device_count=jax.device_count(),
        should_stop=lambda: agree_to_stop(stop))


def heatmap_picture(run: Run, state: TrainState, batch: Mapping[str, np.ndarray]) -> tuple | None:
    """(picture, captions): input, heatmap overlay and masked image of the first validation images; None when
    none are wanted, or the validation split is smaller than one sharded batch."""
    count = min(run.config.log.num_heatmaps, len(batch["labels"]))
    if not count or len(batch["labels"]) % jax.device_count():
        return None
    out = run.eval_step(state, batch_to_device(run.placement, batch, global_rows=True))
    logits = rows_to_host(out["logits"])[:count]
    scaled = rows_to_host(out["scaled"])[:count, 0]
    masked = rows_to_host(out["masked_images"])[:count, 0]
    captions = viz.prediction_captions(np.asarray(batch["labels"])[:count], logits, run.class_names)
    picture = viz.grid(viz.attention_rows(np.asarray(batch["image"])[:count], scaled, masked), captions=captions,
                       scale=max(1, 128 // run.config.data.image_size))
    return picture, captions
