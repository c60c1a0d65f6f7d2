"""gain_jax.convert.from_torchvision against torchvision: exact logits and Grad-CAM features, BatchNorm
running statistics, last-layer re-initialization and the error messages."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from gain_jax.convert import from_torchvision, torch_key_layout  # noqa: E402
from gain_jax.models import SMALL_CNN_WIDTHS, adaptive_avg_pool, build_model  # noqa: E402
from gain_torch_ref import small_cnn as torch_small_cnn  # noqa: E402

NUM_CLASSES = 5
# Measured max |jax - torch| / max |torch| over PARITY_CASES (2-core CPU): float64 <= 7.5e-15 (features
# and logits); float32 <= 2.3e-6 for Grad-CAM features and <= 5.7e-6 for logits (vgg19; others <= 1.4e-6).
# The bounds keep a ~3x margin over those figures.
FLOAT64_BOUND = 1e-12
FLOAT32_BOUND = 2e-5

# (name, batch, height, width, expected Grad-CAM layer h x w)
PARITY_CASES = [
    ("small_cnn", 2, 64, 48, (8, 6)),
    pytest.param("resnet18", 2, 64, 48, (2, 2), marks=pytest.mark.slow),
    pytest.param("resnet50", 1, 48, 64, (2, 2), marks=pytest.mark.slow),
    # feature map smaller than 7x7 and not dividing it
    pytest.param("vgg16", 1, 64, 96, (2, 3), marks=pytest.mark.slow),
    pytest.param("vgg19", 2, 32, 32, (1, 1), marks=pytest.mark.slow),
]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _torch_model(name, num_classes=NUM_CLASSES, dropout=0.0):
    torch.manual_seed(0)
    if name == "small_cnn":
        model = torch_small_cnn.small_cnn(num_classes=num_classes, dropout=dropout)
    else:
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    # running stats of a fresh BN are 0/1 and its affine is 1/0: randomize them so they are tested
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.5, 0.5),
                                          (module.running_mean, -0.5, 0.5), (module.running_var, 0.5, 2.0)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model.eval()


def _torch_features(name, model, x):
    """torch's Grad-CAM layer: the `features` block (VGG, small_cnn) or layer4 (ResNet)."""
    if not name.startswith("resnet"):
        return model.features(x)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def _nhwc(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _max_relative_difference(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    return np.abs(actual - expected).max() / np.abs(expected).max()


def _init_shapes(name, images):
    return jax.eval_shape(build_model(name, NUM_CLASSES).init, jax.random.PRNGKey(0), images)


def _assert_same_structure(variables, shapes):
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(shapes)
    for leaf, init_leaf in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(shapes)):
        assert leaf.shape == init_leaf.shape


@pytest.mark.parametrize("name, batch, height, width, feats_hw", PARITY_CASES)
def test_imported_weights_reproduce_torchvision(name, batch, height, width, feats_hw):
    torch_model = _torch_model(name)
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = build_model(name, NUM_CLASSES)

    @jax.jit
    def forward(variables, images):
        feats = model.apply(variables, images, train=False, method="features")
        return feats, model.apply(variables, feats, train=False, method="head")

    # the import layout lists torchvision's keys in state_dict order
    assert list(torch_key_layout(name, NUM_CLASSES)) == [
        key for key in torch_model.state_dict() if not key.endswith("num_batches_tracked")]

    init_shapes = _init_shapes(name, jnp.zeros((batch, height, width, 3)))  # traced once for both dtypes
    for torch_dtype, bound in ((torch.float64, FLOAT64_BOUND), (torch.float32, FLOAT32_BOUND)):
        torch_model = torch_model.to(torch_dtype)
        inputs = x.to(torch_dtype)
        with torch.no_grad():
            expected_feats = _nhwc(_torch_features(name, torch_model, inputs))
            expected_logits = torch_model(inputs).numpy()
        with jax.enable_x64(torch_dtype == torch.float64):
            variables = from_torchvision(name, torch_model.state_dict(), NUM_CLASSES)
            images = jnp.asarray(_nhwc(inputs))
            _assert_same_structure(variables, init_shapes)
            expected_dtype = jnp.float64 if torch_dtype == torch.float64 else jnp.float32
            assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(expected_dtype)}
            feats, logits = forward(variables, images)
            del variables
        assert feats.dtype == expected_dtype and logits.dtype == expected_dtype
        assert feats.shape == (batch, *feats_hw, expected_feats.shape[-1])
        assert _max_relative_difference(feats, expected_feats) < bound, torch_dtype
        assert _max_relative_difference(logits, expected_logits) < bound, torch_dtype


@pytest.mark.parametrize("in_hw", [(1, 1), (2, 3), (3, 4), (5, 9), (7, 7), (8, 13), (14, 14), (15, 6)])
def test_adaptive_avg_pool_matches_torch(in_hw, x64):
    x = np.random.default_rng(0).standard_normal((2, 4, *in_hw))
    expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), (7, 7)).numpy().transpose(0, 2, 3, 1)
    pooled = adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), (7, 7))
    assert pooled.dtype == jnp.float64
    np.testing.assert_allclose(pooled, expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", ["small_cnn", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_train_mode_batch_stats_match_torch_running_stats(name, x64):
    torch_model = _torch_model(name).double()
    variables = from_torchvision(name, torch_model.state_dict(), NUM_CLASSES)
    x = torch.randn(3, 3, 64, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    torch_model.train()
    with torch.no_grad():
        expected_logits = torch_model(x).numpy()
    model = build_model(name, NUM_CLASSES, dropout_rate=0.0)
    logits, state = jax.jit(lambda v, images: model.apply(v, images, train=True, mutable=["batch_stats"]))(
        variables, jnp.asarray(_nhwc(x)))
    assert _max_relative_difference(logits, expected_logits) < FLOAT64_BOUND

    updated = from_torchvision(name, torch_model.state_dict(), NUM_CLASSES)["batch_stats"]
    moved = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["batch_stats"])[0]:
        expected = updated
        for entry in path:
            expected = expected[entry.key]
        assert leaf.dtype == jnp.float64
        np.testing.assert_allclose(leaf, expected, rtol=1e-12, atol=1e-13, err_msg=jax.tree_util.keystr(path))
        moved += int(np.abs(np.asarray(leaf) - np.asarray(_lookup(variables["batch_stats"], path))).max() > 1e-6)
    assert moved == len(jax.tree_util.tree_leaves(state))  # every running statistic was updated


def _lookup(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return tree


def test_small_cnn_widths_match_the_torch_twin():
    assert tuple(SMALL_CNN_WIDTHS) == tuple(torch_small_cnn.WIDTHS)


def test_accepts_numpy_arrays_and_ignores_num_batches_tracked():
    state_dict = {key: value.numpy() for key, value in _torch_model("small_cnn").state_dict().items()}
    assert any(key.endswith("num_batches_tracked") for key in state_dict)
    variables = from_torchvision("small_cnn", state_dict, NUM_CLASSES)
    np.testing.assert_array_equal(variables["params"]["conv_1"]["kernel"],
                                  state_dict["features.4.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["bn_3"]["var"], state_dict["features.13.running_var"])
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state_dict["classifier.1.weight"].T)


def test_imagenet_head_is_reinitialized_with_torch_default_init():
    state_dict = _torch_model("resnet18", num_classes=1000).state_dict()
    variables = from_torchvision("resnet18", state_dict, NUM_CLASSES, rng=jax.random.PRNGKey(0))
    _assert_same_structure(variables, _init_shapes("resnet18", jnp.zeros((1, 32, 32, 3))))

    kernel, bias = np.asarray(variables["params"]["fc"]["kernel"]), np.asarray(variables["params"]["fc"]["bias"])
    bound = 1 / np.sqrt(512)
    assert kernel.shape == (512, NUM_CLASSES) and bias.shape == (NUM_CLASSES,)
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    assert abs(kernel.std() - bound / np.sqrt(3)) < 0.1 * bound  # uniform on [-bound, bound]
    # everything else is imported untouched
    np.testing.assert_array_equal(variables["params"]["layer3_0"]["conv2"]["kernel"],
                                  state_dict["layer3.0.conv2.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["mean"], state_dict["bn1.running_mean"].numpy())

    again = from_torchvision("resnet18", state_dict, NUM_CLASSES, rng=jax.random.PRNGKey(0))
    other = from_torchvision("resnet18", state_dict, NUM_CLASSES, rng=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(again["params"]["fc"]["kernel"], kernel)
    assert np.abs(np.asarray(other["params"]["fc"]["kernel"]) - kernel).max() > 1e-3

    with pytest.raises(ValueError, match=r"'fc.weight' has 1000 outputs but num_classes=5.*rng"):
        from_torchvision("resnet18", state_dict, NUM_CLASSES)


def test_vgg19_imagenet_head_is_reinitialized_from_numpy():
    """Upstream fine-tunes an ImageNet vgg19: only classifier.6 is replaced; dtype follows the state dict."""
    layout = torch_key_layout("vgg19", 1000)
    state_dict = {key: np.broadcast_to(np.float16(0.5), shape) for key, (_, _, shape) in layout.items()}
    variables = from_torchvision("vgg19", state_dict, 20, rng=jax.random.PRNGKey(0))
    kernel = variables["params"]["fc_2"]["kernel"]
    assert kernel.shape == (4096, 20) and kernel.dtype == jnp.float16
    magnitude = np.abs(np.asarray(kernel, np.float64)).max()
    assert 0.9 / 64 < magnitude <= 1 / 64 * (1 + 2 ** -10)  # within float16 rounding of the bound
    assert variables["params"]["fc_0"]["kernel"].shape == (7 * 7 * 512, 4096)
    assert variables["params"]["fc_1"]["bias"].dtype == jnp.float16
    np.testing.assert_array_equal(variables["params"]["fc_1"]["bias"], np.full(4096, 0.5, np.float16))


def _resnet18_state_dict():
    return dict(_torch_model("resnet18").state_dict())


def test_missing_key_is_named():
    state_dict = _resnet18_state_dict()
    del state_dict["layer2.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing key 'layer2.1.bn2.running_var' \(expected shape \(128,\)\)"):
        from_torchvision("resnet18", state_dict, NUM_CLASSES)


def test_unexpected_key_is_named():
    state_dict = _resnet18_state_dict()
    state_dict["layer5.0.conv1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"unexpected key 'layer5.0.conv1.weight' \(found shape \(3, 3\)\)"):
        from_torchvision("resnet18", state_dict, NUM_CLASSES)


def test_shape_mismatch_names_expected_and_found_shapes():
    state_dict = _resnet18_state_dict()
    state_dict["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    with pytest.raises(ValueError, match=r"'layer1.0.conv1.weight': expected shape \(64, 64, 3, 3\), "
                                         r"found \(64, 64, 5, 5\)"):
        from_torchvision("resnet18", state_dict, NUM_CLASSES)


def test_final_layer_with_wrong_input_size_is_an_error_not_a_reinit():
    state_dict = _resnet18_state_dict()
    state_dict["fc.weight"] = torch.zeros(1000, 256)
    state_dict["fc.bias"] = torch.zeros(1000)
    with pytest.raises(ValueError, match=r"'fc.weight': expected shape \(5, 512\), found \(1000, 256\)"):
        from_torchvision("resnet18", state_dict, NUM_CLASSES, rng=jax.random.PRNGKey(0))


def test_checkpoint_of_another_backbone_is_rejected():
    with pytest.raises(ValueError) as error:
        from_torchvision("resnet50", _resnet18_state_dict(), NUM_CLASSES)
    message = str(error.value)
    assert "does not fit resnet50 with num_classes=5" in message
    assert "shape mismatch(es)" in message and "missing key(s)" in message
    assert "'layer1.0.conv1.weight': expected shape (64, 64, 1, 1), found (64, 64, 3, 3)" in message


def test_data_parallel_prefix_gets_a_hint():
    state_dict = {f"module.{key}": value for key, value in _torch_model("small_cnn").state_dict().items()}
    with pytest.raises(ValueError, match="DataParallel"):
        from_torchvision("small_cnn", state_dict, NUM_CLASSES)


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="unknown model name 'resnet34'"):
        from_torchvision("resnet34", {}, NUM_CLASSES)
