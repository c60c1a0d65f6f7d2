"""Packed per-label mode: the attention-mining stream on the (image, label) pairs present, with the losses
and gradients of the padded mode, and no image refused for its label count."""
import dataclasses
import functools

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


@functools.cache
def small_cnn(num_classes):
    """(model, initial float32 variables) of small_cnn with `num_classes` outputs and no dropout, shared by the
    tests; what they check holds for any weights. One jit-compiled init of the NUM_CLASSES model (model.init run
    eagerly compiles one small program per parameter shape); a model with fewer classes takes its weights and the
    head's first `num_classes` outputs, drawn as a fresh init draws them (U(+-1/sqrt(fan_in)), fan_in the features'
    width), without compiling an init of its own. small_cnn's parameters do not depend on the image size or batch
    (global average pooling)."""
    model = gj.build_model("small_cnn", num_classes, dropout_rate=0.0)
    if num_classes == NUM_CLASSES:
        fast_compile = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
        return model, jax.jit(model.init, compiler_options=fast_compile)(jax.random.PRNGKey(0),
                                                                         jnp.zeros((1, 24, 32, 3)))
    _, variables = small_cnn(NUM_CLASSES)
    head = {name: np.asarray(value)[..., :num_classes] for name, value in variables["params"]["fc"].items()}
    return model, {**variables, "params": {**variables["params"], "fc": head}}


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
@pytest.mark.slow
def test_packed_equals_padded_in_float64(cam_grad):
    model, float32_variables = small_cnn(NUM_CLASSES)
    with jax.enable_x64(True):
        images = jnp.asarray(np.random.default_rng(1).standard_normal((5, 24, 32, 3)))  # float64
        # float64 copies made on the host, here and in the comparisons below (numpy, exact in float64 as XLA is):
        # each eager jnp operation would compile one program per parameter shape
        variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), float32_variables)
        labels, masks = jnp.asarray(LABELS, jnp.float64), jnp.asarray(MASKS)
        has_mask = jnp.asarray([1, 1, 0, 1, 1], jnp.float64)
        padded_cfg = gj.GainConfig(mode="per_label", max_labels=6, ex_weight=0.3, cam_grad=cam_grad)

        def total(params, cfg, packing):
            out = gj.gain_forward(model, {**variables, "params": params}, images, labels, cfg, packing=packing)
            terms = gj.gain_losses(out, labels, cfg, gt_masks=masks, has_mask=has_mask)
            return terms["total"], terms

        # the loss terms and the gradient of the total from one program per configuration (not a program for
        # the losses and another for the gradient, which would compile the forward pass twice)
        losses_and_grad = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)
        packing = jax.tree_util.tree_map(jnp.asarray, gj.pack_labels(LABELS))
        # packed ignores max_labels: an image with more labels than it is trained all the same
        packed_cfg = dataclasses.replace(padded_cfg, max_labels=1)
        (_, want), grads_want = losses_and_grad(variables["params"], padded_cfg, None)
        (_, got), grads_got = losses_and_grad(variables["params"], packed_cfg, packing)
        for key in ("cl", "am", "ex", "total"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=0, err_msg=key)
        assert float(want["am"]) > 0 and float(want["ex"]) > 0
        scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(jax.device_get(grads_want)))
        for g, w in zip(jax.tree_util.tree_leaves(jax.device_get(grads_got)),
                        jax.tree_util.tree_leaves(jax.device_get(grads_want))):
            assert float(np.max(np.abs(g - w))) <= 1e-12 * scale


def test_train_step_takes_the_packing_and_refuses_it_elsewhere():
    model, variables = small_cnn(NUM_CLASSES)
    images = jnp.zeros((5, 24, 32, 3))
    import optax

    state = gj.create_train_state(variables, optax.adam(1e-3))
    step = gj.make_train_step(model, gj.GainConfig(mode="per_label", max_labels=1), donate=False)
    batch = {"image": images, "labels": jnp.asarray(LABELS), "packing": gj.pack_labels(LABELS)}
    new_state, metrics = step(state, batch, jax.random.PRNGKey(0), 1.0)
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
    with pytest.raises(ValueError, match="packing is for per-label mode"):
        gj.gain_forward(model, variables, images, jnp.asarray(LABELS), gj.GainConfig(), packing=gj.pack_labels(LABELS))


# ---------------------------------------------------------------- sampled attention-mining labels

# images with 1, 2 and 3 labels
FEW_LABELS = np.zeros((3, 5), np.float32)
for image, classes in enumerate([[4], [0, 2], [1, 2, 3]]):
    FEW_LABELS[image, classes] = 1.0


def _draws(slot_labels, per_image):
    """Every equally likely `am_slots` of `sample_am_slots(slot_labels, per_image)`: per image, each subset of
    min(per_image, n_i) of its real slots, the images independent."""
    import itertools

    choices = []
    for row in slot_labels:
        real = np.flatnonzero(row >= 0)
        choices.append(list(itertools.combinations(real, min(per_image, real.size))))
    for combination in itertools.product(*choices):
        am_slots = np.zeros(slot_labels.shape, bool)
        for image, subset in enumerate(combination):
            am_slots[image, list(subset)] = True
        yield am_slots


@pytest.mark.parametrize("per_image", [1, 2])
@pytest.mark.slow
def test_sampled_am_is_unbiased_in_float64(per_image):
    """The mean over all equally likely draws of the sampled L_am, and of its gradient, is the full per-label
    L_am (and gradient); cl and ex do not depend on the draw."""
    model, float32_variables = small_cnn(5)
    with jax.enable_x64(True):
        images = jnp.asarray(np.random.default_rng(2).standard_normal((3, 24, 32, 3)))  # float64
        # float64 copies made on the host, here and in the comparisons below (numpy, exact in float64 as XLA is):
        # each eager jnp operation would compile one program per parameter shape
        variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), float32_variables)
        labels = jnp.asarray(FEW_LABELS, jnp.float64)
        masks = jnp.asarray(np.where(MASKS[:3] == 255, 255, MASKS[:3] % 6))
        cfg = gj.GainConfig(mode="per_label", ex_weight=0.3)

        @jax.jit
        def losses_and_am_grad(params, packing):
            def am(params):
                out = gj.gain_forward(model, {**variables, "params": params}, images, labels, cfg, packing=packing)
                terms = gj.gain_losses(out, labels, cfg, gt_masks=masks)
                return terms["am"], terms

            return jax.grad(am, has_aux=True)(params)

        full_packing = gj.pack_labels(FEW_LABELS)
        full_grad, full = losses_and_am_grad(variables["params"], jax.tree_util.tree_map(jnp.asarray, full_packing))
        draws = list(_draws(full_packing.slot_labels, per_image))
        assert len(draws) == {1: 6, 2: 3}[per_image]
        full_grad = jax.device_get(full_grad)
        am_sum, grad_sum = 0.0, jax.tree_util.tree_map(np.zeros_like, full_grad)
        for am_slots in draws:
            packing = gj.gain.pack_slots(full_packing.slot_labels, am_slots)
            assert packing.row_valid.sum() == {1: 3, 2: 5}[per_image]
            grad, got = losses_and_am_grad(variables["params"], jax.tree_util.tree_map(jnp.asarray, packing))
            for key in ("cl", "ex"):  # every slot's map still counts in the mask loss
                np.testing.assert_allclose(got[key], full[key], rtol=1e-12, atol=0, err_msg=key)
            am_sum += float(got["am"])
            grad_sum = jax.tree_util.tree_map(np.add, grad_sum, jax.device_get(grad))
        np.testing.assert_allclose(am_sum / len(draws), float(full["am"]), rtol=1e-12, atol=0)
        assert float(full["am"]) > 0 and float(full["ex"]) > 0
        scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(full_grad))
        assert scale > 0
        for g, w in zip(jax.tree_util.tree_leaves(grad_sum), jax.tree_util.tree_leaves(full_grad)):
            assert float(np.max(np.abs(g / len(draws) - w))) <= 1e-12 * scale
        # a single draw is not the full estimate (the test would pass vacuously otherwise)
        single = losses_and_am_grad(variables["params"], jax.tree_util.tree_map(
            jnp.asarray, gj.gain.pack_slots(full_packing.slot_labels, draws[0])))[1]
        assert abs(float(single["am"]) - float(full["am"])) > 1e-6


@pytest.mark.parametrize("per_image", [6, 8])
def test_sampling_all_labels_is_the_unsampled_packing(per_image):
    """n >= the largest label count: exactly today's packing, hence exactly its losses and gradients."""
    want = gj.pack_labels(LABELS)
    got = gj.pack_labels(LABELS, am_labels_per_image=per_image, rng=np.random.default_rng(3))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_sampling_is_deterministic_and_uniform():
    packings = [gj.pack_labels(LABELS, am_labels_per_image=1, rng=np.random.default_rng(7)) for _ in range(2)]
    packings.append(gj.pack_labels(LABELS, am_labels_per_image=1, rng=7))  # a seed is a Generator's seed
    for packing in packings[1:]:
        for a, b in zip(jax.tree_util.tree_leaves(packing), jax.tree_util.tree_leaves(packings[0])):
            np.testing.assert_array_equal(a, b)
    first = packings[0]
    # one row per image (5 of the 15 pairs), the row count from row_count(5, 5)
    assert first.rows.shape == (gj.gain.row_count(5, 5),) and first.row_valid.sum() == 5
    assert sorted(np.asarray(first.rows[:5]) // first.slot_labels.shape[1]) == [0, 1, 2, 3, 4]
    assert len({tuple(gj.pack_labels(LABELS, am_labels_per_image=1, rng=seed).rows) for seed in range(20)}) > 1
    # each subset of an image's labels equally likely: image 2 has 6 labels, 2 drawn -> 15 subsets
    rng, counts = np.random.default_rng(0), {}
    slot_labels = gj.gain.label_slots(LABELS)
    for _ in range(15000):
        chosen = gj.gain.sample_am_slots(slot_labels, 2, rng)
        assert chosen.sum(axis=1).tolist() == [1, 2, 2, 1, 2]
        key = tuple(np.flatnonzero(chosen[2]))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 15 and max(abs(c - 1000) for c in counts.values()) < 130  # ~4 standard deviations


def test_sampling_option_is_validated():
    with pytest.raises(ValueError, match="must be >= 0"):
        gj.GainConfig(mode="per_label", am_labels_per_image=-1)
    with pytest.raises(ValueError, match="for mode per_label"):
        gj.GainConfig(mode="union", am_labels_per_image=1)
    with pytest.raises(ValueError, match="needs rng"):
        gj.pack_labels(LABELS, am_labels_per_image=1)
    model, variables = small_cnn(NUM_CLASSES)
    images = jnp.zeros((5, 24, 32, 3))
    with pytest.raises(ValueError, match="needs packing"):
        gj.gain_forward(model, variables, images, jnp.asarray(LABELS),
                        gj.GainConfig(mode="per_label", max_labels=6, am_labels_per_image=1))


def test_train_loop_samples_from_seed_and_step():
    from gain_jax import train_loop

    config = gj.Config(gain=gj.GainConfig(mode="per_label", am_labels_per_image=1))
    batch = {"filename": np.array([f"img{i}".encode() for i in range(5)]), "labels": LABELS,
             "has_mask": np.ones(5, bool)}

    def rows(step, seed=0):
        config_seed = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
        return tuple(train_loop.prepare_train_batch(batch, config_seed, step)["packing"].rows)

    assert rows(3) == rows(3) and len(rows(3)) == gj.gain.row_count(5, 5)
    assert len({rows(step) for step in range(10)}) > 1 and len({rows(3, seed) for seed in range(10)}) > 1
    unsampled = dataclasses.replace(config, gain=gj.GainConfig(mode="per_label"))
    np.testing.assert_array_equal(train_loop.prepare_train_batch(batch, unsampled, 3)["packing"].rows,
                                  gj.pack_labels(LABELS).rows)


@pytest.mark.slow
def test_sampled_run_resumes_as_if_uninterrupted(shapes_data_dir, tmp_path):
    """train.py draws each step's labels from (seed, global step): stopped after 3 of 4 steps and resumed, a
    run has the losses of an uninterrupted one (gain_shapes images carry 1 to 3 labels)."""
    from gain_jax.train_loop import train_and_evaluate

    config = gj.Config(gain=gj.GainConfig(mode="per_label", am_labels_per_image=1),
                       data=gj.config.DataConfig(data_dir=shapes_data_dir, image_size=32),
                       train=gj.config.TrainConfig(batch_size=8, steps_per_epoch=2, epochs=2, pretrain_epochs=1),
                       eval=gj.config.EvalConfig(eval_examples=16),
                       log=gj.config.LogConfig(logdir=str(tmp_path), run_name="whole", num_heatmaps=2, log_every=1))
    _, whole = train_and_evaluate(config)
    parted = dataclasses.replace(config, log=dataclasses.replace(config.log, run_name="parted"))
    _, first = train_and_evaluate(parted, stop_after=3)
    assert first["status"] == "stopped after 3 steps"
    _, resumed = train_and_evaluate(parted, resume=True)
    assert whole["status"] == resumed["status"] == "finished"
    assert [r["step"] for r in resumed["steps"]] == [r["step"] for r in whole["steps"]] == [1, 2, 3, 4]
    for got, want in zip(resumed["steps"], whole["steps"]):
        for key in ("loss", "cl", "am", "ex"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9, nan_ok=True), (got["step"], key)
    # the classification-only epoch trains without the attention-mining stream (am NaN), the second with it
    assert [np.isnan(r["am"]) for r in whole["steps"]] == [True, True, False, False]
    assert all(r["am"] > 0 for r in whole["steps"][2:])
