"""Flax backbones with torchvision's exact layouts: VGG16/19, ResNet18/50 and a small CNN (with or without BN).

Every model is a `flax.linen` module built with `setup()`, so that its three entry points are all
reachable through `model.apply(..., method=...)`:

    feats  = model.apply(variables, images, train=False, method="features")  # Grad-CAM layer
    logits = model.apply(variables, feats, train=False, method="head")
    logits = model.apply(variables, images, train=False)                     # head(features(x))

Images are NHWC. Keyword arguments of all three entry points:

    train      dropout active (needs rngs={"dropout": key} when dropout_rate > 0) and BatchNorm
               normalizes with batch statistics and updates "batch_stats" (pass mutable=["batch_stats"]).
    freeze_bn  BatchNorm uses its running statistics, does not update them and passes no gradient to
               its scale/bias, whatever `train` says; dropout still follows `train`. This is the
               attention-mining stream of GAIN (upstream's FreezedBnModel).

Numerics follow torch so that `gain_jax.convert.from_torchvision` reproduces torchvision's logits:
explicit symmetric padding, floor-mode pools, ResNet's 3x3/s2/p1 max-pool padded with -inf,
torch's AdaptiveAvgPool2d bins, and a BatchNorm with torch's running-statistics update. The compute
dtype follows the params and inputs (float64 end to end when both are float64 under jax_enable_x64).
Three computations are written for XLA:CPU's sake, with the same results: the 2x2 max pool has its own
backward (and reads its windows as strided views at up to 16 channels); a convolution whose output is smaller
than its kernel is a matrix product over patches; and the input gradient of a convolution with at most 16
channels on both sides is a matrix product with the kernel, scattered back onto the pixels
(`conv_general_dilated`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

Dtype = Any

__all__ = [
    "MODEL_NAMES",
    "BatchNorm",
    "VGG",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "SmallCNN",
    "adaptive_avg_pool",
    "cam_layer_size",
    "min_image_size",
    "build_model",
    "torch_linear_init",
    "VGG_CFGS",
    "SMALL_CNN_WIDTHS",
    "SMALL_CNN_BATCHNORM",
    "SMALL_CNN_POOLS",
]

# torchvision's VGG configurations: an int is a 3x3 conv (padding 1) + ReLU, "M" a 2x2/s2 max-pool.
VGG_CFGS = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
# (block kind, blocks per stage) as in torchvision.models.resnet18 / resnet50.
RESNET_CFGS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
# Must equal gain_torch_ref.small_cnn.WIDTHS (a test checks it; the core may not import torch).
SMALL_CNN_WIDTHS = (16, 32, 64, 128)
# small_cnn_nobn: SmallCNN(batchnorm=False), for ablating BatchNorm's role in the attention-mining stream;
# small_cnn_fine: SmallCNN(pools=2), small_cnn with its last max-pool dropped (stride 4, not 8): a Grad-CAM grid
# twice as fine (28x28 at 112 px), for gain_parts, whose parts are smaller than one of small_cnn's 8-px cells
SMALL_CNN_BATCHNORM = {"small_cnn": True, "small_cnn_nobn": False, "small_cnn_fine": True}
SMALL_CNN_POOLS = {"small_cnn": 3, "small_cnn_nobn": 3, "small_cnn_fine": 2}
MODEL_NAMES = tuple(VGG_CFGS) + tuple(RESNET_CFGS) + tuple(SMALL_CNN_BATCHNORM)

VGG_POOL_SIZE = 7  # torchvision's AdaptiveAvgPool2d((7, 7)) in front of the classifier


# ----------------------------------------------------------------------------------------------
# initializers (torch's defaults, so that training from scratch starts like torchvision)

def torch_linear_init(fan_in: int) -> Callable:
    """torch's default nn.Linear / nn.Conv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"): an untruncated normal.
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# ----------------------------------------------------------------------------------------------
# layers

class BatchNorm(nn.Module):
    """BatchNorm2d with torch's semantics over the channel (last) axis.

    Train mode normalizes with the biased batch variance and updates the running statistics with
    torch's momentum convention, using the unbiased variance (n / (n - 1), n = B*H*W):
    running = (1 - momentum) * running + momentum * batch.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, use_running_average: bool, freeze_params: bool = False):
        num_features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (num_features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (num_features,), self.param_dtype)
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((num_features,), self.param_dtype))
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((num_features,), self.param_dtype))
        if freeze_params:
            scale, bias = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(bias)

        if use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            reduce_axes = tuple(range(x.ndim - 1))
            count = math.prod(x.shape[:-1])
            if count < 2:
                raise ValueError(
                    f"BatchNorm in train mode needs more than 1 value per channel, got input shape "
                    f"{x.shape} (as torch: use a larger batch or image, or train=False)")
            mean = jnp.mean(x, axis=reduce_axes)
            var = jnp.mean(jnp.square(x - mean), axis=reduce_axes)  # biased, for normalization
            if not self.is_initializing():
                unbiased_var = var * (count / (count - 1))
                keep = 1.0 - self.momentum
                # cast back to the stored dtype so the state keeps its dtype across steps
                running_mean.value = (keep * running_mean.value + self.momentum * mean).astype(
                    running_mean.value.dtype)
                running_var.value = (keep * running_var.value + self.momentum * unbiased_var).astype(
                    running_var.value.dtype)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")
# XLA:CPU (jaxlib 0.10) hands a convolution to YNNPACK only when one of its channel counts exceeds this; the
# rest go to its Eigen kernel, whose input gradient of a 3-channel first layer is its slowest op.
_EIGEN_MAX_CHANNELS = 16


def conv_general_dilated(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
    """`lax.conv_general_dilated`, with two NHWC/HWIO convolutions computed as matrix products over patches
    (the same sums, in another order), where XLA:CPU's own kernels are slow:

    - a convolution whose output is smaller than its kernel (ResNet's layer4 on 64-pixel images: 2x2 outputs
      of 3x3 kernels) is one product over explicitly gathered patches. XLA:CPU does not hand these to
      YNNPACK, and its fallback kernel is much slower than the product (bench/README.md, "Tiny convolutions").
    - a convolution with at most 16 channels on both sides (small_cnn's first layer, 3 -> 16) keeps lax's
      forward and weight gradient, but its input gradient is the product of the output gradient with the
      kernel, scattered back onto the input's pixels (`_narrow_conv`); XLA:CPU computes that gradient with a
      16 -> 3 channel Eigen convolution, several times slower (bench/README.md, "Small convolutions").

    Every other convolution, and any dilated, grouped, negatively padded or non-NHWC/HWIO one, goes to lax
    unchanged.
    """
    simple = (lhs.ndim == 4 and rhs.ndim == 4 and feature_group_count == 1
              and all(d == 1 for d in (lhs_dilation or (1,))) and all(d == 1 for d in (rhs_dilation or (1,)))
              and not isinstance(padding, str) and min(min(pair) for pair in padding) >= 0
              and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO))
    if simple:
        kernel_height, kernel_width, in_features, out_features = rhs.shape
        (pad_top, pad_bottom), (pad_left, pad_right) = padding
        stride_h, stride_w = window_strides
        out_height = (lhs.shape[1] + pad_top + pad_bottom - kernel_height) // stride_h + 1
        out_width = (lhs.shape[2] + pad_left + pad_right - kernel_width) // stride_w + 1
        # an empty output is lax's to refuse, with its own message
        simple = min(out_height, out_width) >= 1
    if simple and (out_height < kernel_height or out_width < kernel_width):
        padded = jnp.pad(lhs, ((0, 0), (pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
        patches = _patches(padded, kernel_height, kernel_width, out_height, out_width, stride_h, stride_w)
        weights = rhs.reshape(kernel_height * kernel_width * in_features, out_features)
        return jnp.dot(patches, weights, precision=precision)
    if simple and max(in_features, out_features) <= _EIGEN_MAX_CHANNELS:
        return _narrow_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision)


def _patches(padded, kernel_height, kernel_width, out_height, out_width, stride_h, stride_w):
    """[B, H, W, C] (already padded) -> [B, out_height, out_width, kernel_height * kernel_width * C], the
    window of each output pixel flattened as (row, col, channel), HWIO's order."""
    taps = [padded[:, row:row + stride_h * (out_height - 1) + 1:stride_h,
                   col:col + stride_w * (out_width - 1) + 1:stride_w]
            for row in range(kernel_height) for col in range(kernel_width)]
    return jnp.stack(taps, axis=3).reshape(*taps[0].shape[:3], -1)


def _lax_conv(lhs, rhs, strides, padding, precision):
    return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=_NHWC_HWIO, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _narrow_conv(lhs, rhs, strides, padding, precision):
    """lax's NHWC/HWIO convolution; its input gradient is a matrix product and a scatter of the kernel taps."""
    return _lax_conv(lhs, rhs, strides, padding, precision)


def _narrow_conv_forward(lhs, rhs, strides, padding, precision):
    return _lax_conv(lhs, rhs, strides, padding, precision), (lhs, rhs)


def _narrow_conv_backward(strides, padding, precision, residuals, out_grad):
    lhs, rhs = residuals
    kernel_height, kernel_width, in_features, out_features = rhs.shape
    (pad_top, pad_bottom), (pad_left, pad_right) = padding
    stride_h, stride_w = strides
    _, out_height, out_width, _ = out_grad.shape
    _, kernel_vjp = jax.vjp(lambda kernel: _lax_conv(lhs, kernel, strides, padding, precision), rhs)
    (rhs_grad,) = kernel_vjp(out_grad)
    # each output pixel's gradient times the kernel: the gradient of its window, (row, col, channel) flattened
    window_grads = jnp.dot(out_grad, rhs.reshape(-1, out_features).T, precision=precision)
    padded_height = lhs.shape[1] + pad_top + pad_bottom
    padded_width = lhs.shape[2] + pad_left + pad_right
    zero = jnp.zeros((), out_grad.dtype)
    padded_grad = None
    for row in range(kernel_height):
        for col in range(kernel_width):
            tap = (row * kernel_width + col) * in_features
            # the tap's gradients onto the pixels it read: at row + stride * i, col + stride * j
            placed = lax.pad(window_grads[..., tap:tap + in_features], zero, (
                (0, 0, 0),
                (row, padded_height - row - stride_h * (out_height - 1) - 1, stride_h - 1),
                (col, padded_width - col - stride_w * (out_width - 1) - 1, stride_w - 1),
                (0, 0, 0)))
            padded_grad = placed if padded_grad is None else padded_grad + placed
    lhs_grad = padded_grad[:, pad_top:pad_top + lhs.shape[1], pad_left:pad_left + lhs.shape[2]]
    return lhs_grad, rhs_grad


_narrow_conv.defvjp(_narrow_conv_forward, _narrow_conv_backward)


def _conv(features, kernel_size, *, strides=1, padding=0, use_bias=True, kernel_init, bias_init=None,
          param_dtype):
    """A torch-style Conv2d: symmetric explicit padding (never "SAME")."""
    kwargs = {} if bias_init is None else {"bias_init": bias_init}
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                   padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                   kernel_init=kernel_init, param_dtype=param_dtype, conv_general_dilated=conv_general_dilated,
                   **kwargs)


def _max_pool_2x2(x):
    """torch MaxPool2d(2): floor mode, i.e. a trailing odd row/column is dropped (the slice's gradient is 0)."""
    height, width = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return _max_pool_2x2_even(x[:, :height, :width])


# The pool reads its windows as strided views up to this many channels, as a transposed window axis above it:
# at 16 channels XLA:CPU's copy of the transposed windows cost more than the pool, at 32 and more the strided
# reads are the slower (bench/README.md, "Small convolutions").
_STRIDED_POOL_MAX_CHANNELS = 16


def _pool_quarters(x):
    """[B, H, W, C] with even H, W -> the four [B, H/2, W/2, C] pixels of each 2x2 window, in row-major order:
    strided views of a free reshape, which XLA fuses into the reading loop."""
    batch, height, width, channels = x.shape
    grid = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
    return grid[:, :, 0, :, 0], grid[:, :, 0, :, 1], grid[:, :, 1, :, 0], grid[:, :, 1, :, 1]


def _pool_windows(x):
    """[B, H, W, C] with even H, W -> [B, H/2, W/2, C, 4], each window's pixels in row-major order."""
    batch, height, width, channels = x.shape
    windows = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
    return windows.transpose(0, 1, 3, 5, 2, 4).reshape(batch, height // 2, width // 2, channels, 4)


# A max pool with its own backward. flax's max_pool lowers to reduce-window, whose gradient XLA:CPU builds
# from four activation-sized index arrays and a scatter, a large share of a small_cnn step
# (bench/profiles/per_label_cpu.md). The gradient goes to the first maximum of each window in row-major
# order, as in torch (and in XLA's select-and-scatter), so ties (ReLU zeros) give identical gradients.
@jax.custom_vjp
def _max_pool_2x2_even(x):
    return _max_pool_2x2_even_forward(x)[0]


def _max_pool_2x2_even_forward(x):
    """The pooled map and the position (0..3, row-major; int8 keeps the residual small) of each window's first
    maximum."""
    if x.shape[-1] > _STRIDED_POOL_MAX_CHANNELS:
        windows = _pool_windows(x)
        return windows.max(axis=-1), jnp.argmax(windows, axis=-1).astype(jnp.int8)
    top_left, top_right, bottom_left, bottom_right = _pool_quarters(x)
    pooled = jnp.maximum(jnp.maximum(top_left, top_right), jnp.maximum(bottom_left, bottom_right))
    first_max = jnp.where(top_left == pooled, 0, jnp.where(top_right == pooled, 1,
                                                            jnp.where(bottom_left == pooled, 2, 3)))
    return pooled, first_max.astype(jnp.int8)


def _max_pool_2x2_even_backward(first_max, pooled_grad):
    batch, half_height, half_width, channels = pooled_grad.shape
    if channels > _STRIDED_POOL_MAX_CHANNELS:
        window_grads = jax.nn.one_hot(first_max, 4, dtype=pooled_grad.dtype) * pooled_grad[..., None]
        grads = window_grads.reshape(batch, half_height, half_width, channels, 2, 2).transpose(0, 1, 4, 2, 5, 3)
        return (grads.reshape(batch, 2 * half_height, 2 * half_width, channels),)
    # [B, H/2, 2, W/2, 2, C] is [B, H, W, C] in memory: one elementwise loop, no transpose
    positions = (2 * np.arange(2)[:, None] + np.arange(2)[None, :]).astype(np.int8)[:, None, :, None]
    grads = jnp.where(first_max[:, :, None, :, None, :] == positions, pooled_grad[:, :, None, :, None, :],
                      jnp.zeros((), pooled_grad.dtype))
    return (grads.reshape(batch, 2 * half_height, 2 * half_width, channels),)


_max_pool_2x2_even.defvjp(_max_pool_2x2_even_forward, _max_pool_2x2_even_backward)


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] averaging matrix of torch's AdaptiveAvgPool: bin i = [floor(i*in/out), ceil((i+1)*in/out))."""
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x, output_size: tuple[int, int]):
    """torch's AdaptiveAvgPool2d on NHWC for any input size (smaller than, or not a multiple of, the output)."""
    rows = jnp.asarray(_adaptive_pool_matrix(x.shape[1], output_size[0]), dtype=x.dtype)
    cols = jnp.asarray(_adaptive_pool_matrix(x.shape[2], output_size[1]), dtype=x.dtype)
    return jnp.einsum("ih,jw,bhwc->bijc", rows, cols, x)


def _global_avg_pool(x):
    return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------------------
# VGG

class VGG(nn.Module):
    """torchvision's VGG without BatchNorm (cfg D = vgg16, E = vgg19).

    Params: conv_0..conv_{n-1} (the 3x3 convs in order), fc_0, fc_1, fc_2 (the classifier Linears).
    fc_0's kernel rows are ordered as the NHWC flatten (7, 7, C) of the pooled map.
    """

    cfg: Sequence[int | str]
    num_classes: int
    dropout_rate: float = 0.5
    param_dtype: Dtype = jnp.float32

    def setup(self):
        widths = [v for v in self.cfg if v != "M"]
        self.conv = [
            _conv(w, 3, padding=1, kernel_init=_kaiming_fan_out, bias_init=nn.initializers.zeros,
                  param_dtype=self.param_dtype)
            for w in widths
        ]
        linear_init = nn.initializers.normal(0.01)  # torchvision: N(0, 0.01), bias 0
        self.fc = [
            nn.Dense(4096, kernel_init=linear_init, param_dtype=self.param_dtype),
            nn.Dense(4096, kernel_init=linear_init, param_dtype=self.param_dtype),
            nn.Dense(self.num_classes, kernel_init=linear_init, param_dtype=self.param_dtype),
        ]
        self.dropout = nn.Dropout(self.dropout_rate)

    def features(self, x, *, train: bool = False, freeze_bn: bool = False):
        del train, freeze_bn  # no dropout nor BatchNorm in the conv stack
        conv_index = 0
        for v in self.cfg:
            if v == "M":
                x = _max_pool_2x2(x)
            else:
                x = nn.relu(self.conv[conv_index](x))
                conv_index += 1
        return x

    def head(self, feats, *, train: bool = False, freeze_bn: bool = False):
        del freeze_bn
        x = adaptive_avg_pool(feats, (VGG_POOL_SIZE, VGG_POOL_SIZE))
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(nn.relu(self.fc[0](x)), deterministic=not train)
        x = self.dropout(nn.relu(self.fc[1](x)), deterministic=not train)
        return self.fc[2](x)

    def __call__(self, x, *, train: bool = False, freeze_bn: bool = False):
        return self.head(self.features(x, train=train, freeze_bn=freeze_bn), train=train, freeze_bn=freeze_bn)


# ----------------------------------------------------------------------------------------------
# ResNet

class BasicBlock(nn.Module):
    """torchvision's BasicBlock: 3x3 (stride) - BN - ReLU - 3x3 - BN, + identity or 1x1 projection."""

    planes: int
    strides: int = 1
    downsample: bool = False
    param_dtype: Dtype = jnp.float32

    expansion = 1

    def setup(self):
        conv = dict(use_bias=False, kernel_init=_kaiming_fan_out, param_dtype=self.param_dtype)
        self.conv1 = _conv(self.planes, 3, strides=self.strides, padding=1, **conv)
        self.bn1 = BatchNorm(param_dtype=self.param_dtype)
        self.conv2 = _conv(self.planes, 3, padding=1, **conv)
        self.bn2 = BatchNorm(param_dtype=self.param_dtype)
        if self.downsample:
            self.downsample_conv = _conv(self.planes * self.expansion, 1, strides=self.strides, **conv)
            self.downsample_bn = BatchNorm(param_dtype=self.param_dtype)

    def __call__(self, x, *, use_running_average: bool, freeze_params: bool):
        bn = dict(use_running_average=use_running_average, freeze_params=freeze_params)
        out = nn.relu(self.bn1(self.conv1(x), **bn))
        out = self.bn2(self.conv2(out), **bn)
        identity = self.downsample_bn(self.downsample_conv(x), **bn) if self.downsample else x
        return nn.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck ("v1.5": the stride sits on the 3x3 conv): 1x1 - 3x3 (stride) - 1x1 (x4)."""

    planes: int
    strides: int = 1
    downsample: bool = False
    param_dtype: Dtype = jnp.float32

    expansion = 4

    def setup(self):
        conv = dict(use_bias=False, kernel_init=_kaiming_fan_out, param_dtype=self.param_dtype)
        self.conv1 = _conv(self.planes, 1, **conv)
        self.bn1 = BatchNorm(param_dtype=self.param_dtype)
        self.conv2 = _conv(self.planes, 3, strides=self.strides, padding=1, **conv)
        self.bn2 = BatchNorm(param_dtype=self.param_dtype)
        self.conv3 = _conv(self.planes * self.expansion, 1, **conv)
        self.bn3 = BatchNorm(param_dtype=self.param_dtype)
        if self.downsample:
            self.downsample_conv = _conv(self.planes * self.expansion, 1, strides=self.strides, **conv)
            self.downsample_bn = BatchNorm(param_dtype=self.param_dtype)

    def __call__(self, x, *, use_running_average: bool, freeze_params: bool):
        bn = dict(use_running_average=use_running_average, freeze_params=freeze_params)
        out = nn.relu(self.bn1(self.conv1(x), **bn))
        out = nn.relu(self.bn2(self.conv2(out), **bn))
        out = self.bn3(self.conv3(out), **bn)
        identity = self.downsample_bn(self.downsample_conv(x), **bn) if self.downsample else x
        return nn.relu(out + identity)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """torchvision's ResNet. Params: conv1, bn1, layer{1..4}_{block}, fc; the Grad-CAM layer is layer4."""

    block: str  # "basic" | "bottleneck"
    stage_sizes: Sequence[int]
    num_classes: int
    param_dtype: Dtype = jnp.float32

    def setup(self):
        block_cls = _BLOCKS[self.block]
        self.conv1 = _conv(64, 7, strides=2, padding=3, use_bias=False, kernel_init=_kaiming_fan_out,
                           param_dtype=self.param_dtype)
        self.bn1 = BatchNorm(param_dtype=self.param_dtype)
        in_channels = 64
        stages = []
        for stage, num_blocks in enumerate(self.stage_sizes):
            planes = 64 * 2 ** stage
            blocks = []
            for index in range(num_blocks):
                strides = 2 if (stage > 0 and index == 0) else 1
                downsample = strides != 1 or in_channels != planes * block_cls.expansion
                blocks.append(block_cls(planes, strides, downsample, param_dtype=self.param_dtype))
                in_channels = planes * block_cls.expansion
            stages.append(blocks)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Dense(self.num_classes, kernel_init=torch_linear_init(in_channels),
                           bias_init=torch_linear_init(in_channels), param_dtype=self.param_dtype)

    def features(self, x, *, train: bool = False, freeze_bn: bool = False):
        bn = dict(use_running_average=(not train) or freeze_bn, freeze_params=freeze_bn)
        x = nn.relu(self.bn1(self.conv1(x), **bn))
        # torch's MaxPool2d(3, 2, padding=1): reduce_window pads with the init value, -inf
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, **bn)
        return x

    def head(self, feats, *, train: bool = False, freeze_bn: bool = False):
        del train, freeze_bn  # no dropout in torchvision's ResNet head
        return self.fc(_global_avg_pool(feats))

    def __call__(self, x, *, train: bool = False, freeze_bn: bool = False):
        return self.head(self.features(x, train=train, freeze_bn=freeze_bn), train=train, freeze_bn=freeze_bn)


# ----------------------------------------------------------------------------------------------
# SmallCNN (the twin of gain_torch_ref/small_cnn.py)

class SmallCNN(nn.Module):
    """4 x [3x3 conv (padding 1, bias) - BN - ReLU], a 2x2 max-pool after each but the last;
    head: global average pool, dropout, Dense. Params: conv_0..3, bn_0..3, fc.

    batchnorm=False ("small_cnn_nobn") drops the BN modules: conv goes straight into ReLU, the params are
    conv_0..3 and fc, and there is no "batch_stats" collection (so freeze_bn has nothing to act on).
    pools: max-pools after the first `pools` convolutions only (None: after each but the last). pools=2
    ("small_cnn_fine") keeps the same parameters but a Grad-CAM layer of stride 4, twice as fine, with a
    smaller receptive field (26 px instead of 38); its last convolution runs on four times the pixels."""

    num_classes: int
    dropout_rate: float = 0.5
    widths: Sequence[int] = SMALL_CNN_WIDTHS
    param_dtype: Dtype = jnp.float32
    batchnorm: bool = True
    pools: int | None = None

    def setup(self):
        if self.pools is not None and not 0 <= self.pools < len(self.widths):
            raise ValueError(f"SmallCNN: pools must be in [0, {len(self.widths) - 1}], got {self.pools!r}")
        fan_ins = [3 * 9] + [w * 9 for w in self.widths[:-1]]
        self.conv = [
            _conv(w, 3, padding=1, kernel_init=torch_linear_init(fan_in), bias_init=torch_linear_init(fan_in),
                  param_dtype=self.param_dtype)
            for w, fan_in in zip(self.widths, fan_ins)
        ]
        if self.batchnorm:
            self.bn = [BatchNorm(param_dtype=self.param_dtype) for _ in self.widths]
        self.dropout = nn.Dropout(self.dropout_rate)
        fan_in = self.widths[-1]
        self.fc = nn.Dense(self.num_classes, kernel_init=torch_linear_init(fan_in),
                           bias_init=torch_linear_init(fan_in), param_dtype=self.param_dtype)

    def features(self, x, *, train: bool = False, freeze_bn: bool = False):
        bn = dict(use_running_average=(not train) or freeze_bn, freeze_params=freeze_bn)
        pools = len(self.widths) - 1 if self.pools is None else self.pools
        for index, conv in enumerate(self.conv):
            x = conv(x)
            if self.batchnorm:
                x = self.bn[index](x, **bn)
            x = nn.relu(x)
            if index < pools:
                x = _max_pool_2x2(x)
        return x

    def head(self, feats, *, train: bool = False, freeze_bn: bool = False):
        del freeze_bn
        return self.fc(self.dropout(_global_avg_pool(feats), deterministic=not train))

    def __call__(self, x, *, train: bool = False, freeze_bn: bool = False):
        return self.head(self.features(x, train=train, freeze_bn=freeze_bn), train=train, freeze_bn=freeze_bn)


# ----------------------------------------------------------------------------------------------

def cam_layer_size(name: str, image_size: int) -> int:
    """Side of the Grad-CAM layer (`features` output) for a square `image_size` input; 0 when the input is
    too small for the backbone (VGG's five 2x2 max-pools floor to nothing below 32 pixels)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(MODEL_NAMES)}")
    if name in VGG_CFGS:
        return image_size // 32
    if name in RESNET_CFGS:
        size = image_size
        for _ in range(5):  # the stem conv, the max-pool and three strided stages each halve, rounding up
            size = -(-size // 2)
        return size
    return image_size // 2 ** SMALL_CNN_POOLS[name]


def min_image_size(name: str) -> int:
    """The smallest square input whose Grad-CAM layer is at least 2x2: below it the min-max scaled map of a
    single cell is 0 everywhere, and GAIN's mask is constant."""
    size = 1
    while cam_layer_size(name, size) < 2:
        size += 1
    return size


def build_model(name: str, num_classes: int, dropout_rate: float = 0.5, *,
                param_dtype: Dtype = jnp.float32) -> nn.Module:
    """The backbone `name` ("vgg16", "vgg19", "resnet18", "resnet50", "small_cnn", "small_cnn_nobn",
    "small_cnn_fine") with a `num_classes` head.

    `dropout_rate` applies where torchvision has dropout (VGG's classifier, small_cnn's head); ResNet
    has none. `param_dtype` is the dtype `model.init` creates params in (float64 needs jax_enable_x64);
    the compute dtype follows the params and inputs.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(MODEL_NAMES)}")
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    num_classes = int(num_classes)
    if name in VGG_CFGS:
        return VGG(VGG_CFGS[name], num_classes, dropout_rate, param_dtype=param_dtype)
    if name in RESNET_CFGS:
        block, stage_sizes = RESNET_CFGS[name]
        return ResNet(block, stage_sizes, num_classes, param_dtype=param_dtype)
    pools = SMALL_CNN_POOLS[name]
    return SmallCNN(num_classes, dropout_rate, param_dtype=param_dtype, batchnorm=SMALL_CNN_BATCHNORM[name],
                    pools=None if pools == len(SMALL_CNN_WIDTHS) - 1 else pools)
