"""AutoAugment (CIFAR10 policy) in TensorFlow against torchvision, and masks moving with images.

Reference: torchvision.transforms.autoaugment._apply_op, the function AutoAugment.forward calls, which
calls torchvision.transforms.functional (F.affine with shear in degrees and center=[0, 0], F.rotate,
F.adjust_*, F.posterize, ...) on uint8 tensors with AutoAugment's defaults: nearest interpolation,
fill=None. Colour ops and every pixel of a geometric op whose source lies clearly nearer one pixel than another
are asserted exactly equal (torchvision 0.29.1, tensorflow 2.21).

The exception is a geometric op's half-pixel ties, where the exact source coordinate lies halfway between two
pixels (ShearY by 0.2 puts a fifth of them there). Nearest sampling then follows the last bit of a float32 sum,
and torchvision's bit depends on the CPU: its grid comes from a bmm, which on an AVX-512 Xeon (with avx512_fp16;
torch 2.14.1, MKL) computes fma(y, b, x * a) + c, where our TensorFlow kernels, and torch on the CPUs that
measured every op bit-exact, round each product and sum. There 21 of ShearY's 407 ties (37x53, bin 6) fell the
other way. At a tie, both sides must take one of the two nearest pixels.
"""
import unittest.mock
import zlib

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import _functional_tensor as tv_functional_tensor
from torchvision.transforms import autoaugment as tv_autoaugment

# isort: split
import tensorflow as tf  # after torchvision (see conftest.py)

from gain_jax.data import autoaugment as aa

SIZES = [(37, 53), (32, 32)]  # odd and even sides: the centre conventions differ between them
BINS = [0, 3, 6, 9]
ALL_OPS = aa.GEOMETRIC_OPS + aa.COLOR_OPS
# tiny torch ops with an OpenMP pool on a busy 2-core machine cost ~25 ms each, with one thread ~0.4 ms
pytestmark = pytest.mark.usefixtures("torch_one_thread")  # the root conftest.py


def _torch_space(height, width):
    return tv_autoaugment.AutoAugment(tv_autoaugment.AutoAugmentPolicy.CIFAR10)._augmentation_space(
        aa.NUM_BINS, (height, width))


TIE_PIXELS = 1e-5  # a source this close to halfway between two pixels is a tie. Measured over every op, bin and
# sign at the sizes below: ties lie within 1e-6 px of halfway (the float32 theta's rounding), every other source at
# least 4.9e-5 px away (Rotate)


def _torch_op(image_hwc, op_name, magnitude, fill=None):
    return _torch_op_and_ties(image_hwc, op_name, magnitude, fill)[0]


def _torch_op_and_ties(image_hwc, op_name, magnitude, fill=None):
    """torchvision's output, and for a geometric op the output pixels whose source is a half-pixel tie with the values
    each may take ([K, 4, C]: either neighbour along each tied axis; out-of-image sources take the fill)."""
    thetas = []

    def recording_grid(theta, **sizes):
        thetas.append(theta.clone())
        return gen_affine_grid(theta, **sizes)

    gen_affine_grid = tv_functional_tensor._gen_affine_grid
    chw = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image_hwc, -1, 0)))
    with unittest.mock.patch.object(tv_functional_tensor, "_gen_affine_grid", recording_grid):
        out = tv_autoaugment._apply_op(chw, op_name, magnitude, interpolation=InterpolationMode.NEAREST, fill=fill)
    expected = np.moveaxis(out.numpy(), 0, -1)
    if not thetas:
        return expected, np.zeros(expected.shape[:2], bool), None
    height, width = image_hwc.shape[:2]
    # _gen_affine_grid's arithmetic, the sums in float64: exact up to the float32 theta it rescales as torch does
    half_size = np.array([0.5 * width, 0.5 * height], np.float32)
    rescaled = (thetas[0][0].numpy().T / half_size).astype(np.float64)  # [3, 2]: x, y, 1 rows
    xs = np.arange(width) - width * 0.5 + 0.5
    ys = np.arange(height) - height * 0.5 + 0.5
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    normalized = grid_x[..., None] * rescaled[0] + grid_y[..., None] * rescaled[1] + rescaled[2]  # [H, W, 2]
    source = ((normalized + 1.0) * np.array([width, height]) - 1.0) / 2.0  # grid_sample, align_corners=False
    tied = np.abs(source - np.floor(source) - 0.5) < TIE_PIXELS  # [H, W, 2]
    ties = tied.any(-1)
    fill_value = np.zeros(image_hwc.shape[-1]) if fill is None else np.asarray(fill)
    nearest = np.where(tied, np.floor(source), np.rint(source))[ties].astype(int)  # [K, 2]: x, y
    steps = tied[ties].astype(int)  # a coordinate that is not tied does not step
    options = []
    for step_x, step_y in ((0, 0), (1, 0), (0, 1), (1, 1)):
        x_index = nearest[:, 0] + step_x * steps[:, 0]
        y_index = nearest[:, 1] + step_y * steps[:, 1]
        inside = (x_index >= 0) & (x_index < width) & (y_index >= 0) & (y_index < height)
        values = image_hwc[np.clip(y_index, 0, height - 1), np.clip(x_index, 0, width - 1)]
        options.append(np.where(inside[:, None], values, fill_value))
    return expected, ties, np.stack(options, axis=1)


def _assert_matches_torch(ours, image_hwc, op_name, magnitude, fill=None, err_msg=""):
    """Equal to torchvision's output at every pixel but a geometric op's half-pixel ties, where ours and torch's
    are each one of the tie's nearest pixels (see the module docstring)."""
    expected, ties, options = _torch_op_and_ties(image_hwc, op_name, magnitude, fill)
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.where(ties[..., None], 0, ours), np.where(ties[..., None], 0, expected),
                                  err_msg=err_msg)
    for side in (ours, expected):
        takes_an_option = (side[ties][:, None] == options).all(-1).any(-1)
        assert takes_an_option.all(), f"{err_msg}: a tie pixel takes none of its nearest pixels"


def _random_image(rng, height, width):
    """Random pixels in a random sub-range, so that AutoContrast and Equalize have work to do."""
    low = rng.integers(0, 100)
    high = rng.integers(150, 257)
    return rng.integers(low, high, size=(height, width, 3), dtype=np.uint8)


def test_policy_table_is_torchvision_cifar10():
    torch_policy = tv_autoaugment.AutoAugment(tv_autoaugment.AutoAugmentPolicy.CIFAR10).policies
    assert [tuple(sub) for sub in torch_policy] == [tuple(sub) for sub in aa.CIFAR10_POLICY]


@pytest.mark.parametrize("height,width", SIZES + [(224, 224)])
def test_magnitude_bins_match_torchvision(height, width):
    for op_name, (magnitudes, signed) in _torch_space(height, width).items():
        if op_name not in ALL_OPS:
            continue
        assert signed == (op_name in aa.SIGNED_OPS), op_name
        ours = aa.magnitude_bins(op_name, height, width)
        if magnitudes.ndim == 0:  # magnitude-free ops
            assert np.all(ours == 0.0), op_name
        else:
            np.testing.assert_array_equal(ours, magnitudes.numpy().astype(np.float32), err_msg=op_name)


@pytest.mark.parametrize("op_name", ALL_OPS)
def test_op_matches_torchvision_exactly(op_name):
    """Every pixel equal for every op, bin and sign below, but a geometric op's half-pixel ties."""
    rng = np.random.default_rng(zlib.crc32(op_name.encode()))  # not hash(): it changes with each process
    for height, width in SIZES:
        magnitudes, signed = _torch_space(height, width)[op_name]
        for bin_index in (BINS if magnitudes.ndim else [None]):
            for sign in ((1.0, -1.0) if signed else (1.0,)):
                magnitude = 0.0 if bin_index is None else sign * float(magnitudes[bin_index].item())
                image = _random_image(rng, height, width)
                ours, _ = aa.apply_op(tf.constant(image), tf.zeros((height, width), tf.uint8), op_name,
                                      tf.constant(magnitude, tf.float32))
                _assert_matches_torch(ours, image, op_name, magnitude,
                                      err_msg=f"{op_name} bin {bin_index} magnitude {magnitude}")


def test_colour_ops_on_constant_and_two_level_images():
    """Degenerate histograms (AutoContrast's flat channel, Equalize's step 0) take torchvision's branches."""
    constant = np.full((16, 16, 3), 77, np.uint8)
    two_level = np.where(np.arange(256).reshape(16, 16, 1) % 3 == 0, 10, 200).astype(np.uint8).repeat(3, -1)
    for image in (constant, two_level):
        for op_name in ("AutoContrast", "Equalize", "Contrast", "Sharpness"):
            magnitude = 0.5 if op_name in aa.SIGNED_OPS else 0.0
            ours, _ = aa.apply_op(tf.constant(image), tf.zeros((16, 16), tf.uint8), op_name, magnitude)
            np.testing.assert_array_equal(ours.numpy(), _torch_op(image, op_name, magnitude), err_msg=op_name)


@pytest.mark.parametrize("op_name", aa.GEOMETRIC_OPS)
def test_geometric_fill_and_mask_match_torchvision(op_name):
    """Image fill (a per-channel colour) and the mask (resampled as a 1-channel image with fill 255) both
    match torchvision exactly, ties aside."""
    rng = np.random.default_rng(7)
    height, width = SIZES[0]
    magnitudes, _ = _torch_space(height, width)[op_name]
    fill = [17.0, 130.0, 250.0]
    for bin_index in (3, 9):
        for sign in (1.0, -1.0):
            magnitude = sign * float(magnitudes[bin_index].item())
            image = _random_image(rng, height, width)
            mask = rng.choice(np.array([0, 1, 5, 20, 255], np.uint8), size=(height, width))
            ours_image, ours_mask = aa.apply_op(tf.constant(image), tf.constant(mask), op_name,
                                                tf.constant(magnitude, tf.float32), fill=fill)
            _assert_matches_torch(ours_image, image, op_name, magnitude, fill=fill)
            _assert_matches_torch(ours_mask.numpy()[..., None], mask[..., None], op_name, magnitude, fill=[255.0])
            assert (ours_mask.numpy() == 255).any() or bin_index == 0  # the fill did show up


def test_all_subpolicies_match_torchvision_forward(monkeypatch):
    """AutoAugment.forward with its random draws pinned (policy, probs, signs) against apply_subpolicy:
    covers the table, the `prob <= p` test and the sign convention (sign draw 0 negates). Exact: no tie of these
    pinned draws fell differently on either CPU measured (module docstring)."""
    rng = np.random.default_rng(3)
    transform = tv_autoaugment.AutoAugment(tv_autoaugment.AutoAugmentPolicy.CIFAR10)
    height, width = 24, 40
    graph_subpolicy = tf.function(aa.apply_subpolicy)  # traced once: also checks graph mode
    for policy_id in range(len(aa.CIFAR10_POLICY)):
        for probs, signs in (([0.0, 0.0], [0, 1]), ([0.0, 0.0], [1, 0]), (rng.random(2), rng.integers(0, 2, 2))):
            probs = np.asarray(probs, np.float32)
            signs = np.asarray(signs, np.int64)
            monkeypatch.setattr(tv_autoaugment.AutoAugment, "get_params", staticmethod(
                lambda _n, p=probs, s=signs, i=policy_id: (i, torch.from_numpy(p), torch.from_numpy(s))))
            image = _random_image(rng, height, width)
            chw = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))
            expected = np.moveaxis(transform(chw).numpy(), 0, -1)
            ours, _ = graph_subpolicy(tf.constant(image), tf.zeros((height, width), tf.uint8),
                                      tf.constant(policy_id), tf.constant(probs), tf.constant(signs))
            np.testing.assert_array_equal(ours.numpy(), expected, err_msg=f"sub-policy {policy_id} {probs} {signs}")


# ---------------------------------------------------------------------------------------------------------
# mask alignment: an image that encodes its own mask, pixel by pixel


def _mask_encoded_pair(rng, height, width):
    """A blocky mask with VOC values (0, classes, 255) and an image whose three channels spell it."""
    coarse = rng.choice(np.array([0, 1, 2, 7, 15, 20, 255], np.uint8), size=(height // 4 + 1, width // 4 + 1))
    mask = np.kron(coarse, np.ones((4, 4), np.uint8))[:height, :width]
    mask[rng.random((height, width)) < 0.1] = 255  # scattered single pixels catch off-by-one shifts
    code = np.where(mask == 255, 250, mask.astype(np.int32) * 10 + 5).astype(np.uint8)  # never 0 (= fill)
    return np.stack([code, 255 - code, code], axis=-1), mask


def _assert_aligned(image, mask):
    """Where the image shows the fill (0), the mask is 255; elsewhere the mask is what the pixel spells."""
    image, mask = np.asarray(image), np.asarray(mask)
    np.testing.assert_array_equal(image[..., 1], np.where(image[..., 0] == 0, 0, 255 - image[..., 0]))
    filled = image[..., 0] == 0
    assert np.all(mask[filled] == 255)
    code = image[..., 0][~filled].astype(np.int32)
    decoded = np.where(code == 250, 255, (code - 5) // 10)
    np.testing.assert_array_equal(mask[~filled], decoded)


@pytest.mark.parametrize("op_name", aa.GEOMETRIC_OPS)
def test_mask_stays_aligned_through_geometric_ops(op_name):
    rng = np.random.default_rng(11)
    for height, width in SIZES:
        image, mask = _mask_encoded_pair(rng, height, width)
        for bin_index in BINS:
            for sign in (1.0, -1.0):
                magnitude = sign * float(aa.magnitude_bins(op_name, height, width)[bin_index])
                out_image, out_mask = aa.apply_op(tf.constant(image), tf.constant(mask), op_name, magnitude)
                _assert_aligned(out_image, out_mask)
                if bin_index == 9:  # a real move, so the check above was not vacuous
                    assert not np.array_equal(out_mask.numpy(), mask)


def test_mask_stays_aligned_through_flip_and_geometric_subpolicies():
    rng = np.random.default_rng(5)
    image, mask = _mask_encoded_pair(rng, 40, 48)
    out_image, out_mask = aa.flip_left_right(tf.constant(image), tf.constant(mask))
    _assert_aligned(out_image, out_mask)
    np.testing.assert_array_equal(out_mask.numpy(), mask[:, ::-1])
    geometric_only = [i for i, sub in enumerate(aa.CIFAR10_POLICY)
                      if all(op in aa.GEOMETRIC_OPS for op, _, _ in sub)]
    assert geometric_only == [1, 3, 21]  # Rotate+TranslateX, ShearY+TranslateY, TranslateY+TranslateY
    for policy_id in geometric_only:
        for signs in ([0, 0], [0, 1], [1, 0], [1, 1]):
            out_image, out_mask = aa.apply_subpolicy(tf.constant(image), tf.constant(mask), policy_id,
                                                     [0.0, 0.0], signs)
            _assert_aligned(out_image, out_mask)
    # and the full random augmentation in graph mode, on many seeds: whenever only geometric ops and
    # the flip ran (the image still spells a mask), the mask agrees with it
    checked = 0

    @tf.function
    def augment(seed):
        return aa.augment(tf.constant(image), tf.constant(mask), seed)

    for seed in range(60):
        out_image, out_mask = (x.numpy() for x in augment(tf.constant([seed, 1], tf.int64)))
        codes = set(np.unique(out_image[..., 0]).tolist())
        if codes <= {0, 250} | {m * 10 + 5 for m in range(21)}:
            if np.array_equal(out_image[..., 1], np.where(out_image[..., 0] == 0, 0, 255 - out_image[..., 0])):
                _assert_aligned(out_image, out_mask)
                checked += 1
    assert checked >= 10


def test_augment_is_deterministic_per_seed_and_runs_in_tf_data():
    rng = np.random.default_rng(0)
    image = _random_image(rng, 32, 32)
    mask = rng.integers(0, 21, (32, 32), dtype=np.uint8)
    seeds = np.stack([np.zeros(16, np.int64), np.arange(16)], axis=1)
    eager = [aa.augment(tf.constant(image), tf.constant(mask), tf.constant(s)) for s in seeds]
    dataset = tf.data.Dataset.from_tensor_slices(seeds).map(
        lambda s: aa.augment(tf.constant(image), tf.constant(mask), s), num_parallel_calls=4)
    graph = list(dataset.as_numpy_iterator())
    for (eager_image, eager_mask), (graph_image, graph_mask) in zip(eager, graph):
        np.testing.assert_array_equal(eager_image.numpy(), graph_image)
        np.testing.assert_array_equal(eager_mask.numpy(), graph_mask)
    distinct = {graph_image.tobytes() for graph_image, _ in graph}
    assert len(distinct) >= 8  # different seeds, different augmentations


def test_bad_inputs_are_rejected():
    with pytest.raises(TypeError, match="uint8"):
        aa.apply_subpolicy(tf.zeros((8, 8, 3), tf.float32), tf.zeros((8, 8), tf.uint8), 0, [0.0, 0.0], [0, 0])
    with pytest.raises(ValueError, match="unknown AutoAugment op"):
        aa.apply_op(tf.zeros((8, 8, 3), tf.uint8), tf.zeros((8, 8), tf.uint8), "Blur", 1.0)
