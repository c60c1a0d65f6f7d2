"""gain_jax's attention, GAIN forward and losses: the properties docs/design.md promises, on small models."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gain_jax as gj

NUM_CLASSES = 5
LABELS = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 1, 0, 0, 1]], np.float32)


@pytest.fixture(scope="module")
def small():
    model = gj.build_model("small_cnn", NUM_CLASSES, dropout_rate=0.0)
    # drawn with numpy: jax.random compiles a threefry program per shape (~0.8 CPU-s)
    images = jnp.asarray(np.random.default_rng(1).standard_normal((3, 32, 40, 3)), jnp.float32)

    @functools.partial(jax.jit)  # one program, not op by op
    def initial_variables(key, images):
        variables = model.init(key, images)
        # non-trivial running statistics, so that train/eval BatchNorm differ
        _, state = model.apply(variables, images * 2.0 + 0.5, train=True, mutable=["batch_stats"])
        return {"params": variables["params"], **state}

    return model, initial_variables(jax.random.PRNGKey(0), images), images


# gain_forward under jit, one program per (config, train): the shapes test and the per-label test share theirs
_forward = jax.jit(gj.gain_forward, static_argnames=("model", "cfg", "train"))


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tree_rel_diffs(got, want):
    """Per leaf: max|got - want| / max|want|, where a leaf's scale is at least 1e-6 of the whole tree's.

    Conv biases before BatchNorm have an exactly-zero gradient; both sides then hold roundoff (~1e-10 in
    float32), which measured against itself reads as a 100% difference.
    """
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    tree_scale = max(float(np.max(np.abs(np.asarray(w)))) for w in want_leaves)
    return [float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))))
            / max(float(np.max(np.abs(np.asarray(w)))), 1e-6 * tree_scale)
            for g, w in zip(got_leaves, want_leaves)]


def to_float64(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


# ---------------------------------------------------------------- attention primitives

def test_resize_align_corners_matches_hand_computed_corners_and_midpoints():
    maps = jnp.array([[[0.0, 1.0], [2.0, 3.0]]])
    out = gj.resize_align_corners(maps, (3, 5))
    # align_corners=True keeps the corners and interpolates linearly between them
    np.testing.assert_allclose(out[0, 0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-7)
    np.testing.assert_allclose(out[0, :, 0], [0.0, 1.0, 2.0], atol=1e-7)
    np.testing.assert_allclose(out[0, 1, 2], 1.5, atol=1e-7)
    # and differs from jax.image.resize's half-pixel convention
    half_pixel = jax.image.resize(maps, (1, 3, 5), "bilinear")
    assert np.max(np.abs(half_pixel - out)) > 0.1


def test_minmax_all_zero_cam_gives_zero_and_mask_sigmoid_of_minus_omega_sigma():
    zero = jnp.zeros((2, 1, 8, 8))
    scaled = gj.minmax_normalize(zero)
    assert not np.any(np.isnan(scaled)) and np.all(scaled == 0)
    mask = gj.soft_mask(scaled, sigma=0.5, omega=10.0)
    np.testing.assert_allclose(mask, 1 / (1 + np.exp(10.0 * 0.5)), rtol=1e-6)


def test_minmax_range_and_apply_mask_fill():
    # drawn with numpy: jax.random.uniform compiles a threefry program (~2 CPU-s)
    maps = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 3, 6, 7)), jnp.float32) * 5 + 1
    scaled = gj.minmax_normalize(maps)
    np.testing.assert_allclose(scaled.min(axis=(-2, -1)), 0, atol=1e-7)
    np.testing.assert_allclose(scaled.max(axis=(-2, -1)), 1, atol=1e-6)
    images = jnp.ones((1, 2, 2, 3))
    mask = jnp.array([[[1.0, 0.0], [0.5, 0.0]]])
    out = gj.apply_mask(images, mask, fill=(0.1, 0.2, 0.3))
    np.testing.assert_allclose(out[0, 0, 0], [0.1, 0.2, 0.3], atol=1e-7)
    np.testing.assert_allclose(out[0, 0, 1], [1, 1, 1])
    np.testing.assert_allclose(out[0, 1, 0], [0.55, 0.6, 0.65], atol=1e-7)


def test_gradcam_equals_full_autodiff_and_works_under_jit_and_vmap(small):
    model, variables, images = small
    feats = model.apply(variables, images, method="features")
    head = functools.partial(model.apply, variables, method="head")
    selector = jnp.asarray(LABELS)
    cam = jax.jit(gj.gradcam, static_argnums=0)(head, feats, selector)
    # reference: gradient of the selected logits w.r.t. the features, by plain jax.grad
    grads = jax.grad(lambda f: jnp.sum(head(f) * selector))(feats)
    expected = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", feats, grads.mean(axis=(1, 2))))
    assert cam.shape == feats.shape[:3]
    np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-6)
    # vmap over a leading axis of selectors == one call per selector
    selectors = jnp.stack([selector, jnp.eye(NUM_CLASSES)[:3]])
    vmapped = jax.vmap(lambda s: gj.gradcam(head, feats, s))(selectors)
    np.testing.assert_allclose(vmapped[1], gj.gradcam(head, feats, selectors[1]), rtol=1e-5, atol=1e-6)


def test_gradcam_differentiates_only_the_head(small):
    """The Grad-CAM VJP is through the head: its jaxpr has no convolution (the feature extractor's)."""
    model, variables, images = small
    feats = model.apply(variables, images, method="features")
    head = functools.partial(model.apply, variables, method="head")
    jaxpr = str(jax.make_jaxpr(lambda f: gj.gradcam(head, f, jnp.asarray(LABELS)))(feats))
    assert "conv_general_dilated" not in jaxpr


# ---------------------------------------------------------------- gain_forward

@pytest.mark.parametrize("mode,num_slots", [("union", 1), ("per_label", 4)])
def test_gain_forward_shapes_dtypes_under_jit(small, mode, num_slots):
    model, variables, images = small
    cfg = gj.GainConfig(mode=mode, max_labels=4)
    out = _forward(model, variables, images, jnp.asarray(LABELS), cfg)
    batch, height, width = images.shape[:3]
    assert out.logits_cl.shape == (batch, NUM_CLASSES)
    for name in ("heatmap", "scaled", "mask"):
        assert getattr(out, name).shape == (batch, num_slots, height, width)
        assert getattr(out, name).dtype == jnp.float32
    assert out.masked_images.shape == (batch, num_slots, height, width, 3)
    assert out.logits_am.shape == (batch, num_slots, NUM_CLASSES)
    assert out.slot_labels.shape == (batch, num_slots)
    assert set(out.model_state) == {"batch_stats"}
    if mode == "per_label":
        np.testing.assert_array_equal(out.slot_labels, [[0, 2, -1, -1], [1, -1, -1, -1], [0, 1, 4, -1]])


def test_per_label_slot_equals_union_with_that_one_hot_label(small):
    """Under jit, with the programs of test_gain_forward_shapes_dtypes_under_jit (op by op, the same forward
    compiled some hundred small programs): max_labels 4, of which LABELS fill at most 3 slots (slot 3 is padding
    in every image, nothing to compare)."""
    model, variables, images = small
    per_label = _forward(model, variables, images, jnp.asarray(LABELS), gj.GainConfig(mode="per_label", max_labels=4))
    assert not np.any(np.asarray(per_label.slot_labels)[:, 3:] >= 0)
    for slot in range(3):
        classes = np.asarray(per_label.slot_labels[:, slot])
        valid = classes >= 0
        one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[np.where(valid, classes, 0)]
        union = _forward(model, variables, images, jnp.asarray(one_hot), gj.GainConfig(mode="union", max_labels=4))
        for name in ("heatmap", "scaled", "mask", "masked_images", "logits_am"):
            got = np.asarray(getattr(per_label, name))[valid, slot]
            want = np.asarray(getattr(union, name))[valid, 0]
            assert rel_diff(got, want) < 1e-5, (name, slot, rel_diff(got, want))


def test_union_eval_attends_to_argmax_and_needs_no_labels(small):
    model, variables, images = small
    cfg = gj.GainConfig(mode="union")
    out = jax.jit(lambda v, x: gj.gain_forward(model, v, x, None, cfg, train=False))(variables, images)
    predicted = np.argmax(model.apply(variables, images), axis=-1)
    np.testing.assert_array_equal(out.slot_labels[:, 0], predicted)
    one_hot = jnp.asarray(np.eye(NUM_CLASSES, dtype=np.float32)[predicted])
    feats = model.apply(variables, images, method="features")
    cam = gj.gradcam(functools.partial(model.apply, variables, method="head"), feats, one_hot)
    expected = gj.minmax_normalize(gj.resize_align_corners(cam, images.shape[1:3]))
    np.testing.assert_allclose(out.scaled[:, 0], expected, atol=1e-5)
    assert out.model_state == {}


@functools.partial(jax.jit, static_argnames=("model", "cfg", "terms"))
def _param_grads(model, variables, images, labels, cfg, terms=("total",), gt_masks=None):
    def loss(params):
        out = gj.gain_forward(model, {**variables, "params": params}, images, labels, cfg)
        losses = gj.gain_losses(out, labels, cfg, gt_masks=gt_masks)
        return sum(losses[t] for t in terms), losses
    return jax.grad(loss, has_aux=True)(variables["params"])


@pytest.mark.slow
def test_padded_slot_changes_no_loss_and_no_gradient(small):
    """In float64: the attention-mining gradient is ill-conditioned in float32 (docs/design.md), where a
    different batch size alone moves it by ~1.5e-5 (measured)."""
    model, variables, images = small
    gt_masks = jnp.asarray(np.random.default_rng(0).integers(0, NUM_CLASSES + 1, images.shape[:3]), jnp.uint8)
    cfg3 = gj.GainConfig(mode="per_label", max_labels=3, ex_weight=0.7)
    cfg5 = gj.GainConfig(mode="per_label", max_labels=5, ex_weight=0.7)
    with jax.enable_x64(True):
        variables, images, labels = to_float64((variables, images, jnp.asarray(LABELS)))
        grads3, losses3 = _param_grads(model, variables, images, labels, cfg3, gt_masks=gt_masks)
        grads5, losses5 = _param_grads(model, variables, images, labels, cfg5, gt_masks=gt_masks)
        for name in ("cl", "am", "ex", "total"):
            assert abs(float(losses3[name]) - float(losses5[name])) < 1e-12, name
        assert max(tree_rel_diffs(grads5, grads3)) < 1e-10


def test_images_with_too_many_labels_are_refused_in_per_label_mode(small):
    model, variables, images = small
    with pytest.raises(ValueError, match="has 3 labels but max_labels is 2"):
        gj.gain_forward(model, variables, images, jnp.asarray(LABELS), gj.GainConfig(mode="per_label", max_labels=2))


@pytest.mark.slow
def test_cam_grad_full_and_stop_agree_forward_and_differ_in_gradient(small):
    model, variables, images = small
    labels = jnp.asarray(LABELS)
    stop, full = gj.GainConfig(cam_grad="stop"), gj.GainConfig(cam_grad="full")
    out_stop = gj.gain_forward(model, variables, images, labels, stop)
    out_full = gj.gain_forward(model, variables, images, labels, full)
    np.testing.assert_array_equal(out_stop.scaled, out_full.scaled)
    np.testing.assert_array_equal(out_stop.logits_am, out_full.logits_am)
    grads_stop, _ = _param_grads(model, variables, images, labels, stop, terms=("am",))
    grads_full, _ = _param_grads(model, variables, images, labels, full, terms=("am",))
    # the classifier weights act on the loss only through the Grad-CAM weights (mask path) and the
    # attention-mining forward; second order adds the former
    assert rel_diff(grads_full["fc"]["kernel"], grads_stop["fc"]["kernel"]) > 1e-3
    # L_cl does not touch the cam: identical gradients
    cl_stop, _ = _param_grads(model, variables, images, labels, stop, terms=("cl",))
    cl_full, _ = _param_grads(model, variables, images, labels, full, terms=("cl",))
    for a, b in zip(jax.tree_util.tree_leaves(cl_stop), jax.tree_util.tree_leaves(cl_full)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_grads_off_attention_loss_reaches_params_only_through_the_mask(small):
    model, variables, images = small
    cfg = gj.GainConfig(grads_off=True)

    def am_through_mask_only(params, variables, images, labels):
        # the attention-mining forward with constant parameters: only the mask depends on `params`
        out = gj.gain_forward(model, {**variables, "params": params}, images, labels, gj.GainConfig())
        frozen = {**variables, "batch_stats": jax.lax.stop_gradient(out.model_state["batch_stats"]),
                  "params": jax.lax.stop_gradient(variables["params"])}
        flat = out.masked_images.reshape((-1,) + out.masked_images.shape[2:])
        logits_am = model.apply(frozen, flat, train=True, freeze_bn=True).reshape(out.logits_am.shape)
        return gj.gain_losses(out.replace(logits_am=logits_am), labels, cfg)["am"]

    with jax.enable_x64(True):  # float64: float32 roundoff would dominate the exactly-zero leaves
        variables, images, labels = to_float64((variables, images, jnp.asarray(LABELS)))
        grads_off, _ = _param_grads(model, variables, images, labels, cfg, terms=("am",))
        expected = jax.jit(jax.grad(am_through_mask_only))(variables["params"], variables, images, labels)
        assert max(tree_rel_diffs(grads_off, expected)) < 1e-10
        grads_on, _ = _param_grads(model, variables, images, labels, gj.GainConfig(), terms=("am",))
    assert rel_diff(grads_on["fc"]["kernel"], grads_off["fc"]["kernel"]) > 1e-2


def test_attention_mining_stream_freezes_batchnorm(small):
    model, variables, images = small
    labels = jnp.asarray(LABELS)
    out = gj.gain_forward(model, variables, images, labels, gj.GainConfig())
    # the new statistics come from the classification forward alone
    _, cl_state = model.apply(variables, images, train=True, method="features", mutable=["batch_stats"])
    for a, b in zip(jax.tree_util.tree_leaves(out.model_state), jax.tree_util.tree_leaves(cl_state)):
        np.testing.assert_array_equal(a, b)
    # the attention-mining forward reads those updated running statistics (upstream's order)
    updated = {**variables, **out.model_state}
    flat = out.masked_images[:, 0]
    np.testing.assert_allclose(out.logits_am[:, 0], model.apply(updated, flat, train=False), rtol=1e-5, atol=1e-6)

    # L_am reaches BatchNorm scale/bias only through the mask path, never through the AM forward
    def am_loss(params, frozen_masked):
        out = gj.gain_forward(model, {**variables, "params": params}, images, labels, gj.GainConfig())
        if frozen_masked:
            out = out.replace(logits_am=model.apply(
                {"params": params, **jax.lax.stop_gradient(out.model_state)},
                jax.lax.stop_gradient(out.masked_images[:, 0]), train=True, freeze_bn=True)[:, None])
        return gj.gain_losses(out, labels, gj.GainConfig())["am"]

    direct = jax.jit(jax.grad(am_loss), static_argnums=1)(variables["params"], True)
    for name, module in direct.items():
        if name.startswith("bn"):
            assert np.all(np.asarray(module["scale"]) == 0) and np.all(np.asarray(module["bias"]) == 0)


# ---------------------------------------------------------------- losses

def test_losses_by_hand():
    logits_cl = jnp.array([[2.0, -1.0, 0.5]])
    labels = jnp.array([[1.0, 0.0, 1.0]])
    logits_am = jnp.array([[[0.0, 1.0, 2.0]]])
    scaled = jnp.array([[[[0.2, 0.9], [0.0, 1.0]]]])
    out = gj.GainOutput(logits_cl=logits_cl, heatmap=scaled, scaled=scaled, mask=scaled,
                        masked_images=jnp.zeros((1, 1, 2, 2, 3)), logits_am=logits_am,
                        slot_labels=jnp.array([[0]]), selector=labels[:, None], model_state={})
    gt = jnp.array([[[0, 1], [255, 3]]], jnp.uint8)  # bg, class 0, ignore, class 2
    cfg = gj.GainConfig(cl_weight=2.0, am_weight=3.0, ex_weight=5.0)
    losses_of = jax.jit(gj.gain_losses, static_argnums=2)  # one program a call, not op by op (~2 CPU-s)
    losses = losses_of(out, labels, cfg, gt_masks=gt)
    x, y = np.array([2.0, -1.0, 0.5]), np.array([1.0, 0.0, 1.0])
    cl = np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
    softmax = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    am = (softmax[0] + softmax[2]) / 2
    ex = ((0.2 - 0) ** 2 + (0.9 - 1) ** 2 + (1.0 - 1) ** 2) / 3
    np.testing.assert_allclose(losses["cl"], cl, rtol=1e-6)
    np.testing.assert_allclose(losses["am"], am, rtol=1e-6)
    np.testing.assert_allclose(losses["ex"], ex, rtol=1e-6)
    np.testing.assert_allclose(losses["total"], 2 * cl + 3 * am + 5 * ex, rtol=1e-6)
    # has_mask False for the only image: no extra supervision
    assert float(losses_of(out, labels, cfg, gt_masks=gt, has_mask=jnp.array([False]))["ex"]) == 0.0


@pytest.mark.slow
def test_float64_end_to_end(small):
    model, variables, images = small
    with jax.enable_x64(True):
        variables64, images64 = to_float64((variables, images))
        labels64 = jnp.asarray(LABELS, jnp.float64)

        @jax.jit  # one program: cheaper than op by op
        def forward_and_losses(variables, images, labels):
            out = gj.gain_forward(model, variables, images, labels, gj.GainConfig())
            return out, gj.gain_losses(out, labels, gj.GainConfig())

        out, losses = forward_and_losses(variables64, images64, labels64)
        assert out.scaled.dtype == jnp.float64 and out.logits_am.dtype == jnp.float64
        assert losses["total"].dtype == jnp.float64


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        gj.GainConfig(mode="both")
    with pytest.raises(ValueError, match="cam_grad"):
        gj.GainConfig(cam_grad="half")
    assert hash(gj.GainConfig(fill=[0.1, 0.2, 0.3])) == hash(gj.GainConfig(fill=(0.1, 0.2, 0.3)))
