"""GainConfig.mask_grad: with "stop" the soft mask is a constant for L_am (only the classifier on the erased
image trains), checked in float64 against L_am rebuilt by hand from a detached mask; "through" (upstream)
is unchanged, and the forward values are the same either way."""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gain_jax as gj
from gain_jax import config as run_config

NUM_CLASSES = 4
LABELS = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], np.float64)


@pytest.fixture(scope="module")
def small64():
    model = gj.build_model("small_cnn", NUM_CLASSES, dropout_rate=0.0)
    with jax.enable_x64(True):
        images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 20, 3), jnp.float64)
        variables = model.init(jax.random.PRNGKey(0), images)
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    return model, variables, images


def am_loss(model, variables, images, cfg):
    def loss(params):
        out = gj.gain_forward(model, {**variables, "params": params}, images, jnp.asarray(LABELS), cfg)
        return gj.gain_losses(out, jnp.asarray(LABELS), cfg)["am"], out
    return loss


@pytest.mark.parametrize("mode", ["union", "per_label"])
@pytest.mark.parametrize("am_batchnorm", ["frozen", "batch"])
@pytest.mark.slow
def test_stop_equals_l_am_of_a_detached_mask_in_float64(small64, mode, am_batchnorm):
    model, variables, images = small64
    cfg = gj.GainConfig(mode=mode, max_labels=2, mask_grad="stop", am_batchnorm=am_batchnorm, score="sigmoid")
    with jax.enable_x64(True):
        (value, out), grads = jax.value_and_grad(am_loss(model, variables, images, cfg), has_aux=True)(
            variables["params"])
        # by hand: the same erased images from a mask held constant, through the same attention-mining forward
        mask = jax.lax.stop_gradient(out.mask)
        num_slots = mask.shape[1]

        def by_hand(params):
            erased = images[:, None] * (1 - mask[..., None])  # fill 0 (constant erase)
            am_variables = {"params": params, "batch_stats": out.model_state["batch_stats"]}
            flat = erased.reshape((-1,) + erased.shape[2:])
            logits_am = gj.AM_FORWARDS[am_batchnorm](model, am_variables, flat, True, None)
            hand_out = out.replace(logits_am=logits_am.reshape((images.shape[0], num_slots, -1)))
            return gj.gain_losses(hand_out, jnp.asarray(LABELS), cfg)["am"]

        want_value, want_grads = jax.value_and_grad(by_hand)(variables["params"])
        np.testing.assert_allclose(value, want_value, rtol=0, atol=1e-14)
        for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-14)

        # "through" (upstream) differs only in the gradient: same value, a different gradient
        through = gj.GainConfig(mode=mode, max_labels=2, am_batchnorm=am_batchnorm, score="sigmoid")
        (through_value, through_out), through_grads = jax.value_and_grad(
            am_loss(model, variables, images, through), has_aux=True)(variables["params"])
        np.testing.assert_array_equal(through_value, value)
        np.testing.assert_array_equal(through_out.masked_images, out.masked_images)
        differences = [float(jnp.max(jnp.abs(a - b))) for a, b in
                       zip(jax.tree_util.tree_leaves(through_grads), jax.tree_util.tree_leaves(grads))]
        assert max(differences) > 1e-6


@pytest.mark.slow
def test_stop_leaves_the_classification_and_mask_losses_alone(small64):
    """L_cl and L_ext never pass through the erased image: their gradients are identical under both."""
    model, variables, images = small64
    masks = jnp.asarray(np.random.default_rng(0).integers(0, NUM_CLASSES + 1, (3, 16, 20)))
    with jax.enable_x64(True):
        grads = {}
        for mask_grad in ("through", "stop"):
            cfg = gj.GainConfig(mask_grad=mask_grad, ex_weight=1.0)

            def cl_plus_ex(params, cfg=cfg):
                out = gj.gain_forward(model, {**variables, "params": params}, images, jnp.asarray(LABELS), cfg)
                terms = gj.gain_losses(out, jnp.asarray(LABELS), cfg, gt_masks=masks)
                return terms["cl"] + terms["ex"]

            grads[mask_grad] = jax.grad(cl_plus_ex)(variables["params"])
        for a, b in zip(jax.tree_util.tree_leaves(grads["through"]), jax.tree_util.tree_leaves(grads["stop"])):
            np.testing.assert_array_equal(a, b)


def test_default_is_upstream_and_bad_names_are_refused():
    assert gj.GainConfig().mask_grad == "through"
    with pytest.raises(ValueError, match="mask_grad must be one of stop, through"):
        gj.GainConfig(mask_grad="detach")


def test_train_py_flag_mask_grad():
    parser = argparse.ArgumentParser()
    run_config.add_flags(parser)
    config = run_config.config_from_flags(parser.parse_args(["--mask_grad", "stop"]))
    assert config.gain.mask_grad == "stop"
    assert run_config.config_flags(config) == ["--mask_grad", "stop"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--mask_grad", "detach"])
    # a run saved before the field existed let L_am reach the mask (upstream)
    assert run_config.config_from_saved({"gain": {"fill": 0.0}}).gain.mask_grad == "through"
