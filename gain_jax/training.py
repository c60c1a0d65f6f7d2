"""Train state and jit-compiled GAIN train/eval steps (optax; no global state)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from gain_jax.attention import head_gradcams, minmax_normalize, resize_align_corners
from gain_jax.gain import GainConfig, gain_forward, gain_losses, total_loss


class TrainState(flax.struct.PyTreeNode):
    """step, params, BatchNorm statistics ({} without BatchNorm) and optimizer state; `tx` is static."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict:
        return variables_of(self.params, self.batch_stats)


def variables_of(params, batch_stats) -> dict:
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def create_train_state(variables: Mapping, tx: optax.GradientTransformation) -> TrainState:
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), tx=tx)


def _batch_masks(batch: Mapping, cfg: GainConfig):
    if cfg.ex_weight == 0 or "mask" not in batch:
        return None, None
    return batch["mask"], batch.get("has_mask")


def make_train_step(model, cfg: GainConfig, donate: bool = True) -> Callable:
    """`train_step(state, batch, rng, attention_on, mining_on=1.0) -> (state, metrics)`, jit-compiled.

    batch: {"image" [B,H,W,3], "labels" [B,C], optional "mask" [B,H,W] and "has_mask" [B] (read only when
    `cfg.ex_weight` > 0), optional "packing" (per-label mode: `pack_labels(labels)`, computed on the host,
    so that the attention-mining stream runs on the labels present; one compile per packed shape)}.
    `attention_on` (a scalar, 0 or 1) multiplies the attention-mining and extra losses in the total
    (`total_loss`), so switching them on after pre-training reuses the same compiled program; `mining_on`
    (a scalar, 0 or 1) multiplies the attention-mining loss alone (TrainConfig.am_start_epoch), likewise.
    Both streams run in every step of this function (the train loop compiles a second program without the
    attention-mining stream for the epochs where L_am weighs 0, `train_loop.make_loop_train_step`): a `lax.cond`
    that skipped the stream while it is off was slower on XLA:CPU (docs/design.md, "`attention_on`
    multiplies, it does not branch"), so it is not used. With `cfg.am_weight` 0 (the mask loss alone, the
    classification baseline) the stream is left out of the compiled step (a static choice): "am" is NaN.
    With `donate`, the input state's buffers are reused for the new state: don't read the old state (nor
    the variables it was created from) after the call.
    metrics: "loss" (the total optimized), "cl", "am", "ex" (unweighted terms), "logits" [B,C].
    """

    def loss_fn(params, batch_stats, batch, rng, attention_on, mining_on):
        out = gain_forward(model, variables_of(params, batch_stats), batch["image"], batch["labels"], cfg,
                           train=True, rngs={"dropout": rng}, packing=batch.get("packing"),
                           attention_mining=bool(cfg.am_weight))
        gt_masks, has_mask = _batch_masks(batch, cfg)
        terms = gain_losses(out, batch["labels"], cfg, gt_masks=gt_masks, has_mask=has_mask)
        total = total_loss(terms, cfg, attention_on, mining_on)
        return total, (terms, out.model_state, out.logits_cl)

    def train_step(state: TrainState, batch, rng, attention_on, mining_on=1.0):
        (loss, (terms, model_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch, rng, attention_on, mining_on)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        batch_stats = model_state.get("batch_stats", state.batch_stats)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        metrics = {"loss": loss, "cl": terms["cl"], "am": terms["am"], "ex": terms["ex"], "logits": logits}
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=(0,) if donate else ())



SWEEP_STRATEGIES = ("unrolled", "vmap")


def stack_trees(trees) -> Any:
    """Stack equal-structured pytrees (N runs' states or batches) into one with a leading run axis N."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def tree_slice(tree, index: int) -> Any:
    """Run `index` of a pytree stacked by `stack_trees`."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def make_sweep_train_step(model, cfg: GainConfig, strategy: str = "unrolled", donate: bool = True) -> Callable:
    """`sweep_step(states, batches, rngs, attention_on, mining_on=1.0) -> (states, metrics)`: the train steps
    of N independent runs of one configuration (seeds) as one jit-compiled program.

    `states` and `batches` are stacked with `stack_trees` (leading axis N: each run its own parameters,
    optimizer state and data), `rngs` is `[N, 2]`; the switches are shared. Every leaf of the returned states
    and metrics has the leading axis N, and run `i`'s values are those of `make_train_step` on run `i`'s
    inputs, to float32 rounding. Per-label packing is host-side and sized to each batch, so it is refused.

    strategy: "unrolled" puts N copies of the step side by side in one program (XLA may run independent
    copies at once, and the N small steps share one dispatch); "vmap" batches the step over the run axis, so
    each convolution becomes one grouped convolution over the N runs' kernels (one large op per layer, the way
    to fill a GPU with small models). Which is faster depends on the device: bench/seed_sweep.py measures both.
    """
    if strategy not in SWEEP_STRATEGIES:
        raise ValueError(f"strategy must be one of {SWEEP_STRATEGIES}, got {strategy!r}")
    train_step = make_train_step(model, cfg, donate=False)  # the outer jit donates

    def unrolled(states, batches, rngs, attention_on, mining_on):
        outputs = [train_step(tree_slice(states, i), tree_slice(batches, i), rngs[i], attention_on, mining_on)
                   for i in range(rngs.shape[0])]
        return stack_trees(outputs)

    vmapped = jax.vmap(train_step, in_axes=(0, 0, 0, None, None))

    def sweep_step(states, batches, rngs, attention_on, mining_on=1.0):
        if "packing" in batches:
            raise ValueError("per-label packing is sized to each batch and cannot be stacked over runs")
        run = unrolled if strategy == "unrolled" else vmapped
        return run(states, batches, rngs, attention_on, mining_on)

    return jax.jit(sweep_step, donate_argnums=(0,) if donate else ())

def class_cams(model, variables: Mapping, images: jax.Array, cfg: GainConfig | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Logits ``[B,C]`` and the min-max normalized CAM of every class ``[B,C,H,W]`` (evaluation mode), for
    localization metrics and explanations: one feature forward, one head forward, C VJPs through the head.
    The CAM method is `cfg.cam` (default Grad-CAM), the one GAIN trained with."""
    feats = model.apply(variables, images, train=False, method="features")

    def head_fn(features):
        return model.apply(variables, features, train=False, method="head")

    num_classes = jax.eval_shape(head_fn, feats).shape[-1]
    selectors = jnp.broadcast_to(jnp.eye(num_classes, dtype=feats.dtype), (images.shape[0], num_classes, num_classes))
    logits, cams = head_gradcams(head_fn, feats, selectors, cam_method=(cfg or GainConfig()).cam)
    return logits, minmax_normalize(resize_align_corners(cams, images.shape[1:3]))


def make_eval_step(model, cfg: GainConfig) -> Callable:
    """`eval_step(state, batch) -> dict`, jit-compiled: gain_forward in evaluation mode (argmax class),
    the loss terms with the batch's labels, and every class's normalized Grad-CAM ("class_cams"). With
    `cfg.am_weight` 0 the attention-mining stream is left out, as in the train step: "am" is NaN."""

    def eval_step(state: TrainState, batch):
        variables = state.variables
        out = gain_forward(model, variables, batch["image"], batch["labels"], cfg, train=False,
                           attention_mining=bool(cfg.am_weight))
        gt_masks, has_mask = _batch_masks(batch, cfg)
        terms = gain_losses(out, batch["labels"], cfg, gt_masks=gt_masks, has_mask=has_mask)
        _, cams = class_cams(model, variables, batch["image"], cfg)
        return {"logits": out.logits_cl, "loss": terms["total"], "cl": terms["cl"], "am": terms["am"],
                "ex": terms["ex"], "heatmap": out.heatmap, "scaled": out.scaled, "mask": out.mask,
                "masked_images": out.masked_images, "class_cams": cams}

    return jax.jit(eval_step)
