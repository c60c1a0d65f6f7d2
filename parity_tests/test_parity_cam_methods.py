"""Parity of gain_jax's CAM methods (`gain_jax.CAM_METHODS`) with pytorch-grad-cam (PyPI `grad-cam`).

Each built-in method of gain_jax names its pytorch-grad-cam counterpart in `COUNTERPARTS`; a built-in method
without one fails `test_raw_cam`. Both sides run the same weights (a torch model and its flax import by
`gain_jax.from_torchvision`), the same images, in float64 (and once per method in float32), in evaluation
mode (pytorch-grad-cam puts the model in eval mode), with the target layer at gain_jax's Grad-CAM layer
(`model.features` output: resnet's `layer4`, small_cnn's `features`). Targets: SLOTS slots, a different
class per image in each slot (`SLOT_CLASSES`, every class covered): pytorch-grad-cam with one
`ClassifierOutputTarget` per image, gain_jax's `head_gradcams` with a one-hot selector per image and slot.

What is compared is the RAW low-resolution map [B, h, w] (relu applied, before resize and min-max). The
pytorch-grad-cam side runs its own `cam(input_tensor, targets)` (BaseCAM.forward: hooked forward, backward of
the summed ClassifierOutputTarget scores, `compute_cam_per_layer`, `aggregate_multi_layers`) and then takes
its unscaled map the way `compute_cam_per_layer` computes it, before `scale_cam_image`: `get_cam_image(...)`
on the activations and gradients the forward's hooks captured, then `np.maximum(., 0)` (no monkeypatching).
The final maps differ by design: `scale_cam_image` casts to float32, min-max scales with eps 1e-7 and resizes
with cv2 (bilinear, half-pixel centres), and `aggregate_multi_layers` min-max scales the resized map once
more; gain_jax resizes with align_corners (upstream GAIN's `F.upsample_bilinear`) and min-max scales once,
after the resize, with eps = float64 machine epsilon (they differ by up to 0.45 here). `test_post_processing`
pins down that this is the only difference: each side's post-processing applied to the other side's raw map
reproduces that side's final map.

Relative difference: max|jax - torch| / max|torch| over all maps of one (model, method, precision).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # torch and pytorch_grad_cam (torchvision, OpenCV) before tensorflow: see the root conftest.py
from parity_harness import NUM_CLASSES, assert_close, difference, record, to_flax, torch_model, torch_model_copy
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import gain_jax as gj
from gain_jax import variants

# gain_jax name -> pytorch-grad-cam class
COUNTERPARTS = {
    "gradcam": GradCAM,
    "gradcam_pp": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
}
# the methods gain_jax ships (not ones a user or another test registered)
BUILTIN_METHODS = sorted(name for name, fn in gj.CAM_METHODS.items() if fn.__module__ == variants.__name__)

# model -> image size; Grad-CAM layer 3x3 (resnet18, stride 32) and 8x8 (small_cnn, three 2x2 max-pools)
MODELS = {"resnet18": (96, 96), "small_cnn": (64, 64)}
BATCH = 3
SLOTS = 3
# [BATCH, SLOTS]: image b, slot k attends class (b + 2k) mod C; images 0 and 1 cover the 6 classes
SLOT_CLASSES = np.array([[(b + 2 * k) % NUM_CLASSES for k in range(SLOTS)] for b in range(BATCH)])

# float64: measured max relative difference of the raw maps 4.3e-15 (parity_tests/README.md). A formula
# difference shows far above 1e-10: XGrad-CAM's eps 1e-7 -> 1e-8 moves the map by 4e-9 to 6e-8 relative.
RAW_FLOAT64_TOL = 1e-10
# float32: measured 1.6e-6 (both sides' float32 roundoff through the backbone and the head's backward)
RAW_FLOAT32_TOL = 1e-5
# post-processed maps, in [0, 1], absolute: measured 2.4e-14 (float64, gain_jax's) and 0 (pytorch-grad-cam's,
# float32: cv2 resizes float32; the float64 raw maps' roundoff does not survive the cast)
SCALED_FLOAT64_TOL = 1e-10
SCALED_FLOAT32_TOL = 1e-6


class Pair:
    """One torch model (float64, randomized BatchNorm statistics and affine parameters; see parity_harness)
    and its float32 copy, lazily their flax imports, the images, and each side's maps once computed."""

    def __init__(self, name: str):
        self.name = name
        self.size = MODELS[name]
        self.torch = {"float64": torch_model(name).eval()}
        self.torch["float32"] = torch_model_copy(self.torch["float64"], torch.float32).eval()
        self.jax_model = gj.build_model(name, NUM_CLASSES, dropout_rate=0.0)
        self._variables = {}
        self.torch_maps = {}  # (method, precision) -> (raw, scaled), shared by the two tests
        self.jax_maps = {}  # (method, precision) -> raw
        gen = torch.Generator().manual_seed(7)
        self.images = torch.randn(BATCH, 3, *self.size, generator=gen, dtype=torch.float64)

    def target_layer(self, precision: str) -> torch.nn.Module:
        model = self.torch[precision]
        return model.layer4 if self.name.startswith("resnet") else model.features

    def variables(self, precision: str) -> dict:  # call inside jax.enable_x64(precision == "float64")
        if precision not in self._variables:
            self._variables[precision] = to_flax(self.name, self.torch[precision])
        return self._variables[precision]

    def torch_images(self, precision: str) -> torch.Tensor:
        return self.images.to(getattr(torch, precision))

    def jax_images(self, precision: str) -> jax.Array:
        return jnp.asarray(self.images.permute(0, 2, 3, 1).numpy(), getattr(jnp, precision))


# torch on one thread in this module (the root conftest.py): on a busy 2-core machine its two OpenMP threads wait on
# each other at every barrier (resnet18's three float64 CAM passes: 3-7 s on 2 threads, 1.0-1.4 s on 1 at load ~4,
# 0.6 s on 2 threads when the machine was quiet)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow) if name != "small_cnn" else name
                                        for name in sorted(MODELS)])
def pair(request):
    return Pair(request.param)


def torch_cams(pair: Pair, method: str, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam's maps per slot: (raw [B, SLOTS, h, w] float64, final [B, SLOTS, H, W] float32).

    final: its own output (`BaseCAM.forward`). raw: the map `forward` computed on the way, before
    `scale_cam_image`, recomputed as `compute_cam_per_layer` does from the activations and gradients the
    forward's hooks captured: `get_cam_image(...)`, then `np.maximum(., 0)`.
    """
    if (method, precision) in pair.torch_maps:
        return pair.torch_maps[method, precision]
    model, images = pair.torch[precision], pair.torch_images(precision)
    cam = COUNTERPARTS[method](model=model, target_layers=[pair.target_layer(precision)])
    raws, finals = [], []
    try:
        for k in range(SLOTS):
            targets = [ClassifierOutputTarget(int(c)) for c in SLOT_CLASSES[:, k]]
            finals.append(cam(input_tensor=images, targets=targets))
            activations = cam.activations_and_grads.activations[0].numpy()
            grads = cam.activations_and_grads.gradients[0].numpy()
            raw = cam.get_cam_image(images, cam.target_layers[0], targets, activations, grads, False)
            raws.append(np.maximum(raw, 0))
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    maps = pair.torch_maps[method, precision] = (np.stack(raws, axis=1).astype(np.float64), np.stack(finals, 1))
    return maps


def grad_cam_post_processing(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's steps after the raw map, for one target layer: `compute_cam_per_layer`'s
    `scale_cam_image(cam, (W, H))`, then `aggregate_multi_layers` (relu, mean over the one layer,
    `scale_cam_image` again without resize). `raw`: [N, h, w]."""
    height, width = size
    return scale_cam_image(np.maximum(scale_cam_image(raw, (width, height)), 0))


def jax_raw_cams(pair: Pair, method: str, precision: str) -> np.ndarray:
    """gain_jax's `head_gradcams` [B, SLOTS, h, w], one-hot selectors (call inside jax.enable_x64(...))."""
    if (method, precision) in pair.jax_maps:
        return pair.jax_maps[method, precision]
    variables, model = pair.variables(precision), pair.jax_model
    feats = model.apply(variables, pair.jax_images(precision), train=False, method="features")

    def head_fn(features):
        return model.apply(variables, features, train=False, method="head")

    selectors = jax.nn.one_hot(SLOT_CLASSES, NUM_CLASSES, dtype=feats.dtype)  # [B, SLOTS, C]
    _, cams = gj.head_gradcams(head_fn, feats, selectors, cam_method=method)
    assert cams.dtype == feats.dtype == getattr(jnp, precision)
    raw = pair.jax_maps[method, precision] = np.asarray(cams, dtype=np.float64)
    return raw


def check_informative(raw: np.ndarray, context: str) -> None:
    """Most maps must vary in space, else the comparison tests little (relu zeroes some maps entirely)."""
    flat = raw.max(axis=(-2, -1)) == raw.min(axis=(-2, -1))
    assert flat.mean() <= 0.5, f"{context}: {flat.sum()} of {flat.size} maps are flat; pick another seed or size"


def test_counterparts_exist():
    """COUNTERPARTS names only gain_jax built-ins (a renamed method must not leave a stale entry)."""
    assert set(COUNTERPARTS) <= set(BUILTIN_METHODS), sorted(set(COUNTERPARTS) - set(BUILTIN_METHODS))


@pytest.mark.parametrize("method", BUILTIN_METHODS)
def test_raw_cam(pair, method, request):
    """The raw map of `method` against pytorch-grad-cam's, in float64 and float32."""
    assert method in COUNTERPARTS, (f"built-in CAM method {method!r} has no pytorch-grad-cam counterpart in "
                                    f"COUNTERPARTS: add one, or a reference implementation to compare with")
    diffs = []
    for precision, tolerance in (("float64", RAW_FLOAT64_TOL), ("float32", RAW_FLOAT32_TOL)):
        start = time.perf_counter()
        with jax.enable_x64(precision == "float64"):
            torch_raw, _ = torch_cams(pair, method, precision)
            jax_raw = jax_raw_cams(pair, method, precision)
        check_informative(torch_raw, f"{pair.name} {method} {precision}")
        diff = difference("cam_raw", jax_raw, torch_raw, tolerance)
        record(request, precision, [diff])
        diffs.append((precision, diff))
        print(f"{pair.name} {method} {precision}: max abs {diff.abs_diff:.2e} rel {diff.rel_diff:.2e} "
              f"({time.perf_counter() - start:.2f} s)")
    for precision, diff in diffs:
        assert_close([diff], f"{pair.name} {method} {precision}")


@pytest.mark.parametrize("method", sorted(COUNTERPARTS))
def test_post_processing(pair, method, request):
    """The final maps differ only by post-processing: pytorch-grad-cam's (`grad_cam_post_processing`) on
    gain_jax's raw map gives pytorch-grad-cam's output, and gain_jax's (align-corners resize, min-max with
    eps = float64 epsilon) on pytorch-grad-cam's raw map gives `gain_jax.class_cams`."""
    with jax.enable_x64(True):
        torch_raw, torch_final = torch_cams(pair, method, "float64")
        jax_raw = jax_raw_cams(pair, method, "float64")
        _, all_classes = gj.class_cams(pair.jax_model, pair.variables("float64"), pair.jax_images("float64"),
                                       gj.GainConfig(cam=method))  # [B, C, H, W]
        jax_final = np.take_along_axis(np.asarray(all_classes), SLOT_CLASSES[:, :, None, None], axis=1)
        jax_post_on_torch_raw = gj.minmax_normalize(gj.resize_align_corners(jnp.asarray(torch_raw), pair.size))
    torch_post_on_jax_raw = grad_cam_post_processing(jax_raw.reshape(-1, *jax_raw.shape[2:]), pair.size)
    diffs = [  # maps in [0, 1]: absolute differences
        difference("cam_scaled", jax_final, jax_post_on_torch_raw, SCALED_FLOAT64_TOL, scale=1.0),
        difference("cam_scaled_cv2", torch_post_on_jax_raw.reshape(torch_final.shape), torch_final,
                   SCALED_FLOAT32_TOL, scale=1.0),
    ]
    gap = float(np.max(np.abs(jax_final - torch_final)))
    print(f"{pair.name} {method}: gain_jax vs pytorch-grad-cam final maps differ by up to {gap:.3f}; swapped "
          f"post-processing: {diffs[0].abs_diff:.2e} (float64), {diffs[1].abs_diff:.2e} (float32)")
    record(request, "float64", diffs[:1])
    record(request, "float32", diffs[1:])
    assert_close(diffs, f"{pair.name} {method} post-processing")
