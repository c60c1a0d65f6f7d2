"""GAIN's extension points: small pure functions in registries, chosen by name in `GainConfig`.

Each registry maps a name to a function; `GainConfig(cam="layercam", score="sigmoid")` picks entries by
name, so a variant is a configuration, not a fork. Five kinds:

    CAM_METHODS     cam(feats [B,h,w,c], feat_grads [B,h,w,c]) -> cam [B,h,w]        (GainConfig.cam)
                    The class activation map at the Grad-CAM layer, before upsampling and min-max, from
                    the layer's activations and the gradient of the attended score w.r.t. them.
    MASK_FUNCTIONS  mask(scaled [...,H,W], sigma, omega) -> mask [...,H,W] in [0, 1]   (GainConfig.mask)
                    Which part of the image the attention-mining stream erases.
    ERASE_FILLS     fill_image(images [B,H,W,3], fill) -> broadcastable to images        (GainConfig.erase)
                    What the erased region is replaced by: the erased image is x - x*T + T*fill_image
                    (`fill` is GainConfig.fill, a scalar or one value per channel).
    AM_SCORES       score(logits_am [...,C]) -> scores [...,C]                         (GainConfig.score)
                    What L_am minimizes for the attended classes on the erased image.
    AM_FORWARDS     forward(model, variables, images, train, rngs) -> logits [N,C]     (GainConfig.am_batchnorm)
                    The attention-mining stream's forward pass; the entries differ in BatchNorm handling.

Register your own without editing the package, before building the `GainConfig` that names it:

    >>> import jax.numpy as jnp, gain_jax as gj
    >>> @gj.register("cam", "abs_gradcam")
    ... def abs_gradcam(feats, feat_grads):
    ...     return jnp.einsum("bhwc,bc->bhw", feats, jnp.abs(feat_grads).mean(axis=(1, 2)))
    >>> cfg = gj.GainConfig(cam="abs_gradcam")

The CAM methods follow pytorch-grad-cam (Gildenblat et al.) and agree with it to float64 roundoff on the
raw low-resolution map (parity_tests/test_parity_cam_methods.py), eps values included. Every function here
is pure, jit- and vmap-able, and computes in the dtype of its inputs.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

CAM_METHODS: dict[str, Callable] = {}
MASK_FUNCTIONS: dict[str, Callable] = {}
AM_SCORES: dict[str, Callable] = {}
AM_FORWARDS: dict[str, Callable] = {}
ERASE_FILLS: dict[str, Callable] = {}
REGISTRIES: dict[str, dict[str, Callable]] = {
    "cam": CAM_METHODS, "mask": MASK_FUNCTIONS, "score": AM_SCORES, "am_batchnorm": AM_FORWARDS,
    "erase": ERASE_FILLS}


def register(kind: str, name: str, fn: Callable | None = None):
    """Add `fn` to the registry of `kind` ("cam", "mask", "score", "am_batchnorm" or "erase") under `name`.

    Use as a decorator (`@register("cam", "mine")`) or call (`register("cam", "mine", fn)`); returns `fn`.
    Registering a name that exists replaces it only when it is the same function (re-imports).
    """
    if kind not in REGISTRIES:
        raise ValueError(f"unknown variant kind {kind!r}; choose from {', '.join(REGISTRIES)}")

    def add(function: Callable) -> Callable:
        registry = REGISTRIES[kind]
        existing = registry.get(name)
        if existing is not None and getattr(existing, "__qualname__", None) != getattr(function, "__qualname__", 0):
            raise ValueError(f"a {kind} variant named {name!r} is registered already ({existing!r})")
        registry[name] = function
        return function

    return add if fn is None else add(fn)


def lookup(kind: str, name: str) -> Callable:
    """The function registered as `name` under `kind`, or ValueError listing the choices."""
    registry = REGISTRIES[kind]
    if name not in registry:
        raise ValueError(f"unknown {kind} variant {name!r}; choose from {', '.join(sorted(registry))}")
    return registry[name]


# ---------------------------------------------------------------------------------------------- CAM methods
# feats, feat_grads: [B, h, w, c] (NHWC); the spatial axes are 1 and 2. Each returns relu(cam) [B, h, w],
# the map pytorch-grad-cam computes before its resize and min-max.

def _weighted_sum(feats, channel_weights):
    return jax.nn.relu(jnp.einsum("bhwc,bc->bhw", feats, channel_weights))


@register("cam", "gradcam")
def grad_cam(feats, feat_grads):
    """Grad-CAM (Selvaraju et al., 2017), GAIN's choice: channel weights are the mean gradient."""
    return _weighted_sum(feats, jnp.mean(feat_grads, axis=(1, 2)))


@register("cam", "gradcam_pp")
def grad_cam_plus_plus(feats, feat_grads):
    """Grad-CAM++ (Chattopadhyay et al., 2018, eq. 19 with exponentials dropped, as pytorch-grad-cam):
    weights = sum_hw relu(g) * g^2 / (2 g^2 + sum_hw(A) g^3 + 1e-6), zero where g == 0."""
    grads_squared = feat_grads ** 2
    grads_cubed = grads_squared * feat_grads
    sum_activations = jnp.sum(feats, axis=(1, 2), keepdims=True)
    alpha = grads_squared / (2 * grads_squared + sum_activations * grads_cubed + 1e-6)
    alpha = jnp.where(feat_grads != 0, alpha, 0)
    return _weighted_sum(feats, jnp.sum(jax.nn.relu(feat_grads) * alpha, axis=(1, 2)))


@register("cam", "xgradcam")
def x_grad_cam(feats, feat_grads):
    """XGrad-CAM (Fu et al., 2020): weights = sum_hw(g * A) / (sum_hw(A) + 1e-7)."""
    sum_activations = jnp.sum(feats, axis=(1, 2), keepdims=True)
    return _weighted_sum(feats, jnp.sum(feat_grads * feats / (sum_activations + 1e-7), axis=(1, 2)))


@register("cam", "layercam")
def layer_cam(feats, feat_grads):
    """LayerCAM (Jiang et al., 2021): sum_c relu(g) * A, a per-position weight instead of a per-channel one."""
    return jax.nn.relu(jnp.sum(jax.nn.relu(feat_grads) * feats, axis=-1))


@register("cam", "hirescam")
def hires_cam(feats, feat_grads):
    """HiResCAM (Draelos and Carin, 2020): sum_c g * A, faithful to the score for a linear head."""
    return jax.nn.relu(jnp.sum(feat_grads * feats, axis=-1))


# ---------------------------------------------------------------------------------------------- soft masks

@register("mask", "sigmoid")
def sigmoid_mask(scaled, sigma, omega):
    """GAIN's differentiable threshold (upstream): T = sigmoid(omega * (scaled - sigma))."""
    return jax.nn.sigmoid(omega * (scaled - sigma))


@register("mask", "straight_through")
def straight_through_mask(scaled, sigma, omega):
    """A hard threshold `scaled > sigma` in the forward pass with the sigmoid mask's gradient (straight-
    through estimator): the erased region has sharp edges and is fully erased, yet L_am still trains it."""
    soft = jax.nn.sigmoid(omega * (scaled - sigma))
    hard = (scaled > sigma).astype(scaled.dtype)
    return soft + jax.lax.stop_gradient(hard - soft)


# ---------------------------------------------------------------------------------------------- erase fills
# images: [B, H, W, 3] (NHWC). Each returns what the erased region takes, broadcastable to images; a result
# with the batch axis ([B, H, W, 3]) is per image, and gain_forward inserts the slot axis after it.

@register("erase", "constant")
def constant_fill(images, fill):
    """Upstream: the erased region takes the constant `fill` (a scalar or one value per channel)."""
    del images  # the same value everywhere, whatever the image
    return fill


@register("erase", "shift")
def shifted_image_fill(images, fill):
    """The image itself, rolled circularly by half its height and half its width: the erased region takes
    other content of the same image (mostly background where objects are small), so no flat patch marks
    the erased image. `fill` is ignored."""
    del fill
    height, width = images.shape[-3:-1]  # counted from the end, so that it also works under vmap
    return jnp.roll(images, (height // 2, width // 2), axis=(-3, -2))


# ---------------------------------------------------------------------------------------------- L_am scores

@register("score", "softmax")
def softmax_score(logits):
    """Upstream: the softmax probability of the attended class on the erased image (single-label view)."""
    return jax.nn.softmax(logits, axis=-1)


@register("score", "sigmoid")
def sigmoid_score(logits):
    """Each class's own sigmoid probability: the multi-label view, matching the classification loss."""
    return jax.nn.sigmoid(logits)


# ---------------------------------------------------------------------------------------------- AM forwards
# `variables` hold the params (gradient-stopped with grads_off) and, for BatchNorm models, the running
# statistics the classification forward just updated. `train` switches dropout (and for "batch", BatchNorm).

@register("am_batchnorm", "frozen")
def frozen_batchnorm_forward(model, variables, images, train, rngs):
    """Upstream's FreezedBnModel: BatchNorm on running statistics, no update, no gradient to scale/bias."""
    return model.apply(variables, images, train=train, freeze_bn=True, rngs=rngs)


@register("am_batchnorm", "batch")
def batch_statistics_forward(model, variables, images, train, rngs):
    """BatchNorm normalizes with the erased images' own batch statistics (training only; evaluation uses
    the running ones) and trains scale/bias; the running statistics are not updated by this stream."""
    if not train or "batch_stats" not in variables:
        return model.apply(variables, images, train=train, rngs=rngs)
    logits, _ = model.apply(variables, images, train=True, rngs=rngs, mutable=["batch_stats"])
    return logits
