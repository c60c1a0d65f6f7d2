"""Backbones of gain_jax.models: shapes, dtypes, jit, BatchNorm semantics, freeze_bn. No torch here
(torch parity lives in tests/test_convert.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gain_jax.models import MODEL_NAMES, BatchNorm, build_model

NUM_CLASSES = 5
# (height, width) of the input and the expected Grad-CAM layer (h, w, channels) per backbone
CASES = {
    "small_cnn": ((64, 48), (8, 6, 128)),
    "small_cnn_nobn": ((64, 48), (8, 6, 128)),
    "small_cnn_fine": ((64, 48), (16, 12, 128)),
    "resnet18": ((64, 48), (2, 2, 512)),
    "resnet50": ((32, 32), (1, 1, 2048)),
    "vgg16": ((32, 32), (1, 1, 512)),
    "vgg19": ((64, 48), (2, 1, 512)),
}
HAS_BN = {"small_cnn", "small_cnn_fine", "resnet18", "resnet50"}


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _variables(model, images, name, seed=0):
    """Random variables with exactly init's structure, shapes and dtypes, drawn with numpy.

    `model.init` compiles one threefry kernel per distinct shape (~2 s each on a loaded 2-core CPU,
    ~30 s for resnet18), so the tests init for real only once (test_init_structure). Kernels are
    scaled by 1/sqrt(fan_in) so activations stay O(1); VGG's 120M classifier weights are sparse-ish
    constants to keep the draw cheap."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        leaf_name = path[-1].key
        if leaf_name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        if leaf.size > 10_000_000:
            return jnp.full(leaf.shape, 1e-3, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 4
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _images(shape, dtype, seed=0):
    """Standard normal images, drawn with numpy: jax.random compiles a threefry program per shape and dtype
    (~0.8 CPU-s each)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def test_all_names_are_known():
    assert set(MODEL_NAMES) == set(CASES)


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError, match="vgg17.*vgg16, vgg19, resnet18, resnet50, small_cnn"):
        build_model("vgg17", NUM_CLASSES)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", bad)


def _max_relative_difference(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    return np.abs(actual - expected).max() / np.abs(expected).max()


def _check_backbone(name, dtype, execute):
    """Shapes and dtypes of features, head and logits, in eval and train mode, under jax.jit.

    execute=False traces the jitted functions with jax.eval_shape (exact shapes and dtypes, no XLA
    compile); the numerics of every backbone are executed under jit in tests/test_convert.py."""
    (height, width), feats_shape = CASES[name]
    model = build_model(name, NUM_CLASSES, param_dtype=dtype)
    images = _images((2, height, width, 3), dtype)
    if execute:
        variables = _variables(model, images, name)
    else:  # abstract values suffice for eval_shape
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    assert set(variables) == ({"params", "batch_stats"} if name in HAS_BN else {"params"})
    for leaf in jax.tree_util.tree_leaves(variables):
        assert leaf.dtype == dtype

    @jax.jit
    def evaluate(variables, images):
        feats = model.apply(variables, images, train=False, method="features")
        return feats, model.apply(variables, feats, train=False, method="head"), model.apply(variables, images)

    @jax.jit
    def train_forward(variables, images, key):
        kwargs = {"rngs": {"dropout": key}, "mutable": ["batch_stats"]}
        return (model.apply(variables, images, train=True, **kwargs),
                model.apply(variables, images, train=True, freeze_bn=True, **kwargs))

    run = (lambda f, *args: f(*args)) if execute else jax.eval_shape
    feats, logits_from_head, logits = run(evaluate, variables, images)
    assert feats.shape == (2, *feats_shape) and feats.dtype == dtype
    assert logits.shape == (2, NUM_CLASSES) and logits.dtype == dtype
    assert logits_from_head.shape == logits.shape and logits_from_head.dtype == dtype
    if execute:
        assert _max_relative_difference(logits_from_head, logits) < 1e-6  # __call__ = head(features(x))

    for train_logits, state in run(train_forward, variables, images, jax.random.PRNGKey(1)):
        assert train_logits.shape == (2, NUM_CLASSES) and train_logits.dtype == dtype
        assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(
            {"batch_stats": variables["batch_stats"]} if name in HAS_BN else {})
        for leaf in jax.tree_util.tree_leaves(state):
            assert leaf.dtype == dtype
    return model, variables, images, feats, logits


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name == "resnet50" else name
                                  for name in sorted(CASES)])
def test_backbone_shapes_and_dtypes(name, x64):
    for dtype in (jnp.float32, jnp.float64):
        _check_backbone(name, dtype, execute=False)


@pytest.mark.parametrize("name", ["small_cnn", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_backbone_jit_executes_and_matches_eager(name):
    model, variables, images, jit_feats, jit_logits = _check_backbone(name, jnp.float32, execute=True)
    eager_feats = model.apply(variables, images, method="features")
    assert _max_relative_difference(jit_feats, eager_feats) < 1e-5
    assert _max_relative_difference(jit_logits, model.apply(variables, images)) < 1e-5


def test_backbone_float64_executes(x64):
    _check_backbone("small_cnn", jnp.float64, execute=True)


def test_float64_params_compute_in_float64_end_to_end(x64):
    """No hidden float32 cast: a perturbation below float32's resolution must reach the logits."""
    model = build_model("resnet18", NUM_CLASSES, param_dtype=jnp.float64)
    images = _images((2, 32, 32, 3), jnp.float64)
    variables = _variables(model, images, "resnet18")
    apply = jax.jit(model.apply)
    difference = np.abs(np.asarray(apply(variables, images + 1e-12) - apply(variables, images))).max()
    assert 0 < difference < 1e-9


def test_init_structure():
    """The real init: float32 by default, torch's BN init, and the structure the tests' variables mimic."""
    model = build_model("small_cnn", NUM_CLASSES)
    images = jnp.zeros((1, 16, 16, 3))
    # one compiled program (op by op, each initializer compiles its own): the same initializers and threefry draws
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(shapes)
    assert sorted(variables["params"]) == ["bn_0", "bn_1", "bn_2", "bn_3", "conv_0", "conv_1", "conv_2",
                                           "conv_3", "fc"]
    np.testing.assert_array_equal(variables["params"]["bn_1"]["scale"], np.ones(32))
    np.testing.assert_array_equal(variables["params"]["bn_1"]["bias"], np.zeros(32))
    np.testing.assert_array_equal(variables["batch_stats"]["bn_1"]["mean"], np.zeros(32))
    np.testing.assert_array_equal(variables["batch_stats"]["bn_1"]["var"], np.ones(32))
    # torch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 16 * 3 * 3
    kernel = np.asarray(variables["params"]["conv_1"]["kernel"])
    assert kernel.shape == (3, 3, 16, 32) and np.abs(kernel).max() <= 1 / 12
    assert np.abs(kernel).max() > 0.8 / 12


@pytest.mark.slow
def test_small_cnn_nobn_init_is_small_cnn_without_batchnorm():
    """No BatchNorm module, hence no "batch_stats" collection; the convs and the head are small_cnn's, drawn
    identically from the same key (flax derives each module's key from its name)."""
    images = jnp.zeros((1, 16, 16, 3))
    key = jax.random.PRNGKey(0)
    nobn = jax.jit(build_model("small_cnn_nobn", NUM_CLASSES).init)(key, images)
    with_bn = jax.jit(build_model("small_cnn", NUM_CLASSES).init)(key, images)
    assert set(nobn) == {"params"}
    assert sorted(nobn["params"]) == ["conv_0", "conv_1", "conv_2", "conv_3", "fc"]
    for name, module in nobn["params"].items():
        jax.tree_util.tree_map(np.testing.assert_array_equal, module, with_bn["params"][name])


def _conv_stack(module, x, pools):
    """A SmallCNN's Grad-CAM layer computed from its bound submodules, max-pooling after the first `pools` of its
    conv - BN - ReLU blocks (evaluation mode)."""
    from flax import linen as nn

    from gain_jax.models import _max_pool_2x2

    for index, conv in enumerate(module.conv):
        x = nn.relu(module.bn[index](conv(x), use_running_average=True))
        if index < pools:
            x = _max_pool_2x2(x)
    return x


def test_small_cnn_fine_is_small_cnn_without_its_last_pool():
    """small_cnn_fine has small_cnn's variables (small_cnn's weights load into it) and computes its blocks with
    the third max-pool left out: a Grad-CAM layer twice as fine (28x28 at 112 px)."""
    from gain_jax.convert import torch_key_layout
    from gain_jax.models import cam_layer_size

    assert torch_key_layout("small_cnn_fine", NUM_CLASSES) == torch_key_layout("small_cnn", NUM_CLASSES)
    coarse, fine = build_model("small_cnn", NUM_CLASSES), build_model("small_cnn_fine", NUM_CLASSES)
    images = _images((2, 24, 32, 3), jnp.float32)
    variables = _variables(coarse, images, "small_cnn")
    assert jax.tree_util.tree_structure(jax.eval_shape(fine.init, jax.random.PRNGKey(0), images)) == \
        jax.tree_util.tree_structure(variables)

    @functools.partial(jax.jit)  # one program, not four passes op by op
    def features_and_stacks(variables, images):
        return (fine.apply(variables, images, method="features"), fine.apply(variables, images, 2, method=_conv_stack),
                coarse.apply(variables, images, method="features"),
                coarse.apply(variables, images, 3, method=_conv_stack))

    feats, fine_stack, coarse_feats, coarse_stack = features_and_stacks(variables, images)
    assert feats.shape == (2, 6, 8, 128) and cam_layer_size("small_cnn_fine", 112) == 28
    np.testing.assert_allclose(feats, fine_stack, rtol=1e-6, atol=1e-6)
    # the same stack with three pools is small_cnn's
    np.testing.assert_allclose(coarse_feats, coarse_stack, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_am_batchnorm_setting_has_nothing_to_act_on_without_batchnorm():
    """gain_forward's am_batchnorm ("frozen": running statistics; "batch": the erased batch's own) changes
    small_cnn's attention-mining logits, and leaves small_cnn_nobn's outputs and gradients bit-identical: both
    settings trace to the same program (jaxpr) for its loss, outputs and gradients, which is run once.

    One compile of the second-order program instead of four (~25 CPU-s before): small_cnn's pair runs the
    forward alone, the nobn pair compares programs (equal programs on equal inputs give equal bits)."""
    from gain_jax.gain import GainConfig, gain_forward, gain_losses

    images = _images((2, 16, 16, 3), jnp.float32)
    labels = jnp.asarray([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]], jnp.float32)
    rngs = {"dropout": jax.random.PRNGKey(3)}

    def loss_of(name, am_batchnorm):  # (params -> (GAIN total, outputs), initial params)
        model = build_model(name, NUM_CLASSES, dropout_rate=0.5)
        variables = _variables(model, images, name)
        cfg = GainConfig(am_batchnorm=am_batchnorm)

        def total_and_out(params):
            out = gain_forward(model, {**variables, "params": params}, images, labels, cfg, train=True, rngs=rngs)
            return gain_losses(out, labels, cfg)["total"], out

        return total_and_out, variables["params"]

    frozen, batch = (jax.jit(lambda params, f=f: f(params)[1].logits_am)(params)
                     for f, params in (loss_of("small_cnn", "frozen"), loss_of("small_cnn", "batch")))
    assert _max_relative_difference(batch, frozen) > 1e-3

    (frozen, params), (batch, _) = loss_of("small_cnn_nobn", "frozen"), loss_of("small_cnn_nobn", "batch")
    programs = [str(jax.make_jaxpr(jax.value_and_grad(f, has_aux=True))(params)) for f in (frozen, batch)]
    assert programs[0] == programs[1]
    (_, out), grads = jax.jit(jax.value_and_grad(batch, has_aux=True))(params)
    assert out.model_state == {}
    for field in ("logits_cl", "heatmap", "mask", "masked_images", "logits_am", "slot_labels", "selector"):
        assert np.isfinite(np.asarray(getattr(out, field), np.float32)).all(), field
    assert all(np.abs(np.asarray(leaf)).max() > 0 for leaf in jax.tree_util.tree_leaves(grads))


def test_batchnorm_train_mode_formula(x64):
    """Train mode normalizes with the biased batch variance and updates running stats with torch's
    momentum 0.1 and the unbiased variance; eval mode uses the running stats."""
    rng = np.random.default_rng(0)
    x = rng.normal(1.5, 2.0, size=(3, 4, 5, 6))
    scale, bias = rng.uniform(0.5, 1.5, 6), rng.uniform(-1, 1, 6)
    mean0, var0 = rng.uniform(-1, 1, 6), rng.uniform(0.5, 2, 6)
    variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
                 "batch_stats": {"mean": jnp.asarray(mean0), "var": jnp.asarray(var0)}}
    norm = BatchNorm()

    y, state = norm.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
    flat = x.reshape(-1, 6)
    expected = (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5) * scale + bias
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state["batch_stats"]["mean"], 0.9 * mean0 + 0.1 * flat.mean(0), rtol=1e-13)
    np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 * var0 + 0.1 * flat.var(0, ddof=1), rtol=1e-13)
    assert state["batch_stats"]["var"].dtype == jnp.float64

    y_eval = norm.apply(variables, jnp.asarray(x), use_running_average=True)
    np.testing.assert_allclose(y_eval, (x - mean0) / np.sqrt(var0 + 1e-5) * scale + bias, rtol=1e-12, atol=1e-12)


def test_batchnorm_train_mode_rejects_one_value_per_channel():
    """A check of the shapes, made when the forward is traced: abstract evaluation runs it without executing the
    convolutions before it op by op (~3 CPU-s)."""
    model = build_model("small_cnn", NUM_CLASSES, dropout_rate=0.0)
    images = jnp.zeros((1, 8, 8, 3))  # the last conv sees 1x1 with batch 1
    variables = _variables(model, images, "small_cnn")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables, images)


@pytest.mark.parametrize("name", ["small_cnn", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_freeze_bn_uses_running_stats_and_keeps_them(name):
    model = build_model(name, NUM_CLASSES, dropout_rate=0.5)
    images = _images((2, 32, 32, 3), jnp.float32)
    variables = _variables(model, images, name)

    @functools.partial(jax.jit, static_argnames=("train", "freeze_bn"))
    def features(variables, train, freeze_bn):
        return model.apply(variables, images, train=train, freeze_bn=freeze_bn, method="features",
                           mutable=["batch_stats"])

    eval_feats, _ = features(variables, train=False, freeze_bn=False)
    frozen_feats, frozen_state = features(variables, train=True, freeze_bn=True)
    np.testing.assert_array_equal(frozen_feats, eval_feats)
    for new, old in zip(jax.tree_util.tree_leaves(frozen_state), jax.tree_util.tree_leaves(variables["batch_stats"])):
        np.testing.assert_array_equal(new, old)

    # without freeze_bn the same call uses batch statistics and moves the running stats
    train_feats, train_state = features(variables, train=True, freeze_bn=False)
    assert _max_relative_difference(train_feats, eval_feats) > 1e-2
    assert min(np.abs(np.asarray(new - old)).max() for new, old in zip(
        jax.tree_util.tree_leaves(train_state), jax.tree_util.tree_leaves(variables["batch_stats"]))) > 1e-4


def test_freeze_bn_keeps_dropout_active():
    model = build_model("small_cnn", NUM_CLASSES, dropout_rate=0.5)
    images = _images((2, 32, 32, 3), jnp.float32)
    variables = _variables(model, images, "small_cnn")

    @functools.partial(jax.jit, static_argnames=("train",))
    def logits(key, train):
        return model.apply(variables, images, train=train, freeze_bn=True, rngs={"dropout": key},
                           mutable=["batch_stats"])[0]

    eval_logits = logits(jax.random.PRNGKey(0), train=False)
    first, second = logits(jax.random.PRNGKey(1), train=True), logits(jax.random.PRNGKey(2), train=True)
    assert _max_relative_difference(first, eval_logits) > 1e-2
    assert _max_relative_difference(first, second) > 1e-2
    # train=False with freeze_bn is plain eval (compiled too: op by op, ~1.5 CPU-s)
    plain_eval = jax.jit(model.apply)(variables, images)
    np.testing.assert_allclose(eval_logits, plain_eval, rtol=1e-5, atol=1e-6)


def test_freeze_bn_passes_no_gradient_to_bn_scale_and_bias():
    """Upstream's FreezedBnModel sets requires_grad=False on BN weight/bias for the attention-mining pass."""
    model = build_model("small_cnn", NUM_CLASSES, dropout_rate=0.0)
    images = _images((2, 16, 16, 3), jnp.float32)
    variables = _variables(model, images, "small_cnn")

    @functools.partial(jax.jit, static_argnames=("freeze_bn",))
    @functools.partial(jax.grad)
    def grads(params, freeze_bn):
        logits, _ = model.apply({**variables, "params": params}, images, train=True, freeze_bn=freeze_bn,
                                mutable=["batch_stats"])
        return jnp.sum(logits ** 2)

    frozen_grads = grads(variables["params"], freeze_bn=True)
    train_grads = grads(variables["params"], freeze_bn=False)
    for index in range(4):
        for leaf in ("scale", "bias"):
            assert np.all(np.asarray(frozen_grads[f"bn_{index}"][leaf]) == 0)
            assert np.abs(np.asarray(train_grads[f"bn_{index}"][leaf])).max() > 0
        assert np.abs(np.asarray(frozen_grads[f"conv_{index}"]["kernel"])).max() > 0


def test_frozen_train_mode_needs_no_mutable_state_and_no_rng_without_dropout():
    """The attention-mining call: train=True, freeze_bn=True writes nothing, so no mutable=...; with
    dropout_rate=0 it needs no dropout rng either, and equals eval mode."""
    model = build_model("small_cnn", NUM_CLASSES, dropout_rate=0.0)
    images = _images((2, 16, 16, 3), jnp.float32)
    variables = _variables(model, images, "small_cnn")

    @functools.partial(jax.jit)  # one program, not two passes op by op
    def frozen_and_eval(variables, images):
        return model.apply(variables, images, train=True, freeze_bn=True), model.apply(variables, images)

    frozen, evaluated = frozen_and_eval(variables, images)
    np.testing.assert_allclose(frozen, evaluated, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cam_layer_size_matches_the_model_and_min_image_size_gives_two_cells(name):
    from gain_jax.models import cam_layer_size, min_image_size

    model = build_model(name, num_classes=3)
    for size in (min_image_size(name) - 1, min_image_size(name), 70):
        if cam_layer_size(name, size) == 0:
            continue  # too small to build; train.py refuses such sizes by min_image_size
        feats = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x, method="features")[0],
                               jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
        assert feats.shape[1:3] == (cam_layer_size(name, size),) * 2, (size, feats.shape)
    assert cam_layer_size(name, min_image_size(name)) == 2
    assert cam_layer_size(name, min_image_size(name) - 1) < 2


# up to 16 channels the pool reads strided views, above it a transposed window axis: both paths
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 3), (1, 5, 5, 2), (2, 6, 7, 16), (2, 6, 7, 17)])
def test_max_pool_2x2_matches_reduce_window_values_and_gradients_with_ties(shape):
    """The reshape pool with its own backward equals flax's max_pool (torch's MaxPool2d(2)) exactly, ties
    (the zeros after a ReLU) and odd sizes (the trailing row/column dropped) included."""
    import flax.linen as nn

    from gain_jax.models import _max_pool_2x2

    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=shape).astype(np.float32), 0.0)

    def reference(inputs):
        return nn.max_pool(inputs, (2, 2), strides=(2, 2), padding="VALID")

    weights = rng.normal(size=jax.eval_shape(reference, x).shape).astype(np.float32)

    @jax.jit  # both pools, their gradients and the vmapped pool as one program (op by op: ~1.5 CPU-s a shape)
    def pools(x, weights):
        def gradient(pool):
            return jax.grad(lambda inputs: (pool(inputs) * weights).sum())(x)

        batched = jax.vmap(lambda one: _max_pool_2x2(one[None])[0])(x)
        return _max_pool_2x2(x), reference(x), gradient(_max_pool_2x2), gradient(reference), batched

    pooled, expected, ours, theirs, batched = pools(x, weights)
    np.testing.assert_array_equal(pooled, expected)
    np.testing.assert_array_equal(ours, theirs)
    assert int((x == 0).sum()) > 0 and float(np.abs(ours).sum()) > 0
    np.testing.assert_array_equal(batched, expected)


# (batch, height, width, in, out, kernel, stride, padding): outputs smaller than the kernel (ResNet's layer4 on
# 64-pixel images, its strided first conv, a 1x1 output, the 7x7 stem on a tiny image); at most 16 channels on
# both sides (small_cnn's first layer, strided, unpadded, 16 -> 16); and one that is neither (17 channels)
@pytest.mark.parametrize("case", [(2, 2, 2, 5, 7, 3, 1, 1), (2, 2, 3, 5, 7, 3, 1, 1), (2, 4, 4, 5, 7, 3, 2, 1),
                                  (1, 1, 1, 3, 4, 3, 1, 1), (2, 5, 5, 3, 4, 7, 2, 3),
                                  (2, 8, 8, 3, 16, 3, 1, 1), (2, 9, 7, 3, 4, 3, 2, 1), (2, 8, 9, 5, 7, 3, 1, 0),
                                  (2, 7, 7, 16, 16, 5, 2, 2), (2, 8, 8, 3, 17, 3, 1, 1)])
def test_conv_as_patch_product_equals_lax_conv_in_float64(case, x64):
    """gain_jax.models.conv_general_dilated (a matrix product over patches where the output is smaller than
    the kernel; the input gradient as a product and a scatter where both sides have at most 16 channels) gives
    lax.conv_general_dilated's outputs and gradients to float64 roundoff."""
    from jax import lax

    from gain_jax.models import _EIGEN_MAX_CHANNELS, conv_general_dilated

    batch, height, width, in_features, out_features, kernel, stride, pad = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, height, width, in_features)))
    weights = jnp.asarray(rng.normal(size=(kernel, kernel, in_features, out_features)))
    numbers = lax.conv_dimension_numbers(x.shape, weights.shape, ("NHWC", "HWIO", "NHWC"))
    arguments = ((stride, stride), ((pad, pad), (pad, pad)))
    cotangent = jnp.asarray(rng.normal(size=jax.eval_shape(
        lambda a, b: lax.conv_general_dilated(a, b, *arguments, dimension_numbers=numbers), x, weights).shape))

    @jax.jit  # both convolutions and their vector-Jacobian products as one program (op by op: ~0.5 to 3 CPU-s)
    def outputs_and_vjps(x, weights, cotangent):
        def output_and_vjp(conv):
            output, vjp = jax.vjp(lambda a, b: conv(a, b, *arguments, dimension_numbers=numbers), x, weights)
            return output, vjp(cotangent)

        return output_and_vjp(lax.conv_general_dilated), output_and_vjp(conv_general_dilated)

    (expected, expected_grads), (got, got_grads) = outputs_and_vjps(x, weights, cotangent)
    assert got.dtype == jnp.float64 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13)
    for ours, theirs in zip(got_grads, expected_grads):
        assert ours.dtype == jnp.float64 and ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-13)
    patch_product = expected.shape[1] < kernel or expected.shape[2] < kernel
    narrow = not patch_product and max(in_features, out_features) <= _EIGEN_MAX_CHANNELS
    hlo = jax.jit(lambda a, b: conv_general_dilated(a, b, *arguments, dimension_numbers=numbers)).lower(
        x, weights).as_text()
    assert ("convolution" not in hlo) == patch_product  # the path taken is the one documented
    input_grad_hlo = jax.jit(jax.grad(lambda a: (conv_general_dilated(
        a, weights, *arguments, dimension_numbers=numbers) * cotangent).sum())).lower(x).as_text()
    assert ("convolution" not in input_grad_hlo) == (patch_product or narrow)
