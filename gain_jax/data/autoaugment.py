"""AutoAugment (torchvision's CIFAR10 policy) as TensorFlow ops that move a segmentation mask with the image.

Semantics follow `torchvision.transforms.AutoAugment(AutoAugmentPolicy.CIFAR10)` on uint8 tensors, whose
defaults are nearest interpolation and fill=None (0): one of 25 sub-policies is drawn uniformly; each of its
two ops runs when a uniform draw is `<=` its probability; a signed op is negated when its sign draw is 0;
magnitudes come from 10 bins. Every op works on `image` uint8 [H,W,3] and `mask` uint8 [H,W]; geometric ops
(shear, translate, rotate, and the horizontal flip that follows AutoAugment in the pipeline) resample the
mask with the same nearest-neighbour source indices as the image and fill it with `MASK_FILL` (255, VOC's
"ignore"); colour ops leave the mask alone. All functions trace inside `tf.data` / `tf.function`.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

MASK_FILL = 255
NUM_BINS = 10

# torchvision/transforms/autoaugment.py, AutoAugmentPolicy.CIFAR10: ((op, probability, magnitude bin), x2).
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)

GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
COLOR_OPS = ("Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast",
             "Equalize", "Invert")
SIGNED_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
              "Sharpness")


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: its CPU kernel fills the halves from either end with fused multiply-adds
    (one rounding: exact in float64, then to float32). Checked equal on 4102 ranges."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    values = [np.float64(start32) + step * i if i < steps // 2 else np.float64(end32) - step * (steps - i - 1)
              for i in range(steps)]
    return np.asarray(values, np.float64).astype(np.float32)


def magnitude_bins(op_name: str, height: int, width: int, num_bins: int = NUM_BINS) -> np.ndarray:
    """The magnitudes torchvision's `AutoAugment._augmentation_space(num_bins, (height, width))` gives an op."""
    if op_name in ("ShearX", "ShearY"):
        return _torch_linspace_f32(0.0, 0.3, num_bins)
    if op_name == "TranslateX":
        return _torch_linspace_f32(0.0, 150.0 / 331.0 * width, num_bins)
    if op_name == "TranslateY":
        return _torch_linspace_f32(0.0, 150.0 / 331.0 * height, num_bins)
    if op_name == "Rotate":
        return _torch_linspace_f32(0.0, 30.0, num_bins)
    if op_name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return _torch_linspace_f32(0.0, 0.9, num_bins)
    if op_name == "Posterize":
        return (8 - np.round(np.arange(num_bins) / ((num_bins - 1) / 4))).astype(np.float32)
    if op_name == "Solarize":
        return _torch_linspace_f32(255.0, 0.0, num_bins)
    if op_name in ("AutoContrast", "Equalize", "Invert"):
        return np.zeros(num_bins, np.float32)
    raise ValueError(f"unknown AutoAugment op {op_name!r}; known: {GEOMETRIC_OPS + COLOR_OPS}")


# ---------------------------------------------------------------------------------------------------------
# geometric ops: torchvision's tensor affine = inverse matrix on centred pixel coordinates, then
# grid_sample(nearest, align_corners=False, zero padding); indices here are computed the same way.


def _inverse_affine_matrix(center, angle, translate, shear):
    """torchvision.transforms.functional._get_inverse_affine_matrix (scale 1), on float64 tensors."""
    rot = angle * (math.pi / 180.0)
    sx = shear[0] * (math.pi / 180.0)
    sy = shear[1] * (math.pi / 180.0)
    cx, cy = center
    tx, ty = translate
    a = tf.cos(rot - sy) / tf.cos(sy)
    b = -tf.cos(rot - sy) * tf.tan(sx) / tf.cos(sy) - tf.sin(rot)
    c = tf.sin(rot - sy) / tf.cos(sy)
    d = -tf.sin(rot - sy) * tf.tan(sx) / tf.cos(sy) + tf.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return [m0, m1, m2, m3, m4, m5]


def _static_or_dynamic_hw(image):
    height, width = image.shape[0], image.shape[1]
    dynamic = tf.shape(image)
    return (dynamic[0] if height is None else height), (dynamic[1] if width is None else width)


def affine_nearest(image, mask, matrix, fill=None):
    """Resample image [H,W,C] and mask [H,W] with torchvision's tensor affine convention.

    `matrix`: 6 float64 scalars, the inverse map from output to input in pixel coordinates centred on the
    image centre (what `_get_inverse_affine_matrix` returns). Out-of-image pixels take `fill` (None: 0) in
    the image and MASK_FILL in the mask.
    """
    height, width = _static_or_dynamic_hw(image)
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    theta = tf.cast(tf.stack(matrix), tf.float32)
    # _gen_affine_grid: base grid of centred pixel centres, theta rescaled by (w/2, h/2).
    xs = tf.range(w_f, dtype=tf.float32) - w_f * 0.5 + 0.5
    ys = tf.range(h_f, dtype=tf.float32) - h_f * 0.5 + 0.5
    grid_y, grid_x = tf.meshgrid(ys, xs, indexing="ij")
    half_w, half_h = 0.5 * w_f, 0.5 * h_f
    norm_x = grid_x * (theta[0] / half_w) + grid_y * (theta[1] / half_w) + theta[2] / half_w
    norm_y = grid_x * (theta[3] / half_h) + grid_y * (theta[4] / half_h) + theta[5] / half_h
    # grid_sample, align_corners=False: unnormalize, then nearbyint (= round half to even, as tf.round).
    src_x = tf.round(((norm_x + 1.0) * w_f - 1.0) / 2.0)
    src_y = tf.round(((norm_y + 1.0) * h_f - 1.0) / 2.0)
    inside = (src_x >= 0) & (src_x <= w_f - 1) & (src_y >= 0) & (src_y <= h_f - 1)
    src_x = tf.clip_by_value(tf.cast(src_x, tf.int32), 0, tf.cast(width, tf.int32) - 1)
    src_y = tf.clip_by_value(tf.cast(src_y, tf.int32), 0, tf.cast(height, tf.int32) - 1)
    image_fill = tf.zeros([], image.dtype) if fill is None else tf.cast(fill, image.dtype)
    return _resample(image, mask, src_y, src_x, inside, image_fill)


# XLA compiles only data movement (gathers, selects), where it is exact by construction, at about a third
# of the cost of TensorFlow's gather_nd kernels. The float arithmetic stays in TensorFlow's kernels:
# compiled, it differs from torchvision's in about one pixel per image (the rounding of a few sums).
@tf.function(jit_compile=True)
def _resample(image, mask, src_y, src_x, inside, image_fill):
    """image[src_y, src_x] and mask[src_y, src_x] where inside, else image_fill and MASK_FILL."""
    indices = tf.stack([src_y, src_x], axis=-1)
    warped_image = tf.where(inside[..., None], tf.gather_nd(image, indices), image_fill)
    warped_mask = tf.where(inside, tf.gather_nd(mask, indices), tf.constant(MASK_FILL, mask.dtype))
    return warped_image, warped_mask


@tf.function(jit_compile=True)
def _lookup(table, index):
    """uint8(table[index]): a per-pixel table lookup, compiled (exact: integers only)."""
    return tf.cast(tf.gather(table, index), tf.uint8)


def shear_x(image, mask, magnitude, fill=None):
    height, width = _static_or_dynamic_hw(image)
    zero = tf.constant(0.0, tf.float64)
    center = [-tf.cast(width, tf.float64) * 0.5, -tf.cast(height, tf.float64) * 0.5]  # center=[0, 0]
    shear_deg = tf.atan(tf.cast(magnitude, tf.float64)) * (180.0 / math.pi)
    return affine_nearest(image, mask, _inverse_affine_matrix(center, zero, [zero, zero], [shear_deg, zero]),
                          fill)


def shear_y(image, mask, magnitude, fill=None):
    height, width = _static_or_dynamic_hw(image)
    zero = tf.constant(0.0, tf.float64)
    center = [-tf.cast(width, tf.float64) * 0.5, -tf.cast(height, tf.float64) * 0.5]
    shear_deg = tf.atan(tf.cast(magnitude, tf.float64)) * (180.0 / math.pi)
    return affine_nearest(image, mask, _inverse_affine_matrix(center, zero, [zero, zero], [zero, shear_deg]),
                          fill)


def _translate(image, mask, dx, dy, fill):
    zero = tf.constant(0.0, tf.float64)
    # AutoAugment passes int(magnitude): truncation toward zero, as tf.cast does.
    dx = tf.cast(tf.cast(dx, tf.int32), tf.float64)
    dy = tf.cast(tf.cast(dy, tf.int32), tf.float64)
    return affine_nearest(image, mask, _inverse_affine_matrix([zero, zero], zero, [dx, dy], [zero, zero]), fill)


def translate_x(image, mask, magnitude, fill=None):
    return _translate(image, mask, magnitude, 0.0, fill)


def translate_y(image, mask, magnitude, fill=None):
    return _translate(image, mask, 0.0, magnitude, fill)


def rotate(image, mask, degrees, fill=None):
    """Counter-clockwise rotation about the image centre (F.rotate passes -angle to the affine matrix)."""
    zero = tf.constant(0.0, tf.float64)
    angle = -tf.cast(degrees, tf.float64)
    return affine_nearest(image, mask, _inverse_affine_matrix([zero, zero], angle, [zero, zero], [zero, zero]),
                          fill)


def flip_left_right(image, mask):
    return tf.reverse(image, axis=[1]), tf.reverse(mask, axis=[1])


# ---------------------------------------------------------------------------------------------------------
# colour ops (image only), following torchvision's uint8 tensor arithmetic: float32 math, clamp, truncate.


def _blend(image, other, ratio):
    """torchvision _blend: (ratio * img1 + (1 - ratio) * img2).clamp(0, 255).to(uint8), in float32."""
    ratio64 = tf.cast(ratio, tf.float64)
    mixed = (tf.cast(ratio64, tf.float32) * tf.cast(image, tf.float32)
             + tf.cast(1.0 - ratio64, tf.float32) * tf.cast(other, tf.float32))
    return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)


def _grayscale(image):
    """rgb_to_grayscale: 0.2989 R + 0.587 G + 0.114 B, truncated to uint8; [H,W,1]."""
    pixels = tf.cast(image, tf.float32)
    gray = 0.2989 * pixels[..., 0] + 0.587 * pixels[..., 1] + 0.114 * pixels[..., 2]
    return tf.cast(gray, tf.uint8)[..., None]


def brightness(image, factor):
    return _blend(image, tf.zeros_like(image), factor)


def color(image, factor):
    return _blend(image, _grayscale(image), factor)


def contrast(image, factor):
    mean = tf.cast(tf.reduce_mean(tf.cast(_grayscale(image), tf.float64)), tf.float32)
    return _blend(image, mean, factor)


_SMOOTH_KERNEL = np.ones((3, 3), np.float32)
_SMOOTH_KERNEL[1, 1] = 5.0
_SMOOTH_KERNEL /= _SMOOTH_KERNEL.sum()


def sharpness(image, factor):
    """Blend with a 3x3 smoothed copy (PIL's SMOOTH kernel) whose 1-pixel border keeps the original."""
    channels = image.shape[-1]
    kernel = tf.constant(np.tile(_SMOOTH_KERNEL[:, :, None, None], (1, 1, channels, 1)))
    smoothed = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, strides=[1, 1, 1, 1],
                                      padding="VALID")[0]
    smoothed = tf.cast(tf.round(smoothed), tf.uint8)
    interior = tf.pad(smoothed, [[1, 1], [1, 1], [0, 0]])
    height, width = _static_or_dynamic_hw(image)
    rows = tf.range(height)
    cols = tf.range(width)
    is_interior = ((rows[:, None] > 0) & (rows[:, None] < height - 1)
                   & (cols[None, :] > 0) & (cols[None, :] < width - 1))
    degenerate = tf.where(is_interior[..., None], interior, image)
    return _blend(image, degenerate, factor)


def posterize(image, bits):
    bits = tf.cast(bits, tf.int32)
    keep = tf.cast(256 - tf.bitwise.left_shift(1, 8 - bits), tf.uint8)
    return tf.bitwise.bitwise_and(image, keep)


def solarize(image, threshold):
    return tf.where(tf.cast(image, tf.float32) >= tf.cast(threshold, tf.float32), 255 - image, image)


def autocontrast(image):
    pixels = tf.cast(image, tf.float32)
    low = tf.reduce_min(pixels, axis=[0, 1])
    high = tf.reduce_max(pixels, axis=[0, 1])
    flat = high <= low
    # torchvision writes `bound / (max - min)`: Tensor.__rtruediv__, i.e. reciprocal(max - min) * bound
    scale = tf.where(flat, 1.0, tf.math.reciprocal(tf.where(flat, 1.0, high - low)) * 255.0)
    low = tf.where(flat, 0.0, low)
    return tf.cast(tf.clip_by_value((pixels - low) * scale, 0.0, 255.0), tf.uint8)


def equalize(image):
    """Per-channel histogram equalization (torchvision's _scale_channel), all channels at once."""
    channels = image.shape[-1]
    # channel c's values shifted to bins [256 c, 256 c + 256) of one histogram
    values = tf.cast(image, tf.int32) + 256 * tf.range(channels)
    hist = tf.reshape(tf.math.bincount(tf.reshape(values, [-1]), minlength=256 * channels,
                                       maxlength=256 * channels), [channels, 256])
    # torchvision: step = (pixel count minus the count of the last non-empty bin) // 255
    last_nonempty = 255 - tf.argmax(tf.cast(tf.reverse(hist, axis=[1]) > 0, tf.int32), axis=1, output_type=tf.int32)
    last_count = tf.gather(hist, last_nonempty, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - last_count) // 255
    safe_step = tf.maximum(step, 1)[:, None]
    lut = (tf.cumsum(hist, axis=1) + safe_step // 2) // safe_step
    lut = tf.clip_by_value(tf.pad(lut[:, :-1], [[0, 0], [1, 0]]), 0, 255)  # shifted right by one
    lut = tf.where((step == 0)[:, None], tf.range(256)[None, :], lut)  # step 0: unchanged
    return _lookup(tf.reshape(lut, [-1]), values)


def invert(image):
    return 255 - image


# ---------------------------------------------------------------------------------------------------------


def apply_op(image, mask, op_name: str, magnitude, fill=None):
    """One op, as torchvision's autoaugment._apply_op with a signed magnitude; returns (image, mask)."""
    if op_name == "ShearX":
        return shear_x(image, mask, magnitude, fill)
    if op_name == "ShearY":
        return shear_y(image, mask, magnitude, fill)
    if op_name == "TranslateX":
        return translate_x(image, mask, magnitude, fill)
    if op_name == "TranslateY":
        return translate_y(image, mask, magnitude, fill)
    if op_name == "Rotate":
        return rotate(image, mask, magnitude, fill)
    if op_name == "Brightness":
        return brightness(image, 1.0 + tf.cast(magnitude, tf.float64)), mask
    if op_name == "Color":
        return color(image, 1.0 + tf.cast(magnitude, tf.float64)), mask
    if op_name == "Contrast":
        return contrast(image, 1.0 + tf.cast(magnitude, tf.float64)), mask
    if op_name == "Sharpness":
        return sharpness(image, 1.0 + tf.cast(magnitude, tf.float64)), mask
    if op_name == "Posterize":
        return posterize(image, tf.cast(magnitude, tf.int32)), mask
    if op_name == "Solarize":
        return solarize(image, magnitude), mask
    if op_name == "AutoContrast":
        return autocontrast(image), mask
    if op_name == "Equalize":
        return equalize(image), mask
    if op_name == "Invert":
        return invert(image), mask
    raise ValueError(f"unknown AutoAugment op {op_name!r}; known: {GEOMETRIC_OPS + COLOR_OPS}")


def _check_inputs(image, mask):
    if image.dtype != tf.uint8 or mask.dtype != tf.uint8:
        raise TypeError(f"AutoAugment needs uint8 image and mask, got {image.dtype} and {mask.dtype}")
    if image.shape.rank != 3 or image.shape[-1] != 3 or mask.shape.rank != 2:
        raise ValueError(f"AutoAugment needs image [H,W,3] and mask [H,W], got {image.shape} and {mask.shape}")


OP_NAMES = ("Identity",) + GEOMETRIC_OPS + COLOR_OPS  # op indices of the graph-mode dispatch


def _geometric_by_index(image, mask, geometric_index, magnitude, fill):
    """One of GEOMETRIC_OPS chosen by a tensor index: the five inverse matrices are cheap scalars, so
    all are computed and one is picked, and a single resampling serves them all."""
    height, width = _static_or_dynamic_hw(image)
    zero = tf.constant(0.0, tf.float64)
    magnitude = tf.cast(magnitude, tf.float64)
    corner = [-tf.cast(width, tf.float64) * 0.5, -tf.cast(height, tf.float64) * 0.5]  # center=[0, 0]
    shear_deg = tf.atan(magnitude) * (180.0 / math.pi)
    shift = tf.cast(tf.cast(magnitude, tf.int32), tf.float64)  # int(magnitude)
    matrices = [
        _inverse_affine_matrix(corner, zero, [zero, zero], [shear_deg, zero]),  # ShearX
        _inverse_affine_matrix(corner, zero, [zero, zero], [zero, shear_deg]),  # ShearY
        _inverse_affine_matrix([zero, zero], zero, [shift, zero], [zero, zero]),  # TranslateX
        _inverse_affine_matrix([zero, zero], zero, [zero, shift], [zero, zero]),  # TranslateY
        _inverse_affine_matrix([zero, zero], -magnitude, [zero, zero], [zero, zero]),  # Rotate
    ]
    matrix = tf.gather(tf.stack([tf.stack(m) for m in matrices]), geometric_index)
    return affine_nearest(image, mask, tf.unstack(matrix, num=6), fill)


def _apply_op_by_index(image, mask, op_index, magnitude, fill=None):
    """apply_op with the op given as a tensor index into OP_NAMES (graph-mode dispatch)."""
    num_geometric = len(GEOMETRIC_OPS)
    branches = [lambda: (image, mask),
                lambda: _geometric_by_index(image, mask, op_index - 1, magnitude, fill)]
    for name in COLOR_OPS:
        branches.append(lambda name=name: (apply_op(image, mask, name, magnitude)[0], mask))
    branch = tf.where(op_index <= num_geometric, tf.minimum(op_index, 1), op_index - num_geometric + 1)
    return tf.switch_case(branch, branches)


def _policy_tables(policy, height, width):
    """Per (sub-policy, slot): op index, probability, unsigned magnitude, signed flag."""
    op_index = np.array([[OP_NAMES.index(op) for op, _, _ in sub] for sub in policy], np.int32)
    probability = np.array([[p for _, p, _ in sub] for sub in policy], np.float32)
    signed = np.array([[op in SIGNED_OPS for op, _, _ in sub] for sub in policy])
    magnitudes = []
    for sub in policy:
        row = []
        for op_name, _, bin_index in sub:
            if bin_index is None:
                row.append(tf.constant(0.0, tf.float32))
            elif op_name in ("TranslateX", "TranslateY"):
                size = width if op_name == "TranslateX" else height
                if isinstance(size, int):
                    row.append(tf.constant(magnitude_bins(op_name, size, size)[bin_index]))
                else:  # dynamic size: linspace(0, end)[k] = end * k / (bins - 1), up to float32 rounding
                    end = tf.constant(150.0 / 331.0, tf.float32) * tf.cast(size, tf.float32)
                    row.append(end * (bin_index / (NUM_BINS - 1)))
            else:
                row.append(tf.constant(magnitude_bins(op_name, 1, 1)[bin_index]))
        magnitudes.append(tf.stack(row))
    return op_index, probability, tf.stack(magnitudes), signed


@tf.autograph.experimental.do_not_convert
def apply_subpolicy(image, mask, policy_id, probs, signs, fill=None, policy=CIFAR10_POLICY):
    """AutoAugment.forward with its random draws given: policy_id int scalar, probs float32 [2] in [0, 1),
    signs int [2] in {0, 1} (0 negates a signed op's magnitude)."""
    image = tf.convert_to_tensor(image)
    mask = tf.convert_to_tensor(mask)
    _check_inputs(image, mask)
    probs = tf.cast(probs, tf.float32)
    signs = tf.cast(signs, tf.int32)
    policy_id = tf.cast(policy_id, tf.int32)
    height, width = _static_or_dynamic_hw(image)
    op_table, probability_table, magnitude_table, signed_table = _policy_tables(policy, height, width)
    op_row = tf.gather(op_table, policy_id)
    probability_row = tf.gather(probability_table, policy_id)
    magnitude_row = tf.gather(magnitude_table, policy_id)
    signed_row = tf.gather(signed_table, policy_id)

    def apply_slot(slot, image, mask):
        runs = probs[slot] <= probability_row[slot]
        op_index = tf.where(runs, op_row[slot], 0)
        magnitude = tf.where(signed_row[slot] & (signs[slot] == 0), -magnitude_row[slot], magnitude_row[slot])
        image, mask = _apply_op_by_index(image, mask, op_index, magnitude, fill)
        return slot + 1, image, mask

    # a 2-step loop, not two copies: the op dispatch is traced once
    _, image, mask = tf.while_loop(lambda slot, *_: slot < 2, apply_slot, (tf.constant(0), image, mask),
                                   maximum_iterations=2)
    return image, mask


@tf.autograph.experimental.do_not_convert
def autoaugment(image, mask, seed, fill=None, policy=CIFAR10_POLICY):
    """Random AutoAugment sub-policy from a stateless seed (int tensor [2]); returns (image, mask)."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    policy_id = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=len(policy), dtype=tf.int32)
    probs = tf.random.stateless_uniform([2], seeds[1], dtype=tf.float32)
    signs = tf.random.stateless_uniform([2], seeds[2], minval=0, maxval=2, dtype=tf.int32)
    return apply_subpolicy(image, mask, policy_id, probs, signs, fill=fill, policy=policy)


@tf.autograph.experimental.do_not_convert
def random_flip_left_right(image, mask, seed):
    """Horizontal flip with probability 1/2 (a stateless seed), applied to both."""
    flip = tf.random.stateless_uniform([], tf.cast(seed, tf.int64)) < 0.5
    return tf.cond(flip, lambda: flip_left_right(image, mask), lambda: (image, mask))


@tf.autograph.experimental.do_not_convert
def augment(image, mask, seed, use_autoaugment=True, fill=None):
    """The training augmentation: AutoAugment (CIFAR10 policy) then a random horizontal flip."""
    aa_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2))
    if use_autoaugment:
        image, mask = autoaugment(image, mask, aa_seed, fill=fill)
    return random_flip_left_right(image, mask, flip_seed)
