"""The loop's train step and the schedule of its losses: which terms count in which epoch."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from gain_jax import metrics
from gain_jax.config import Config, TrainConfig
from gain_jax.evaluate import LOSS_KEYS
from gain_jax.gain import GainConfig
from gain_jax.training import make_sweep_train_step, make_train_step

STEP_KEYS = LOSS_KEYS + ("topk_accuracy",)
topk_accuracy = metrics.topk_accuracy_vectorized  # the step's metric, on the device


def mining_start_epoch(train: TrainConfig) -> int:
    """The 0-based epoch from which L_am counts: `am_start_epoch`, or with 0, `pretrain_epochs`."""
    return max(train.pretrain_epochs, train.am_start_epoch)


def loss_switches(train: TrainConfig, epoch: int) -> tuple[np.float32, np.float32]:
    """(attention_on, mining_on) of the 0-based `epoch`, as the train step's float32 scalars: the epoch alone
    decides them, so a resumed run switches where an uninterrupted one does. attention_on: L_am and L_ext
    count (after the classification-only `pretrain_epochs`); mining_on: L_am counts (from
    `mining_start_epoch`, never before attention_on)."""
    return np.float32(epoch >= train.pretrain_epochs), np.float32(epoch >= mining_start_epoch(train))


def trained_terms(config: Config) -> tuple[str, ...]:
    """The loss terms the run optimizes in some epoch ("cl", "am", "ex"): a non-zero weight, and (am, ex)
    an epoch where the schedule turns them on (and for ex, images with masks)."""
    gain, train = config.gain, config.train
    terms = ("cl",) if gain.cl_weight else ()
    if gain.am_weight and mining_start_epoch(train) < train.epochs:
        terms += ("am",)
    if gain.ex_weight and train.pretrain_epochs < train.epochs and config.data.ex_fraction > 0:
        terms += ("ex",)
    return terms


def schedule_text(config: Config) -> str:
    """When the attention losses start, in 1-based epochs, for the run's first line: of the terms the run trains
    (`trained_terms`), so that without L_am only the mask loss's start is named."""
    train, terms = config.train, trained_terms(config)
    if "am" not in terms:
        return (f"the mask loss (L_ext) from epoch {train.pretrain_epochs + 1}" if "ex" in terms
                else "classification only")
    mining_start = mining_start_epoch(train)  # within the run: trained_terms has "am"
    if mining_start == train.pretrain_epochs:
        return f"attention mining from epoch {train.pretrain_epochs + 1}"
    return (f"extra supervision (L_ext) from epoch {train.pretrain_epochs + 1}, attention mining (L_am) from epoch "
            f"{mining_start + 1}")


def phase_text(config: Config, epoch: int) -> str:
    """The line of the 0-based `epoch`: a note on which of the run's trained attention losses counted."""
    attention_on, mining_on = loss_switches(config.train, epoch)
    terms = trained_terms(config)
    if "am" not in terms:
        return " (L_ext)" if attention_on and "ex" in terms else ""
    if mining_on:
        return " (attention mining)"
    return " (L_ext, L_am not yet)" if attention_on else ""


def _by_mining_switch(make_step: Callable, gain_cfg: GainConfig) -> Callable:
    """The step that `make_step(gain_cfg)` compiles, except in epochs where L_am weighs 0 (`mining_on` 0: the
    classification-only pre-training, and L_ext's epochs before `am_start_epoch`): there the same step compiled
    without the attention-mining stream (`am_weight` 0, "am" NaN), whose update is the same to float32
    rounding at the cost of a classification step. A second program, picked on the host, not a `lax.cond`
    (docs/design.md: one was 8x slower on XLA:CPU); it is compiled when an epoch first needs it."""
    with_mining = make_step(gain_cfg)
    if not gain_cfg.am_weight:
        return with_mining
    programs = {}

    def step(state, batch, dropout_key, global_step, attention_on, mining_on):
        if float(mining_on):  # a host value: the epoch's switch (`loss_switches`)
            return with_mining(state, batch, dropout_key, global_step, attention_on, mining_on)
        if "without" not in programs:
            programs["without"] = make_step(dataclasses.replace(gain_cfg, am_weight=0.0))
        return programs["without"](state, batch, dropout_key, global_step, attention_on, mining_on)

    return step


def make_loop_train_step(model, gain_cfg: GainConfig) -> Callable:
    """`step(state, batch, dropout_key, global_step, attention_on, mining_on) -> (state, metrics)`,
    jit-compiled, the state donated. `attention_on` and `mining_on` are the epoch's switches (`loss_switches`):
    `attention_on` is traced (changing it does not recompile); `mining_on` is read on the host: an epoch where
    L_am weighs 0 runs without the attention-mining stream (`_by_mining_switch`). The dropout key of a step is
    `fold_in(dropout_key, global_step)` (a resumed run draws the same ones); metrics are device scalars: the loss
    terms and the batch's top-k accuracy."""

    def compiled(cfg: GainConfig) -> Callable:
        train_step = make_train_step(model, cfg, donate=False)  # the outer jit donates

        def step(state, batch, dropout_key, global_step, attention_on, mining_on):
            rng = jax.random.fold_in(dropout_key, global_step)
            state, step_metrics = train_step(state, batch, rng, attention_on, mining_on)
            summary = {key: step_metrics[key] for key in LOSS_KEYS}
            summary["topk_accuracy"] = topk_accuracy(step_metrics["logits"], batch["labels"])
            return state, summary

        return jax.jit(step, donate_argnums=(0,))

    return _by_mining_switch(compiled, gain_cfg)


def make_loop_sweep_step(model, gain_cfg: GainConfig, strategy: str) -> Callable:
    """`make_loop_train_step`'s step for N runs of one configuration (a seed sweep), as one jit-compiled program
    (`make_sweep_train_step` with `strategy`): the states, batches and dropout keys `[N, 2]` stacked on a
    leading run axis, each run's step key `fold_in(its dropout key, global_step)` as the single run's; every
    metric `[N]`. The states are donated; epochs where L_am weighs 0 run without the attention-mining stream,
    as the single run's."""

    def compiled(cfg: GainConfig) -> Callable:
        sweep_step = make_sweep_train_step(model, cfg, strategy, donate=False)  # the outer jit donates

        def step(states, batches, dropout_keys, global_step, attention_on, mining_on):
            rngs = jax.vmap(jax.random.fold_in, in_axes=(0, None))(dropout_keys, global_step)
            states, step_metrics = sweep_step(states, batches, rngs, attention_on, mining_on)
            summary = {key: step_metrics[key] for key in LOSS_KEYS}
            summary["topk_accuracy"] = jax.vmap(topk_accuracy)(step_metrics["logits"], batches["labels"])
            return states, summary

        return jax.jit(step, donate_argnums=(0,))

    return _by_mining_switch(compiled, gain_cfg)
