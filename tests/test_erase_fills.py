"""What fills the erased region (gain_jax.ERASE_FILLS, GainConfig.erase): upstream's constant, bit for bit,
and the image rolled by half its size, against numpy, inside gain_forward and from train.py's flags."""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gain_jax as gj
from gain_jax import config as run_config
from gain_jax import variants

NUM_CLASSES = 4
LABELS = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], np.float32)


@pytest.fixture(scope="module")
def small():
    model = gj.build_model("small_cnn", NUM_CLASSES, dropout_rate=0.0)
    # drawn with numpy: jax.random compiles a threefry program per shape (~0.8 CPU-s)
    images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 20, 3)), jnp.float32)
    # small_cnn's initial weights do not depend on the image size or batch
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    return model, variables, images


def to_float64(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def test_the_default_is_constant_and_the_entries_are_registered():
    assert gj.GainConfig().erase == "constant" and run_config.Config().gain.erase == "constant"
    assert variants.REGISTRIES["erase"] is gj.ERASE_FILLS and {"constant", "shift"} <= set(gj.ERASE_FILLS)


@pytest.mark.parametrize("fill", [0.0, -1.5, (0.1, -0.2, 0.3)], ids=["zero", "scalar", "per_channel"])
def test_constant_is_todays_erasing_bit_for_bit(small, fill):
    model, variables, images = small
    cfg = gj.GainConfig(fill=fill, erase="constant")
    out = gj.gain_forward(model, variables, images, jnp.asarray(LABELS), cfg)
    # the call gain_forward made before the erase registry existed
    np.testing.assert_array_equal(out.masked_images, gj.apply_mask(images[:, None], out.mask, cfg.fill))
    x, mask = np.asarray(images, np.float64)[:, None], np.asarray(out.mask, np.float64)[..., None]
    np.testing.assert_allclose(out.masked_images, x * (1 - mask) + mask * np.asarray(fill), rtol=1e-6, atol=1e-6)


def test_shift_is_the_image_rolled_by_half_its_height_and_width():
    with jax.enable_x64(True):
        images = np.random.default_rng(0).normal(size=(2, 5, 6, 3))
        shifted = gj.ERASE_FILLS["shift"](jnp.asarray(images), 0.7)  # the fill value is ignored
        assert shifted.dtype == jnp.float64
        np.testing.assert_array_equal(shifted, np.roll(images, (2, 3), axis=(1, 2)))
        # per image under vmap too
        per_image = jax.vmap(lambda image: gj.ERASE_FILLS["shift"](image, 0.0))(jnp.asarray(images))
        np.testing.assert_array_equal(per_image, shifted)


def test_shift_erases_with_the_rolled_image_in_gain_forward_in_float64(small):
    model, variables, images = small
    cfg = gj.GainConfig(mode="per_label", max_labels=2, erase="shift")
    with jax.enable_x64(True):
        variables, images, labels = to_float64((variables, images, jnp.asarray(LABELS)))
        out = jax.jit(gj.gain_forward, static_argnums=(0, 4))(model, variables, images, labels, cfg)
        assert out.masked_images.dtype == jnp.float64 and out.masked_images.shape == (2, 2, 16, 20, 3)
        x = np.asarray(images)[:, None]
        mask = np.asarray(out.mask)[..., None]
        want = x * (1 - mask) + mask * np.roll(x, (8, 10), axis=(2, 3))
        np.testing.assert_allclose(out.masked_images, want, rtol=0, atol=1e-12)
        # the erased region does hold image content, not a constant
        assert float(np.max(mask)) > 0.5


@pytest.mark.slow
def test_shift_gives_a_finite_nonzero_attention_mining_gradient(small):
    model, variables, images = small
    labels = jnp.asarray(LABELS)

    def am_loss(params, cfg):
        out = gj.gain_forward(model, {**variables, "params": params}, images, labels, cfg)
        return gj.gain_losses(out, labels, cfg)["am"]

    grad = jax.jit(jax.grad(am_loss), static_argnums=1)  # one program per fill, not op by op
    grads = {erase: grad(variables["params"], gj.GainConfig(erase=erase))
             for erase in ("constant", "shift")}
    leaves = jax.tree_util.tree_leaves(grads["shift"])
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert any(np.any(leaf != 0) for leaf in leaves)
    # the fill reaches L_am: its gradient differs from the constant fill's
    assert any(not np.allclose(a, b) for a, b in zip(leaves, jax.tree_util.tree_leaves(grads["constant"])))


def test_an_unknown_erase_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="erase must be one of constant, shift"):
        gj.GainConfig(erase="noise")
    with pytest.raises(ValueError, match="unknown erase variant 'noise'; choose from constant, shift"):
        variants.lookup("erase", "noise")


def test_train_py_flag_erase():
    parser = argparse.ArgumentParser()
    run_config.add_flags(parser)
    config = run_config.config_from_flags(parser.parse_args(["--erase", "shift"]))
    assert config.gain.erase == "shift"
    assert run_config.config_flags(config) == ["--erase", "shift"]
    with pytest.raises(SystemExit):  # argparse refuses names outside the registry
        parser.parse_args(["--erase", "noise"])
    # a run saved before the field existed erased with the constant
    assert run_config.config_from_saved({"gain": {"fill": 0.0}}).gain.erase == "constant"
