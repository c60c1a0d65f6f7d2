"""Orbax checkpoints of a training run: the train state and a JSON record of where the run stands.

A checkpoint step (the global train step) holds two items:
    "state": {"step", "params", "batch_stats", "opt_state"} - arrays, restored onto the template's shardings;
    "meta":  JSON - epoch, steps done in that epoch, the run's PRNG key, and the run's config (backbone,
             class names, image size, ...), which is what `gain_jax.explain` needs to rebuild the model.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gain_jax.training import TrainState

STATE_ITEM = "state"
META_ITEM = "meta"


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


def restore(manager: ocp.CheckpointManager, step: int, template: TrainState) -> tuple[TrainState, dict]:
    """Checkpoint `step` restored into the structure, dtypes and shardings of `template`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(template))
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract),
        META_ITEM: ocp.args.JsonRestore(),
    }))
    tree = restored[STATE_ITEM]
    state = template.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                             opt_state=tree["opt_state"])
    return state, dict(restored[META_ITEM])


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """Only the JSON record of checkpoint `step`."""
    return dict(manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM])


def restore_variables(manager: ocp.CheckpointManager, step: int) -> dict:
    """The model variables ({"params"[, "batch_stats"]}) of checkpoint `step` as host numpy arrays,
    without the optimizer state's structure (for inference)."""
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore()}))
    tree = jax.tree.map(np.asarray, restored[STATE_ITEM])
    variables = {"params": tree["params"]}
    if tree.get("batch_stats"):
        variables["batch_stats"] = tree["batch_stats"]
    return variables


def key_to_json(key: jax.Array) -> list[int]:
    """A raw uint32 PRNG key (jax.random.PRNGKey) as a JSON list."""
    return [int(v) for v in np.asarray(jax.random.key_data(key)).reshape(-1)]


def key_from_json(values: list[int]) -> jax.Array:
    return jax.numpy.asarray(np.asarray(values, dtype=np.uint32))
