"""GAIN's two streams and three losses as pure functions (docs/design.md, section 1, "The algorithm").

`gain_forward` runs the classification stream, Grad-CAM (union or per-label), the soft mask and the
attention-mining stream; `gain_losses` turns its output into the classification, attention-mining and
extra-supervision losses. Both are `jax.jit`-able; the configuration is a hashable, static dataclass.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gain_jax.attention import apply_mask, head_gradcams, minmax_normalize, resize_align_corners, soft_mask
from gain_jax.fields import MUST_MATCH, first_field_problem, option
from gain_jax.variants import AM_FORWARDS, AM_SCORES, CAM_METHODS, ERASE_FILLS, MASK_FUNCTIONS, lookup

MODES = ("union", "per_label")
CAM_GRADS = ("stop", "full")
MASK_GRADS = ("through", "stop")


@dataclasses.dataclass(frozen=True)
class GainConfig:
    """What GAIN computes; every field is static under `jax.jit` (the dataclass is frozen and hashable).

    Each field's metadata (gain_jax.fields) documents it (train.py's flags are generated from it) and says
    what values it takes, checked when the config is built: "choices" (a tuple, or a registry of
    `gain_jax.variants`, whose names are looked up then, so register your own variants first), "range";
    "resume" marks what a resumed run must keep (gain_jax.config).
    """

    mode: str = option("union", "union: one attention map per image from all its labels (upstream's "
                       "batch_GAIN_VOC); per_label: one map per positive label, up to max_labels slots "
                       "(upstream's multi-heatmap model)", choices=MODES, resume=MUST_MATCH)
    cam: str = option("gradcam", "CAM method of the attention maps, in training and evaluation "
                      "(gain_jax.CAM_METHODS); gradcam is upstream's", choices=CAM_METHODS)
    mask: str = option("sigmoid", "soft-mask function (gain_jax.MASK_FUNCTIONS); sigmoid is upstream's "
                       "T = sigmoid(omega * (scaled - sigma))", choices=MASK_FUNCTIONS)
    score: str = option("softmax", "what L_am minimizes for the attended classes on the erased image "
                        "(gain_jax.AM_SCORES): softmax (upstream) or each class's sigmoid (multi-label)",
                        choices=AM_SCORES)
    am_batchnorm: str = option("frozen", "BatchNorm in the attention-mining stream (gain_jax.AM_FORWARDS): "
                               "frozen = running statistics, no gradient to scale/bias (upstream); batch = the "
                               "erased batch's own statistics", choices=AM_FORWARDS)
    # sigma: the scaled map lies in [0, 1]; any other threshold makes the mask (nearly) constant
    sigma: float = option(0.5, "soft-mask threshold, in [0, 1] (the min-max scaled map's range)", range=(0.0, 1.0))
    omega: float = option(10.0, "soft-mask sharpness", range=(0.0, None))
    fill: float | tuple[float, ...] = option(0.0, "value the erased region takes, in normalized image space: "
                                             "one number or one per channel (with --erase constant)")
    erase: str = option("constant", "what replaces the erased region (gain_jax.ERASE_FILLS): constant = the "
                        "fill value (upstream); shift = the image itself rolled by half its height and width, "
                        "so that the erased region is not a flat patch (fill is then ignored)",
                        choices=ERASE_FILLS)
    cam_grad: str = option("stop", "stop: the CAM's gradient-derived weights are constants for the loss "
                           "gradient (upstream); full: differentiate through them (second order)",
                           choices=CAM_GRADS)
    grads_off: bool = option(False, "the attention-mining forward sees stop_gradient(params): L_am reaches "
                             "the weights only through the mask")
    mask_grad: str = option("through", "through: L_am's gradient also reaches the weights through the soft "
                            "mask, i.e. it can move the attention maps (upstream); stop: the mask is a constant "
                            "for L_am, which then trains only the classifier to lose the class on the erased "
                            "image (the maps cannot shrink or wander to lower L_am)", choices=MASK_GRADS)
    max_labels: int = option(4, "label slots per image in the padded per_label path (gain_forward without "
                             "`packing`; train.py packs, so that no image is refused, on one host)",
                             range=(1, None), resume=MUST_MATCH)
    am_labels_per_image: int = option(
        0, "per_label mode: at most this many of an image's labels, drawn uniformly without replacement each "
        "step, go through the attention-mining stream, and L_am averages their scores (an unbiased estimate of "
        "the mean over all the image's labels: about B*min(n, labels) attention-mining rows instead of one per "
        "label, at the price of a noisier L_am; not upstream's); 0 = all (upstream). Needs the packed path "
        "(train.py on one host); an error in union mode", range=(0, None))
    cl_weight: float = option(1.0, "weight of the classification loss", range=(0.0, None))
    am_weight: float = option(1.0, "weight of the attention-mining loss (the paper's alpha)", range=(0.0, None))
    ex_weight: float = option(0.0, "weight of the extra-supervision (mask) loss of GAIN_ext; 0 = off (the "
                              "paper's omega)", range=(0.0, None))

    def __post_init__(self):
        problem = first_field_problem(self)  # each field's "choices" and "range"
        if problem is not None:
            raise ValueError(f"GainConfig.{problem[0]} {problem[1]}")
        if self.am_labels_per_image and self.mode != "per_label":
            # union mode has one attention-mining row per image already: nothing to sample
            raise ValueError(f"GainConfig.am_labels_per_image ({self.am_labels_per_image}) is for mode per_label, "
                             f"not {self.mode}")
        if isinstance(self.fill, (list, np.ndarray)):  # keep the dataclass hashable
            object.__setattr__(self, "fill", tuple(float(v) for v in self.fill))
        fill_values = self.fill if isinstance(self.fill, tuple) else (self.fill,)
        if len(fill_values) not in (1, 3):
            raise ValueError(f"GainConfig.fill must be a scalar or 3 values, got {self.fill!r}")
        if not all(np.isfinite(v) for v in fill_values):
            raise ValueError(f"GainConfig.fill must be finite, got {self.fill!r}")

    @property
    def num_slots(self) -> int:
        return 1 if self.mode == "union" else self.max_labels


@flax.struct.dataclass
class GainOutput:
    """Everything `gain_forward` computes. K = 1 in union mode, `max_labels` in per-label mode.

    logits_cl [B,C]; heatmap [B,K,H,W] (upsampled relu cam, before min-max); scaled [B,K,H,W];
    mask [B,K,H,W]; masked_images [B,K,H,W,3]; logits_am [B,K,C] (None: the stream was left out,
        `gain_forward(attention_mining=False)`);
    slot_labels [B,K]: the class of each slot, -1 for padding (union mode: the argmax class in evaluation,
        the lowest positive label in training, where the slot stands for the union of `selector`);
    selector [B,K,C]: the classes each slot attends to (multi-hot in union training, one-hot otherwise,
        zero for padding) - the losses use it;
    model_state: the updated {"batch_stats": ...} of the classification stream ({} without BatchNorm, or
        when train=False);
    am_slots [B,K]: 1 for the slots whose attention-mining score counts in L_am, 0 otherwise: every slot
        with a non-zero selector, unless the packing sampled some (`GainConfig.am_labels_per_image`), then
        the sampled ones. None (outputs built by hand) means every slot with a non-zero selector.
    """

    logits_cl: jax.Array
    heatmap: jax.Array
    scaled: jax.Array
    mask: jax.Array
    masked_images: jax.Array
    logits_am: jax.Array | None
    slot_labels: jax.Array
    selector: jax.Array
    model_state: Any
    am_slots: jax.Array | None = None


def slot_labels_from_multihot(labels: jax.Array, max_labels: int) -> jax.Array:
    """``[B, C]`` multi-hot -> ``[B, max_labels]`` positive classes in ascending order, -1 padded.

    Labels beyond `max_labels` are dropped silently here (this runs under jit); call
    `check_max_labels` on the host first.
    """
    num_classes = labels.shape[-1]
    class_ids = jnp.arange(num_classes)
    # positives first, in class order; negatives after them
    sort_key = jnp.where(labels > 0, class_ids, num_classes + class_ids)
    order = jnp.argsort(sort_key, axis=-1)
    if max_labels > num_classes:
        pad = jnp.full(order.shape[:-1] + (max_labels - num_classes,), num_classes, order.dtype)
        order = jnp.concatenate([order, pad], axis=-1)
    order = order[..., :max_labels]
    is_positive = jnp.take_along_axis(jnp.pad(labels > 0, ((0, 0), (0, 1))), order, axis=-1)
    return jnp.where(is_positive, order, -1).astype(jnp.int32)


def check_max_labels(labels, max_labels: int, names: Sequence[str] | None = None) -> None:
    """Raise ValueError naming the first image with more positive labels than `max_labels` (host side)."""
    counts = (np.asarray(labels) > 0).sum(axis=-1)
    too_many = np.nonzero(counts > max_labels)[0]
    if too_many.size:
        index = int(too_many[0])
        name = f"{names[index]!s}" if names is not None else f"batch index {index}"
        raise ValueError(
            f"per-label mode: image {name} has {int(counts[index])} labels but max_labels is {max_labels}; "
            f"raise max_labels")


@flax.struct.dataclass
class LabelPacking:
    """Where the (image, label) pairs of a batch sit, for per-label mode at the cost of the labels present.

    slot_labels [B,K]: each image's positive classes in ascending order, -1 padded; K is the batch's
        largest label count rounded up to a few sizes (`SLOT_SIZES`), so no image is ever refused.
    rows [R]: the flat index (b * K + k) of every pair that goes through the attention-mining stream (all
        real pairs, or the sampled ones with `am_labels_per_image`), then copies of the first one up to R
        rows, R taken from a few sizes (`row_count`) so that recompiles stay rare.
    row_valid [R]: 1 for those pairs, 0 for the copies.
    The attention-mining stream runs on the R rows only, and L_am averages over the pairs with
    row_valid 1; built on the host by `pack_labels` (or `pack_slots`).
    """

    slot_labels: jax.Array
    rows: jax.Array
    row_valid: jax.Array


# Slot counts and row multiples of the batch size that packed per-label batches are rounded up to: a
# handful of programs per run, while the attention-mining stream pays for at most ~25% padding rows.
SLOT_SIZES = (1, 2, 4, 8, 16, 32, 64)
ROW_FACTORS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0)


def row_count(pairs: int, batch_size: int, multiple: int = 1) -> int:
    """The packed row count for `pairs` pairs: the smallest `factor * batch_size` (ROW_FACTORS, then
    doubling), rounded up to `multiple` (e.g. the device count), that holds them."""
    factors = list(ROW_FACTORS)
    while factors[-1] * batch_size < pairs:
        factors.append(factors[-1] * 2)
    for factor in factors:
        rows = -(-int(np.ceil(factor * batch_size)) // multiple) * multiple
        if rows >= pairs:
            return rows
    raise AssertionError("unreachable: the factors grow until they hold every pair")


def pack_labels(labels, multiple: int = 1, am_labels_per_image: int = 0,
                rng: np.random.Generator | int | None = None) -> LabelPacking:
    """Host-side packing of a batch's multi-hot labels ``[B,C]`` for per-label mode (numpy in and out).

    `am_labels_per_image` n > 0: only min(n, n_i) of image i's n_i labels, drawn uniformly without
    replacement from `rng` (a `numpy.random.Generator` or a seed; required, no global state), become
    attention-mining rows (`sample_am_slots`); 0: all of them.
    """
    slot_labels = label_slots(labels)
    if am_labels_per_image:
        if rng is None:
            raise ValueError("pack_labels: am_labels_per_image needs rng (a numpy Generator or a seed)")
        am_slots = sample_am_slots(slot_labels, am_labels_per_image, np.random.default_rng(rng))
    else:
        am_slots = slot_labels >= 0
    return pack_slots(slot_labels, am_slots, multiple)


def label_slots(labels) -> np.ndarray:
    """``[B,C]`` multi-hot -> ``[B,K]`` each image's positive classes in ascending order, -1 padded; K is the
    batch's largest label count rounded up to one of `SLOT_SIZES` (host side, numpy)."""
    positive = np.asarray(labels) > 0
    batch_size = positive.shape[0]
    counts = positive.sum(axis=-1)
    most = max(int(counts.max(initial=0)), 1)
    num_slots = next((size for size in SLOT_SIZES if size >= most), most)
    slot_labels = np.full((batch_size, num_slots), -1, np.int32)
    for image, row in enumerate(positive):
        classes = np.flatnonzero(row)
        slot_labels[image, :classes.size] = classes
    return slot_labels


def sample_am_slots(slot_labels: np.ndarray, am_labels_per_image: int, rng: np.random.Generator) -> np.ndarray:
    """``[B,K]`` bool: for each image, min(n, n_i) of its n_i real slots (slot_labels >= 0), a subset drawn
    uniformly among all subsets of that size (the n smallest of i.i.d. uniform keys), n =
    `am_labels_per_image` >= 1. Draws B*K numbers from `rng` whatever the labels."""
    if am_labels_per_image < 1:
        raise ValueError(f"am_labels_per_image must be >= 1 to sample, got {am_labels_per_image}")
    real = np.asarray(slot_labels) >= 0
    keys = np.where(real, rng.random(real.shape), np.inf)
    ranks = np.argsort(np.argsort(keys, axis=-1, kind="stable"), axis=-1, kind="stable")
    return real & (ranks < am_labels_per_image)


def pack_slots(slot_labels: np.ndarray, am_slots: np.ndarray, multiple: int = 1) -> LabelPacking:
    """The `LabelPacking` whose attention-mining rows are the slots where `am_slots` ``[B,K]`` is true (real
    slots only), in flat order, padded to `row_count` rows."""
    slot_labels = np.asarray(slot_labels, np.int32)
    chosen = np.asarray(am_slots, bool)
    if chosen.shape != slot_labels.shape:
        raise ValueError(f"am_slots {chosen.shape} must have slot_labels' shape {slot_labels.shape}")
    if np.any(chosen & (slot_labels < 0)):
        raise ValueError("am_slots marks a padding slot (slot_labels -1)")
    real = np.flatnonzero(chosen.reshape(-1)).astype(np.int32)
    total = row_count(max(real.size, 1), slot_labels.shape[0], multiple)
    filler = real[0] if real.size else 0
    rows = np.concatenate([real, np.full(total - real.size, filler, np.int32)])
    row_valid = (np.arange(total) < real.size).astype(np.float32)
    return LabelPacking(slot_labels=slot_labels, rows=rows, row_valid=row_valid)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def gain_forward(
    model,
    variables: Mapping,
    images: jax.Array,
    labels: jax.Array | None,
    cfg: GainConfig,
    train: bool = True,
    rngs: Mapping[str, jax.Array] | None = None,
    packing: LabelPacking | None = None,
    attention_mining: bool = True,
) -> GainOutput:
    """Both GAIN streams for a batch. images ``[B,H,W,3]``; labels ``[B,C]`` multi-hot (may be None when
    `train=False`: the argmax class is attended, as upstream does in evaluation).

    `train` puts dropout and BatchNorm of the classification stream in training mode (BatchNorm statistics
    update; the new ones are in `out.model_state`). The attention-mining stream always runs BatchNorm on the
    running statistics, without updating them and without gradient to its scale/bias (upstream's
    FreezedBnModel); its dropout follows `train`. `model` is one of `gain_jax.models` or any flax module with
    the same contract: `features`, `head` and `__call__` taking `train` and `freeze_bn`, where `freeze_bn=True`
    means running statistics, no update and no gradient to BatchNorm's scale/bias. `rngs` (e.g.
    {"dropout": key}) is needed when `train` and the model has dropout.

    `packing` (per-label training only; from `pack_labels`) gives the slots from the batch's own label
    counts instead of `max_labels`, and runs the attention-mining stream on the real (image, label) pairs
    only; the losses and gradients equal the padded mode's (without dropout in the attention-mining
    stream, whose random masks are drawn for the packed rows instead). A packing with sampled pairs
    (`pack_labels(..., am_labels_per_image=n, rng=...)`) runs the stream on those only, and L_am averages
    each image's sampled pairs (`out.am_slots`); Grad-CAM, the masks and L_ext still cover every slot.

    `attention_mining=False` leaves out the attention-mining stream (the erased images' forward): `logits_am`
    is None. A training step whose L_am weighs 0 (`GainConfig.am_weight`, the mask loss alone) passes it, so
    that it does not pay for a second forward and backward that cannot move a weight.
    """
    if packing is not None and (cfg.mode != "per_label" or not train):
        raise ValueError("gain_forward: packing is for per-label mode in training")
    if train and labels is None:
        raise ValueError("gain_forward(train=True) needs labels")
    if labels is not None and cfg.mode == "per_label" and packing is None and _is_concrete(labels):
        check_max_labels(labels, cfg.max_labels)
    if train and cfg.am_labels_per_image and packing is None:
        raise ValueError("gain_forward: am_labels_per_image needs packing=pack_labels(labels, "
                         "am_labels_per_image=..., rng=...) (the padded path trains every label)")

    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    has_bn = bool(batch_stats)
    cl_rngs = am_rngs = None
    if rngs:
        cl_rngs = {name: jax.random.fold_in(key, 0) for name, key in rngs.items()}
        am_rngs = {name: jax.random.fold_in(key, 1) for name, key in rngs.items()}

    # 1. classification stream up to the Grad-CAM layer
    if train and has_bn:
        feats, model_state = model.apply(
            variables, images, train=True, method="features", mutable=["batch_stats"], rngs=cl_rngs)
    else:
        feats = model.apply(variables, images, train=train, method="features", rngs=cl_rngs)
        model_state = {}

    def head_fn(features):
        return model.apply(variables, features, train=train, method="head", rngs=cl_rngs)

    # 2. which classes each slot attends to
    num_slots = cfg.num_slots if packing is None else packing.slot_labels.shape[1]
    if train:
        float_labels = labels.astype(feats.dtype)
        if cfg.mode == "union":
            selectors = float_labels[:, None, :]
            slot_labels = slot_labels_from_multihot(float_labels, 1)
        else:
            if packing is None:
                slot_labels = slot_labels_from_multihot(float_labels, num_slots)
            else:
                slot_labels = jnp.asarray(packing.slot_labels, jnp.int32)
            selectors = jax.nn.one_hot(slot_labels, float_labels.shape[-1], dtype=feats.dtype)
    else:
        def selectors(logits):  # evaluation attends to the predicted class, in slot 0
            predicted = jnp.argmax(logits, axis=-1)
            one_hot = jax.nn.one_hot(predicted, logits.shape[-1], dtype=logits.dtype)
            return jnp.pad(one_hot[:, None, :], ((0, 0), (0, num_slots - 1), (0, 0)))

    logits_cl, cams = head_gradcams(head_fn, feats, selectors, stop_weight_gradient=cfg.cam_grad == "stop",
                                    cam_method=cfg.cam)
    if not train:
        predicted = jnp.argmax(jax.lax.stop_gradient(logits_cl), axis=-1).astype(jnp.int32)
        slot_labels = jnp.pad(predicted[:, None], ((0, 0), (0, num_slots - 1)), constant_values=-1)
        selectors = jax.nn.one_hot(slot_labels, logits_cl.shape[-1], dtype=logits_cl.dtype)

    # 3-5. upsample, normalize, soft mask, erase
    height, width = images.shape[1:3]
    heatmap = resize_align_corners(cams, (height, width))
    scaled = minmax_normalize(heatmap)
    mask = soft_mask(scaled, cfg.sigma, cfg.omega, cfg.mask)
    fill_image = jnp.asarray(lookup("erase", cfg.erase)(images, cfg.fill), images.dtype)
    if fill_image.ndim == images.ndim:  # one per image: add the slot axis of images[:, None]
        fill_image = fill_image[:, None]
    erase_mask = jax.lax.stop_gradient(mask) if cfg.mask_grad == "stop" else mask
    masked_images = apply_mask(images[:, None], erase_mask, fill_image)

    if not attention_mining:
        return GainOutput(
            logits_cl=logits_cl, heatmap=heatmap, scaled=scaled, mask=mask, masked_images=masked_images,
            logits_am=None, slot_labels=slot_labels, selector=selectors, model_state=model_state, am_slots=None)

    # 6. attention-mining stream: one batched forward over the B*K masked images, BatchNorm as configured
    am_params = jax.lax.stop_gradient(params) if cfg.grads_off else params
    am_variables = {"params": am_params}
    if has_bn:
        # upstream's frozen-BN forward reads the running statistics the classification forward just updated
        am_variables["batch_stats"] = jax.lax.stop_gradient(model_state.get("batch_stats", batch_stats))
    batch = images.shape[0]
    flat_masked = masked_images.reshape((batch * num_slots,) + masked_images.shape[2:])
    am_forward = AM_FORWARDS[cfg.am_batchnorm]
    if packing is None:
        logits_am = am_forward(model, am_variables, flat_masked, train, am_rngs)
        am_slots = (selectors.sum(axis=-1) > 0).astype(logits_cl.dtype)
    else:
        packed_logits = am_forward(model, am_variables, flat_masked[packing.rows], train, am_rngs)
        # back to [B*K, C]; the rows are distinct except the weight-0 copies, and slots without a row stay 0
        weights = jnp.asarray(packing.row_valid, packed_logits.dtype)
        logits_am = jnp.zeros((batch * num_slots, packed_logits.shape[-1]), packed_logits.dtype)
        logits_am = logits_am.at[packing.rows].add(packed_logits * weights[:, None])
        # the slots L_am averages: those with a row (all real pairs, or the sampled ones)
        am_slots = jnp.zeros((batch * num_slots,), weights.dtype).at[packing.rows].add(weights)
        am_slots = am_slots.reshape((batch, num_slots))
    logits_am = logits_am.reshape((batch, num_slots, -1))

    return GainOutput(
        logits_cl=logits_cl, heatmap=heatmap, scaled=scaled, mask=mask, masked_images=masked_images,
        logits_am=logits_am, slot_labels=slot_labels, selector=selectors, model_state=model_state,
        am_slots=am_slots)


def _safe_divide(numerator, denominator):
    return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1e-30), 0.0)


def extra_supervision_loss(scaled: jax.Array, selector: jax.Array, gt_masks: jax.Array,
                           has_mask: jax.Array | None = None, ignore_index: int = 255) -> jax.Array:
    """GAIN_ext: mean over images with a mask of the mean squared error between each slot's scaled map and
    the ground-truth mask of the classes the slot attends to.

    gt_masks ``[B,H,W]`` VOC encoding (0 background, c + 1 for class c, `ignore_index` ignored);
    pixels marked ignore are left out of each map's mean; padded slots (zero selector) are left out of the
    image's mean.
    """
    num_classes = selector.shape[-1]
    gt = gt_masks.astype(jnp.int32)
    valid_pixel = (gt != ignore_index).astype(scaled.dtype)
    pixel_class = gt - 1
    is_object = (pixel_class >= 0) & (pixel_class < num_classes)
    # target[b,k,h,w] = selector[b,k,class of pixel (b,h,w)]
    class_onehot = jax.nn.one_hot(jnp.where(is_object, pixel_class, -1), num_classes, dtype=scaled.dtype)
    target = jnp.einsum("bhwc,bkc->bkhw", class_onehot, (selector > 0).astype(scaled.dtype))
    squared_error = jnp.square(scaled - target) * valid_pixel[:, None]
    per_map = _safe_divide(squared_error.sum(axis=(-2, -1)), valid_pixel.sum(axis=(-2, -1))[:, None])
    valid_slot = (selector.sum(axis=-1) > 0).astype(scaled.dtype)
    per_image = _safe_divide((per_map * valid_slot).sum(axis=-1), valid_slot.sum(axis=-1))
    weight = jnp.ones_like(per_image) if has_mask is None else has_mask.astype(scaled.dtype)
    return _safe_divide((per_image * weight).sum(), weight.sum())


def gain_losses(out: GainOutput, labels: jax.Array, cfg: GainConfig, gt_masks: jax.Array | None = None,
                has_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """The loss terms and their weighted total: {"cl", "am", "ex", "total"} (scalars).

    cl: BCE-with-logits averaged over batch and classes (the paper's multi-label soft-margin loss).
    am: mean over images of `sum over attended (slot, class) of score(logits_am[slot])_class / n`, with
        `score` = `cfg.score` (upstream: softmax), n the
        number of attended (slot, class) pairs: union mode sums the image's labels on its one masked image,
        per-label mode each slot's own class on its own masked image; padded slots contribute nothing, and
        only the slots of `out.am_slots` count (with sampled pairs: the mean over each image's sampled
        labels, an unbiased estimate of the mean over all of them).
    ex: `extra_supervision_loss` when `gt_masks` is given (images with `has_mask` False excluded), else 0.
    Without the attention-mining stream (`out.logits_am` None) am is NaN, "not computed", and the total leaves
    it out, which needs `cfg.am_weight` 0.
    """
    if labels is None:
        raise ValueError("gain_losses needs labels for the classification loss")
    logits_cl = out.logits_cl
    cl = optax.sigmoid_binary_cross_entropy(logits_cl, labels.astype(logits_cl.dtype)).mean()

    if out.logits_am is None:
        if cfg.am_weight:
            raise ValueError(f"gain_losses: am_weight {cfg.am_weight} needs the attention-mining stream "
                             "(gain_forward(attention_mining=True))")
        am = jnp.full((), jnp.nan, cl.dtype)
    else:
        am_scores = AM_SCORES[cfg.score](out.logits_am)
        attended = out.selector.astype(am_scores.dtype)
        if out.am_slots is not None:  # slots sampled out of the attention-mining stream count in neither sum
            attended = attended * out.am_slots.astype(am_scores.dtype)[..., None]
        per_image = _safe_divide((am_scores * attended).sum(axis=(1, 2)), attended.sum(axis=(1, 2)))
        am = per_image.mean()

    if gt_masks is None:
        ex = jnp.zeros((), cl.dtype)
    else:
        ex = extra_supervision_loss(out.scaled, out.selector, gt_masks, has_mask)
    terms = {"cl": cl, "am": am, "ex": ex}
    return {**terms, "total": total_loss(terms, cfg)}


def total_loss(terms: Mapping[str, jax.Array], cfg: GainConfig, attention_on=1.0, mining_on=1.0) -> jax.Array:
    """The loss GAIN optimizes:
    `cl_weight * cl + attention_on * (mining_on * am_weight * am + ex_weight * ex)`.

    `attention_on` (0 or 1, may be traced) switches attention mining and extra supervision on after the
    classification-only pre-training, without a recompile; `mining_on` (0 or 1, may be traced) switches
    attention mining alone, so that it can start after the extra supervision (TrainConfig.am_start_epoch).
    With `cfg.am_weight` 0 the am term is left out (it may be NaN: not computed).
    """
    dtype = terms["cl"].dtype
    attention_on = jnp.asarray(attention_on, dtype)
    if not cfg.am_weight:
        return cfg.cl_weight * terms["cl"] + attention_on * (cfg.ex_weight * terms["ex"])
    am_weight = jnp.asarray(mining_on, dtype) * cfg.am_weight
    return cfg.cl_weight * terms["cl"] + attention_on * (am_weight * terms["am"] + cfg.ex_weight * terms["ex"])
