"""Grad-CAM and the soft mask of GAIN, as pure functions.

Every function here is shape-polymorphic in the batch, `jax.jit`-able and `jax.vmap`-able, and computes
in the dtype of its inputs (float64 inputs stay float64: the parity suite relies on it).
Layouts: features NHWC ``[B, h, w, c]``; maps ``[..., H, W]``; images NHWC.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gain_jax.variants import lookup

# Upstream normalizes with `sys.float_info.epsilon` (float64 machine epsilon) whatever the dtype, so an
# all-zero cam maps to 0 rather than NaN.
MINMAX_EPS = float(np.finfo(np.float64).eps)


def cam_from_gradients(feats: jax.Array, feat_grads: jax.Array, stop_weight_gradient: bool = True,
                       cam_method: str | Callable = "gradcam") -> jax.Array:
    """The CAM ``[B, h, w]`` of `cam_method` (a name in `gain_jax.CAM_METHODS`, or such a function) from the
    Grad-CAM layer's features and the gradient of the attended score w.r.t. them.

    With `stop_weight_gradient` the gradient-derived terms (Grad-CAM's channel weights) are constants for
    any outer derivative, as in upstream (PyTorch hooks without `create_graph`): the loss gradient reaches
    the network through `feats` only.
    """
    method = lookup("cam", cam_method) if isinstance(cam_method, str) else cam_method
    if stop_weight_gradient:
        feat_grads = jax.lax.stop_gradient(feat_grads)
    return method(feats, feat_grads)


def head_gradcams(
    head_fn: Callable[[jax.Array], jax.Array],
    feats: jax.Array,
    selectors: jax.Array | Callable[[jax.Array], jax.Array],
    stop_weight_gradient: bool = True,
    cam_method: str | Callable = "gradcam",
) -> tuple[jax.Array, jax.Array]:
    """Logits and one CAM per selector, from ONE forward through the head and K VJPs through it.

    `selectors` is ``[B, K, C]`` (slot k of image b selects classes with weights, usually one-hot or
    multi-hot), or a function of the (gradient-stopped) logits returning it, for selections that depend
    on the prediction (evaluation: the argmax class). Only the head is differentiated: the cost is one
    head backward per slot, never a backward through the feature extractor. `cam_method` turns features
    and gradients into the map (`gain_jax.CAM_METHODS`; default Grad-CAM, upstream's).
    Returns ``(logits [B, C], cams [B, K, h, w])``.
    """
    logits, head_vjp = jax.vjp(head_fn, feats)
    if callable(selectors):
        selectors = selectors(jax.lax.stop_gradient(logits))
    selectors = selectors.astype(logits.dtype)

    def one_slot(selector):  # selector [B, C] -> cam [B, h, w]
        (feat_grads,) = head_vjp(selector)
        return cam_from_gradients(feats, feat_grads, stop_weight_gradient, cam_method)

    cams = jax.vmap(one_slot, in_axes=1, out_axes=1)(selectors)
    return logits, cams


def gradcam(
    head_fn: Callable[[jax.Array], jax.Array],
    feats: jax.Array,
    selector: jax.Array,
    stop_weight_gradient: bool = True,
    cam_method: str | Callable = "gradcam",
) -> jax.Array:
    """Grad-CAM (or another `cam_method`) of `sum_c selector_c * logits_c` at the layer `feats`:
    ``[B, h, w]`` (before upsampling).

    `head_fn` maps the Grad-CAM layer's features ``[B, h, w, c]`` to logits ``[B, C]``; `selector` is
    ``[B, C]``. The gradient w.r.t. `feats` is a VJP through `head_fn` alone.
    """
    _, cams = head_gradcams(head_fn, feats, selector[:, None, :], stop_weight_gradient, cam_method)
    return cams[:, 0]


def _align_corners_matrix(in_size: int, out_size: int, dtype) -> jax.Array:
    """``[out, in]`` linear-interpolation weights with align_corners=True (PyTorch's convention)."""
    if out_size == 1 or in_size == 1:
        src = np.zeros(out_size)
    else:
        src = np.arange(out_size) * ((in_size - 1) / (out_size - 1))
    lower = np.clip(np.floor(src).astype(np.int64), 0, in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = src - lower
    weights = np.zeros((out_size, in_size))
    np.add.at(weights, (np.arange(out_size), lower), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), upper), frac)
    return jnp.asarray(weights, dtype=dtype)


def resize_align_corners(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of ``[..., h, w]`` maps to ``[..., H, W]`` with align_corners=True.

    This is what upstream's `F.upsample_bilinear` does; `jax.image.resize` uses half-pixel centres and
    gives different maps.
    """
    out_h, out_w = size
    rows = _align_corners_matrix(maps.shape[-2], out_h, maps.dtype)
    cols = _align_corners_matrix(maps.shape[-1], out_w, maps.dtype)
    return jnp.einsum("Hh,...hw,Ww->...HW", rows, maps, cols)


def minmax_normalize(maps: jax.Array) -> jax.Array:
    """Per-map `(m - min) / (max - min + eps)` over the last two axes, eps = float64 machine epsilon."""
    low = jnp.min(maps, axis=(-2, -1), keepdims=True)
    high = jnp.max(maps, axis=(-2, -1), keepdims=True)
    return (maps - low) / (high - low + jnp.asarray(MINMAX_EPS, maps.dtype))


def soft_mask(scaled: jax.Array, sigma: float = 0.5, omega: float = 10.0, mask_fn: str | Callable = "sigmoid"
              ) -> jax.Array:
    """GAIN's differentiable threshold, by default upstream's `T = sigmoid(omega * (scaled - sigma))`;
    `mask_fn` names another entry of `gain_jax.MASK_FUNCTIONS` (or is such a function)."""
    function = lookup("mask", mask_fn) if isinstance(mask_fn, str) else mask_fn
    return function(scaled, sigma, omega)


def apply_mask(images: jax.Array, mask: jax.Array, fill=0.0) -> jax.Array:
    """`x - x * T + T * fill`: erase the attended region. images ``[..., H, W, 3]``, mask ``[..., H, W]``.

    `fill`, in the (normalized) image space, is a scalar, one value per channel, or any array broadcastable
    to `images` (e.g. a replacement image from `gain_jax.variants.ERASE_FILLS`); it is cast to images' dtype.
    """
    weight = mask[..., None]
    fill = jnp.asarray(fill, dtype=images.dtype)
    return images - images * weight + weight * fill
