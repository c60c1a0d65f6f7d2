"""The batches a run reads: each process's share of the train split, re-created from seed + epoch (a resumed
run sees the batches of an uninterrupted one), the per-label packing and the mask selection on the host,
and the evaluation splits."""
from __future__ import annotations

import functools
import itertools
import zlib
from collections.abc import Iterator, Mapping

import jax
import numpy as np

from gain_jax.config import Config, RunError
from gain_jax.gain import check_max_labels, pack_labels
from gain_jax.train_loop.setup import Run, data_package


def pipeline(run: Run, split: str, train: bool, seed: int) -> Iterator[dict]:
    """Training: this process's share of the split, in batches of its share of the global batch.
    Evaluation: every process reads the whole split in global batches (see `devices.batch_to_device`)."""
    config = run.config
    sharding = {} if train else {"process_index": 0, "process_count": 1}
    batch_size = config.train.batch_size // jax.process_count() if train else config.train.batch_size
    oversampling = {}
    if train and config.data.ex_oversample:
        oversampling = {"oversample": config.data.ex_oversample, "oversample_filter": functools.partial(
            selected_for_extra_supervision, seed=config.train.seed, fraction=config.data.ex_fraction)}
    try:
        return data_package().input_pipeline(
            config.data.dataset, split, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir,
            image_size=config.data.image_size, batch_size=batch_size, train=train, seed=seed,
            autoaugment=config.data.autoaugment and train, **sharding, **oversampling)
    except ValueError as error:
        if not oversampling:
            raise
        # e.g. no image selected by a tiny --ex_fraction, or a split too large to keep in memory
        raise RunError(f"--ex_oversample {config.data.ex_oversample}: {error}") from None


def selected_for_extra_supervision(filenames, seed: int, fraction: float) -> np.ndarray:
    """Deterministic per-image choice: the same images in every epoch, run and process."""
    if fraction >= 1.0:
        return np.ones(len(filenames), bool)
    hashes = [zlib.crc32(f"{seed}:{name}".encode()) / 2.0 ** 32 for name in filenames]
    return np.asarray(hashes) < fraction


def _as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def am_sampling_rng(seed: int, global_step: int) -> np.random.Generator:
    """The generator that draws the attention-mining labels of the batch trained at `global_step` (steps done
    before it; per-label mode with --am_labels_per_image): from (seed, step) alone, so that a resumed run
    draws what an uninterrupted one would."""
    return np.random.default_rng([seed % 2 ** 64, global_step])


def prepare_train_batch(batch: Mapping[str, np.ndarray], config: Config, global_step: int = 0) -> dict:
    """Per-label mode: pack the batch's (image, label) pairs (one host; several hosts each hold only their
    own rows' labels, so they pad to --max_labels and refuse an image with more), with
    --am_labels_per_image sampling them from `am_sampling_rng(seed, global_step)`; keep only the selected
    images' masks for extra supervision."""
    filenames = [_as_text(name) for name in batch["filename"]]
    extra = {}
    if config.gain.mode == "per_label":
        if jax.process_count() == 1:
            sampled = config.gain.am_labels_per_image
            extra["packing"] = pack_labels(
                np.asarray(batch["labels"]), multiple=jax.device_count(), am_labels_per_image=sampled,
                rng=am_sampling_rng(config.train.seed, global_step) if sampled else None)
        else:
            try:
                check_max_labels(np.asarray(batch["labels"]), config.gain.max_labels, filenames)
            except ValueError as error:
                raise RunError(f"{error} (--max_labels; one host packs the labels instead)") from None
    selected = selected_for_extra_supervision(filenames, config.train.seed, config.data.ex_fraction)
    return {**batch, **extra, "has_mask": np.asarray(batch["has_mask"], bool) & selected}


def train_batches(run: Run, epoch: int, skip: int = 0, global_step: int = 0) -> Iterator[dict]:
    """Epoch index `epoch`'s host batches (an endless stream), re-created from seed + epoch so that a
    resumed run sees the same ones after skipping the `skip` already trained on; `global_step` is the step
    that trains the first one (it seeds per-label sampling, `prepare_train_batch`)."""
    split = run.config.data.train_split
    batches = itertools.islice(pipeline(run, split, train=True, seed=run.config.train.seed + epoch), skip, None)
    return (prepare_train_batch(batch, run.config, global_step + index) for index, batch in enumerate(batches))


def heatmap_batch(run: Run) -> dict:
    """The validation images the heatmap grids show (the first global batch)."""
    return next(pipeline(run, f"validation[:{run.config.train.batch_size}]", train=False, seed=0))
