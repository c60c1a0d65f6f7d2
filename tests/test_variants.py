"""Every registered GAIN variant (CAM method, mask, L_am score, attention-mining BatchNorm, erase fill) in one
parametrized test, plus registering a variant of one's own. A new built-in entry is tested by adding it."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gain_jax as gj
from gain_jax import variants

NUM_CLASSES = 5
LABELS = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 1, 0, 0, 1], [0, 0, 0, 1, 0]], np.float32)
MASKS = np.array([np.full((24, 32), c) for c in (1, 2, 5, 4)], np.int32)  # any valid VOC-style masks
ENTRIES = [(kind, name) for kind, registry in variants.REGISTRIES.items() for name in sorted(registry)]
BUILT_IN = {"cam": {"gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam"},
            "mask": {"sigmoid", "straight_through"}, "score": {"softmax", "sigmoid"},
            "am_batchnorm": {"frozen", "batch"}, "erase": {"constant", "shift"}}


@pytest.fixture(scope="module")
def small():
    model = gj.build_model("small_cnn", NUM_CLASSES, dropout_rate=0.0)
    # drawn with numpy: jax.random compiles a threefry program per shape (~0.8 CPU-s)
    images = jnp.asarray(np.random.default_rng(1).standard_normal((4, 24, 32, 3)), jnp.float32)

    # one compiled program instead of op-by-op: the weights and batch statistics are inputs of these tests, not
    # what they check
    @functools.partial(jax.jit)
    def initial_variables(key, images):
        variables = model.init(key, images)
        _, state = model.apply(variables, images * 2.0 + 0.5, train=True, mutable=["batch_stats"])
        return {"params": variables["params"], **state}

    return model, initial_variables(jax.random.PRNGKey(0), images), images


@pytest.fixture(scope="module")
def jitted(small):
    """(grad_fn, cams_fn) shared by every case of test_variant_under_jit_in_both_modes: the GainConfig is static,
    so each distinct configuration compiles once, and the cases that name a kind's default (the same GainConfig
    as cam=gradcam) reuse cam=gradcam's programs instead of tracing them again."""
    model, variables, images = small
    masks = jnp.asarray(MASKS)

    def loss(params, cfg, labels):
        out = gj.gain_forward(model, {**variables, "params": params}, images, labels, cfg, train=True)
        return gj.gain_losses(out, labels, cfg, gt_masks=masks)["total"], out

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    cams_fn = jax.jit(gj.class_cams, static_argnums=(0, 3))
    return grad_fn, cams_fn


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def test_built_in_entries_are_registered_and_the_defaults_are_upstreams():
    assert {kind: set(registry) >= BUILT_IN[kind] for kind, registry in variants.REGISTRIES.items()} == {
        kind: True for kind in BUILT_IN}
    defaults = gj.GainConfig()
    assert (defaults.cam, defaults.mask, defaults.score, defaults.am_batchnorm, defaults.erase) == (
        "gradcam", "sigmoid", "softmax", "frozen", "constant")


# the default configuration (every kind's default gives the same GainConfig) once in the fast tier
@pytest.mark.parametrize("kind,name", [
    pytest.param(kind, name, id=f"{kind}={name}",
                 marks=() if (kind, name) == ("cam", "gradcam") else pytest.mark.slow)
    for kind, name in ENTRIES])
def test_variant_under_jit_in_both_modes(small, jitted, kind, name):
    model, variables, images = small
    grad_fn, cams_fn = jitted
    cfg_union = gj.GainConfig(mode="union", ex_weight=0.5, **{kind: name})
    cfg_per_label = dataclasses.replace(cfg_union, mode="per_label", max_labels=3)
    labels = jnp.asarray(LABELS)
    outputs = {}
    for cfg in (cfg_union, cfg_per_label):
        (total, out), grads = grad_fn(variables["params"], cfg, labels)
        assert np.isfinite(float(total)), (cfg.mode, float(total))
        leaves = jax.tree_util.tree_leaves(grads)
        assert all(np.all(np.isfinite(leaf)) for leaf in leaves), cfg.mode
        assert any(np.any(leaf != 0) for leaf in leaves), cfg.mode
        assert np.all((out.mask >= 0) & (out.mask <= 1))
        outputs[cfg.mode] = out

    # per-label slot k is the union run with that one label (same CAM, mask, erased image and, unless
    # BatchNorm normalizes with the batch of erased images, which differs between the two, same logits)
    per_label = outputs["per_label"]
    compared = ("heatmap", "scaled", "mask", "masked_images")
    if cfg_union.am_batchnorm != "batch":
        compared += ("logits_am",)
    for slot in range(3):
        classes = np.asarray(per_label.slot_labels[:, slot])
        valid = classes >= 0
        one_hot = jnp.asarray(np.eye(NUM_CLASSES, dtype=np.float32)[np.where(valid, classes, 0)])
        (_, union), _ = grad_fn(variables["params"], cfg_union, one_hot)
        for field in compared:
            got = np.asarray(getattr(per_label, field))[valid, slot]
            want = np.asarray(getattr(union, field))[valid, 0]
            assert rel_diff(got, want) < 1e-5, (field, slot, rel_diff(got, want))

    # evaluation uses the configured CAM method too
    _, cams = cams_fn(model, variables, images, cfg_union)
    assert cams.shape == (4, NUM_CLASSES, 24, 32) and np.all(np.isfinite(cams))


def test_cam_methods_on_a_global_average_pooling_head(small):
    """small_cnn's head pools globally, so the feature gradient is the same at every position: HiResCAM is
    then Grad-CAM exactly and XGrad-CAM up to its eps, while Grad-CAM++ and LayerCAM weigh differently."""
    model, variables, images = small

    @functools.partial(jax.jit)  # one program, not op by op
    def cam_maps(variables, images, selector):
        feats = model.apply(variables, images, method="features")

        def head_fn(features):
            return model.apply(variables, features, method="head")

        return {name: gj.gradcam(head_fn, feats, selector, cam_method=name) for name in sorted(BUILT_IN["cam"])}

    maps = cam_maps(variables, images, jnp.asarray(LABELS))
    assert rel_diff(maps["hirescam"], maps["gradcam"]) < 1e-5
    assert rel_diff(maps["xgradcam"], maps["gradcam"]) < 1e-4
    for name in ("gradcam_pp", "layercam"):
        assert rel_diff(maps[name], maps["gradcam"]) > 1e-2, (name, rel_diff(maps[name], maps["gradcam"]))


def test_sigmoid_mask_is_soft_mask_and_straight_through_is_hard_with_soft_gradient():
    scaled = jnp.linspace(0.0, 1.0, 11).reshape(1, 11)
    np.testing.assert_array_equal(gj.soft_mask(scaled, 0.5, 10.0), jax.nn.sigmoid(10.0 * (scaled - 0.5)))
    hard = gj.soft_mask(scaled, 0.45, 10.0, "straight_through")
    np.testing.assert_array_equal(hard, (scaled > 0.45).astype(jnp.float32))
    grad_soft = jax.grad(lambda s: gj.soft_mask(s, 0.45, 10.0).sum())(scaled)
    grad_hard = jax.grad(lambda s: gj.soft_mask(s, 0.45, 10.0, "straight_through").sum())(scaled)
    np.testing.assert_allclose(grad_hard, grad_soft, rtol=1e-6)


def test_sigmoid_score_is_each_class_probability():
    logits = jnp.array([[2.0, -1.0, 0.5]])
    np.testing.assert_allclose(gj.AM_SCORES["sigmoid"](logits), jax.nn.sigmoid(logits))
    np.testing.assert_allclose(gj.AM_SCORES["softmax"](logits).sum(), 1.0, rtol=1e-6)


def test_batch_batchnorm_uses_the_erased_batchs_statistics(small):
    model, variables, images = small

    @functools.partial(jax.jit)  # one program, not five passes op by op
    def forwards(variables, erased):
        train_mode, _ = model.apply(variables, erased, train=True, mutable=["batch_stats"])
        return ({train: {name: gj.AM_FORWARDS[name](model, variables, erased, train, None)
                         for name in ("frozen", "batch")} for train in (True, False)}, train_mode)

    logits, train_mode = forwards(variables, images * 0.3 - 1.0)
    frozen, batch = logits[True]["frozen"], logits[True]["batch"]
    np.testing.assert_allclose(batch, train_mode, rtol=1e-6)
    assert rel_diff(batch, frozen) > 1e-2
    # in evaluation both read the running statistics
    np.testing.assert_allclose(logits[False]["batch"], logits[False]["frozen"], rtol=1e-6)


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="cam must be one of .*gradcam.*layercam"):
        gj.GainConfig(cam="scorecam")
    with pytest.raises(ValueError, match="unknown variant kind"):
        gj.register("loss", "mine", lambda x: x)
    with pytest.raises(ValueError, match="sigma must be in"):
        gj.GainConfig(sigma=-1.0)
    with pytest.raises(ValueError, match="fill must be finite"):
        gj.GainConfig(fill=float("nan"))


def test_a_registered_cam_method_is_used_and_a_clashing_name_refused(small):
    model, variables, images = small

    import jax.numpy as jnp

    import gain_jax as gj

    @gj.register("cam", "abs_gradcam")
    def abs_gradcam(feats, feat_grads):
        """Grad-CAM with the magnitude of the mean gradient as channel weights."""
        weights = jnp.abs(feat_grads.mean(axis=(1, 2)))
        return jnp.einsum("bhwc,bc->bhw", feats, weights)

    cfg = gj.GainConfig(cam="abs_gradcam", score="sigmoid")

    @functools.partial(jax.jit)  # one program, not op by op
    def losses_of(variables, images, labels):
        return gj.gain_losses(gj.gain_forward(model, variables, images, labels, cfg), labels, cfg)

    losses = losses_of(variables, images, jnp.asarray(LABELS))
    try:
        assert np.isfinite(float(losses["total"]))
        assert "abs_gradcam" in gj.CAM_METHODS
        with pytest.raises(ValueError, match="registered already"):
            gj.register("cam", "abs_gradcam", lambda f, g: f.sum(-1))
    finally:
        del gj.CAM_METHODS["abs_gradcam"]
