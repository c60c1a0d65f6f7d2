"""Train/eval steps: the optimizer step is Adam on the GAIN total; the attention losses, and attention mining
alone, switch on without recompiling."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gain_jax as gj

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def setup():
    model = gj.build_model("small_cnn", NUM_CLASSES, dropout_rate=0.0)
    # inputs drawn with numpy: jax.random compiles a threefry program per shape (~0.8 CPU-s each)
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.standard_normal((4, 24, 24, 3)), jnp.float32)
    labels = jnp.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]], jnp.float32)
    masks = jnp.asarray(rng.integers(0, NUM_CLASSES + 1, (4, 24, 24)), jnp.uint8)
    batch = {"image": images, "labels": labels, "mask": masks, "has_mask": jnp.array([True, False, True, True])}
    # one compiled program, not op by op; small_cnn's initial weights do not depend on the image size or batch
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    return model, variables, batch


def manual_step(model, variables, batch, cfg, tx, attention_on, mining_on=1.0):
    def loss(params):
        if attention_on:
            out = gj.gain_forward(model, {**variables, "params": params}, batch["image"], batch["labels"], cfg,
                                  rngs={"dropout": jax.random.PRNGKey(0)})
            terms = gj.gain_losses(out, batch["labels"], cfg, gt_masks=batch["mask"], has_mask=batch["has_mask"])
            if not mining_on:  # the mask loss without attention mining
                return cfg.cl_weight * terms["cl"] + cfg.ex_weight * terms["ex"], out.model_state
            return terms["total"], out.model_state
        out = gj.gain_forward(model, {**variables, "params": params}, batch["image"], batch["labels"], cfg,
                              rngs={"dropout": jax.random.PRNGKey(0)})
        logits, state = model.apply({**variables, "params": params}, batch["image"], train=True,
                                    mutable=["batch_stats"])
        return optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean() * cfg.cl_weight, out.model_state

    @functools.partial(jax.jit)  # one program: the update too, not op by op
    def step(params):
        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return value, optax.apply_updates(params, updates), state

    return step(variables["params"])


@pytest.mark.parametrize("attention_on, mining_on", [pytest.param(0.0, 1.0, marks=pytest.mark.slow), (1.0, 1.0),
                                                     pytest.param(1.0, 0.0, marks=pytest.mark.slow)])
def test_train_step_applies_the_optimizer_to_the_right_loss(setup, attention_on, mining_on):
    """SGD with lr 1 makes the step's parameter change the gradient itself. (Adam would hide the gradient's
    size, and turn the float noise in the exactly-zero gradients of conv biases before BatchNorm into
    full-size steps.)"""
    model, variables, batch = setup
    cfg = gj.GainConfig(cl_weight=1.5, am_weight=0.5, ex_weight=2.0)
    tx = optax.sgd(1.0)
    step = gj.make_train_step(model, cfg, donate=False)
    state = gj.create_train_state(variables, tx)
    new_state, metrics = step(state, batch, jax.random.PRNGKey(0), attention_on, mining_on)
    want_loss, want_params, want_state = manual_step(model, variables, batch, cfg, tx, attention_on, mining_on)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    for got, want, old in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(want_params),
                              jax.tree_util.tree_leaves(variables["params"])):
        grad_got, grad_want = np.asarray(old) - np.asarray(got), np.asarray(old) - np.asarray(want)
        assert np.max(np.abs(grad_got - grad_want)) <= 1e-4 * max(np.max(np.abs(grad_want)), 1e-3)
    for got, want in zip(jax.tree_util.tree_leaves(new_state.batch_stats), jax.tree_util.tree_leaves(want_state)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(new_state.step) == 1
    # the terms are computed and reported during pre-training too
    assert float(metrics["am"]) > 0 and float(metrics["ex"]) > 0


def test_switching_attention_and_mining_on_does_not_recompile(setup):
    model, variables, batch = setup
    step = gj.make_train_step(model, gj.GainConfig(mode="per_label", max_labels=2))
    # the step donates its state: give it copies, the fixture's arrays are shared with other tests
    state = gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), optax.adam(1e-3))
    losses = []
    for i, (attention_on, mining_on) in enumerate([(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (1.0, 1.0)]):
        state, metrics = step(state, batch, jax.random.PRNGKey(i), jnp.float32(attention_on), jnp.float32(mining_on))
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1
    assert all(np.isfinite(losses))
    assert int(state.step) == 4


def test_total_loss_mining_switch_drops_exactly_the_attention_mining_term():
    cfg = gj.GainConfig(cl_weight=1.5, am_weight=0.3, ex_weight=2.0)
    cl, am, ex = (jnp.float32(value) for value in (0.6931, 0.2718, 0.0123))
    terms = {"cl": cl, "am": am, "ex": ex}
    # before mining_on existed: cl_weight*cl + attention_on*(am_weight*am + ex_weight*ex), bit for bit
    for attention_on in (0.0, 1.0):
        before = cfg.cl_weight * cl + jnp.float32(attention_on) * (cfg.am_weight * am + cfg.ex_weight * ex)
        assert gj.total_loss(terms, cfg, attention_on).tobytes() == before.tobytes()
        assert gj.total_loss(terms, cfg, attention_on, 1.0).tobytes() == before.tobytes()
    assert gj.total_loss(terms, cfg).tobytes() == gj.total_loss(terms, cfg, 1.0).tobytes()
    # mining off: the classification and mask losses alone, exactly; with attention off as well: cl alone
    assert float(gj.total_loss(terms, cfg, 1.0, 0.0)) == float(cfg.cl_weight * cl + cfg.ex_weight * ex)
    assert float(gj.total_loss(terms, cfg, 1.0, jnp.float32(0.0))) == float(cfg.cl_weight * cl + cfg.ex_weight * ex)
    assert float(gj.total_loss(terms, cfg, 0.0, 0.0)) == float(cfg.cl_weight * cl)
    # and the gradient of L_am is 0 with mining off, am_weight with it on
    grad_am = jax.grad(lambda value, on: gj.total_loss({**terms, "am": value}, cfg, 1.0, on))
    assert float(grad_am(am, 0.0)) == 0.0 and float(grad_am(am, 1.0)) == pytest.approx(0.3)


@pytest.mark.slow  # two train programs (12 s); the fast tier keeps the eval step's test of the same
def test_mask_loss_alone_leaves_out_the_attention_mining_stream_and_trains_the_same(setup):
    """am_weight 0: the step's program has no erased-image forward (fewer convolutions), L_am reads NaN (not
    computed), and the update equals the one with the stream kept and its term weighted 0 (the step before)."""
    model, variables, batch = setup
    cfg = gj.GainConfig(cl_weight=1.5, am_weight=0.0, ex_weight=2.0)
    tx = optax.sgd(1.0)
    step = gj.make_train_step(model, cfg, donate=False)
    state = gj.create_train_state(variables, tx)
    new_state, metrics = step(state, batch, jax.random.PRNGKey(0), 1.0, 1.0)
    assert np.isnan(float(metrics["am"])) and np.isfinite(float(metrics["loss"])) and float(metrics["ex"]) > 0

    def kept(params):  # the stream computed, its term multiplied by 0
        out = gj.gain_forward(model, {**variables, "params": params}, batch["image"], batch["labels"], cfg,
                              rngs={"dropout": jax.random.PRNGKey(0)}, attention_mining=True)
        terms = gj.gain_losses(out, batch["labels"], cfg, gt_masks=batch["mask"], has_mask=batch["has_mask"])
        assert out.logits_am is not None
        return cfg.cl_weight * terms["cl"] + (0.0 * terms["am"] + cfg.ex_weight * terms["ex"]), out.model_state

    (want_loss, want_state), grads = jax.jit(jax.value_and_grad(kept, has_aux=True))(variables["params"])
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
    for got, old, grad in zip(jax.tree_util.tree_leaves(new_state.params),
                              jax.tree_util.tree_leaves(variables["params"]), jax.tree_util.tree_leaves(grads)):
        # (conv biases before BatchNorm have gradients of exactly 0 up to float noise: an absolute bound)
        step_taken = np.asarray(old) - np.asarray(got)
        assert np.max(np.abs(step_taken - grad)) <= 1e-4 * max(float(np.max(np.abs(grad))), 1e-3)
    for got, want in zip(jax.tree_util.tree_leaves(new_state.batch_stats), jax.tree_util.tree_leaves(want_state)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)

    def convolutions(gain_cfg):
        program = gj.make_train_step(model, gain_cfg, donate=False).lower(state, batch, jax.random.PRNGKey(0), 1.0,
                                                                          1.0)
        return program.as_text().count("stablehlo.convolution")

    with_stream = convolutions(gj.GainConfig(cl_weight=1.5, am_weight=0.1, ex_weight=2.0))
    assert convolutions(cfg) < with_stream
    with pytest.raises(ValueError, match="needs the attention-mining stream"):
        out = gj.gain_forward(model, variables, batch["image"], batch["labels"], cfg, train=False,
                              attention_mining=False)
        gj.gain_losses(out, batch["labels"], gj.GainConfig(am_weight=0.1))


def test_eval_step_outputs_and_class_cams(setup):
    model, variables, batch = setup
    cfg = gj.GainConfig()
    ev = gj.make_eval_step(model, cfg)(gj.create_train_state(variables, optax.adam(1e-3)), batch)
    assert ev["class_cams"].shape == (4, NUM_CLASSES, 24, 24)
    assert ev["scaled"].shape == (4, 1, 24, 24)
    predicted = np.argmax(np.asarray(ev["logits"]), axis=-1)
    # the map gain_forward attends to in evaluation is the predicted class's map among class_cams
    np.testing.assert_allclose(ev["scaled"][:, 0], np.asarray(ev["class_cams"])[np.arange(4), predicted], atol=1e-5)
    for name in ("loss", "cl", "am", "ex"):
        assert np.isfinite(float(ev[name]))


def test_eval_step_of_the_mask_loss_alone_leaves_out_the_attention_mining_stream(setup):
    """am_weight 0: the same outputs as with L_am weighted, but "am" NaN and the total without it."""
    model, variables, batch = setup
    state = gj.create_train_state(variables, optax.adam(1e-3))
    alone = gj.make_eval_step(model, gj.GainConfig(am_weight=0.0, ex_weight=2.0))(state, batch)
    mined = gj.make_eval_step(model, gj.GainConfig(am_weight=0.5, ex_weight=2.0))(state, batch)
    for name in ("logits", "cl", "ex", "class_cams", "scaled", "masked_images"):
        np.testing.assert_allclose(alone[name], mined[name], rtol=1e-6, atol=1e-7)
    assert np.isnan(float(alone["am"])) and np.isfinite(float(mined["am"]))
    np.testing.assert_allclose(alone["loss"], float(mined["cl"]) + 2.0 * float(mined["ex"]), rtol=1e-6)


@pytest.mark.slow
def test_sweep_step_equals_the_runs_one_by_one(setup):
    """Three runs (own weights, data and dropout keys) for three steps, as one program and one by one: the
    same losses and parameters to float32 rounding. SGD keeps the comparison meaningful (Adam turns the
    float noise of exactly-zero gradients into full-size steps); dropout on, so the keys matter.
    The vmap strategy here; the unrolled one is asserted the same way through the whole loop, a sweep of
    train_and_evaluate against each seed's separate run (tests/test_train_sweep.py)."""
    _, _, batch = setup
    model = gj.build_model("small_cnn", NUM_CLASSES, dropout_rate=0.5)
    cfg = gj.GainConfig(am_weight=0.5, ex_weight=1.0, am_batchnorm="batch", score="sigmoid")
    tx = optax.sgd(0.1)
    runs = 3
    init = jax.jit(model.init)
    states = [gj.create_train_state(init(jax.random.PRNGKey(10 + run), batch["image"]), tx)
              for run in range(runs)]
    batches = [{**batch, "image": jax.random.normal(jax.random.PRNGKey(20 + run), batch["image"].shape)}
               for run in range(runs)]
    keys = [jax.random.PRNGKey(30 + run) for run in range(runs)]
    step = gj.make_train_step(model, cfg, donate=False)
    sweep_step = gj.make_sweep_train_step(model, cfg, strategy="vmap")
    stacked = gj.stack_trees(states)
    for step_index in range(3):
        step_keys = [jax.random.fold_in(key, step_index) for key in keys]
        singles = [step(state, run_batch, key, 1.0, 1.0) for state, run_batch, key in zip(states, batches, step_keys)]
        stacked, metrics = sweep_step(stacked, gj.stack_trees(batches), jnp.stack(step_keys), 1.0, 1.0)
        states = [state for state, _ in singles]
        for run, (_, single_metrics) in enumerate(singles):
            for key in ("loss", "cl", "am", "ex"):
                np.testing.assert_allclose(metrics[key][run], single_metrics[key], rtol=2e-5, atol=1e-6)
    for run in range(runs):
        assert int(gj.tree_slice(stacked, run).step) == 3
        for got, want in zip(jax.tree.leaves(gj.tree_slice(stacked, run).params), jax.tree.leaves(states[run].params)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        for got, want in zip(jax.tree.leaves(gj.tree_slice(stacked, run).batch_stats),
                             jax.tree.leaves(states[run].batch_stats)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the runs differ from each other, so the comparison above could fail
    assert not np.allclose(metrics["loss"][0], metrics["loss"][1])


def test_sweep_step_refuses_per_label_packing_and_unknown_strategies(setup):
    model, variables, batch = setup
    with pytest.raises(ValueError, match="strategy"):
        gj.make_sweep_train_step(model, gj.GainConfig(), strategy="threads")
    cfg = gj.GainConfig(mode="per_label")
    sweep_step = gj.make_sweep_train_step(model, cfg, donate=False)
    states = gj.stack_trees([gj.create_train_state(variables, optax.sgd(0.1))] * 2)
    packed = {**batch, "packing": gj.pack_labels(batch["labels"])}
    with pytest.raises(ValueError, match="packing"):
        sweep_step(states, gj.stack_trees([packed, packed]), jnp.stack([jax.random.PRNGKey(0)] * 2), 1.0)
