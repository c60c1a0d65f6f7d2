"""Packed per-label mode: the attention-mining stream on the (image, label) pairs present, with the losses
and gradients of the padded mode, and no image refused for its label count."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gain_jax as gj

NUM_CLASSES = 7
# 1 to 6 labels per image: more than the default max_labels (4)
LABELS = np.zeros((5, NUM_CLASSES), np.float32)
for image, classes in enumerate([[0], [1, 3], [0, 2, 4, 5, 6, 1], [6], [2, 3, 5]]):
    LABELS[image, classes] = 1.0
MASKS = np.random.default_rng(0).integers(0, NUM_CLASSES + 1, (5, 24, 32)).astype(np.int32)
MASKS[0, :4] = 255  # some ignored pixels


def test_pack_labels_layout():
    packing = gj.pack_labels(LABELS)
    assert packing.slot_labels.shape == (5, 8)  # 6 labels at most -> 8 slots
    np.testing.assert_array_equal(packing.slot_labels[2, :7], [0, 1, 2, 4, 5, 6, -1])
    pairs = int(LABELS.sum())  # 15
    assert packing.rows.shape == (gj.gain.row_count(pairs, 5),) and packing.rows.shape[0] >= pairs
    assert packing.row_valid.sum() == pairs
    flat = packing.slot_labels.reshape(-1)
    assert np.all(flat[packing.rows[:pairs]] >= 0) and len(set(packing.rows[:pairs].tolist())) == pairs
    assert gj.gain.row_count(15, 5, multiple=4) % 4 == 0


def test_row_counts_come_from_a_few_sizes():
    sizes = {gj.gain.row_count(pairs, 32) for pairs in range(1, 257)}
    assert len(sizes) <= 13 and max(sizes) == 256
    for pairs in range(1, 257):  # never more than 25% padding beyond one batch
        assert gj.gain.row_count(pairs, 32) <= max(32, 1.25 * pairs + 1)


@pytest.mark.parametrize("cam_grad", ["stop", "full"])
def test_packed_equals_padded_in_float64(cam_grad):
    with jax.enable_x64(True):
        model = gj.build_model("small_cnn", NUM_CLASSES, dropout_rate=0.0)
        images = jax.random.normal(jax.random.PRNGKey(1), (5, 24, 32, 3), jnp.float64)
        variables = model.init(jax.random.PRNGKey(0), images)
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
        labels, masks = jnp.asarray(LABELS, jnp.float64), jnp.asarray(MASKS)
        has_mask = jnp.asarray([1, 1, 0, 1, 1], jnp.float64)
        padded_cfg = gj.GainConfig(mode="per_label", max_labels=6, ex_weight=0.3, cam_grad=cam_grad)

        def losses(params, cfg, packing):
            out = gj.gain_forward(model, {**variables, "params": params}, images, labels, cfg, packing=packing)
            return gj.gain_losses(out, labels, cfg, gt_masks=masks, has_mask=has_mask)

        def total(params, cfg, packing):
            return losses(params, cfg, packing)["total"]

        losses = jax.jit(losses, static_argnums=1)
        grad = jax.jit(jax.grad(total), static_argnums=1)
        packing = jax.tree_util.tree_map(jnp.asarray, gj.pack_labels(LABELS))
        # packed ignores max_labels: an image with more labels than it is trained all the same
        packed_cfg = dataclasses.replace(padded_cfg, max_labels=1)
        want, got = losses(variables["params"], padded_cfg, None), losses(variables["params"], packed_cfg, packing)
        for key in ("cl", "am", "ex", "total"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=0, err_msg=key)
        assert float(want["am"]) > 0 and float(want["ex"]) > 0
        grads_want = grad(variables["params"], padded_cfg, None)
        grads_got = grad(variables["params"], packed_cfg, packing)
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads_want))
        for g, w in zip(jax.tree_util.tree_leaves(grads_got), jax.tree_util.tree_leaves(grads_want)):
            assert float(jnp.max(jnp.abs(g - w))) <= 1e-12 * scale


def test_train_step_takes_the_packing_and_refuses_it_elsewhere():
    model = gj.build_model("small_cnn", NUM_CLASSES, dropout_rate=0.0)
    images = jnp.zeros((5, 24, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), images)
    import optax

    state = gj.create_train_state(variables, optax.adam(1e-3))
    step = gj.make_train_step(model, gj.GainConfig(mode="per_label", max_labels=1), donate=False)
    batch = {"image": images, "labels": jnp.asarray(LABELS), "packing": gj.pack_labels(LABELS)}
    new_state, metrics = step(state, batch, jax.random.PRNGKey(0), 1.0)
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
    with pytest.raises(ValueError, match="packing is for per-label mode"):
        gj.gain_forward(model, variables, images, jnp.asarray(LABELS), gj.GainConfig(), packing=gj.pack_labels(LABELS))
