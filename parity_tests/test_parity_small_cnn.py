"""Parity of gain_jax and gain_torch_ref on small_cnn (BatchNorm after every conv; Grad-CAM layer at 1/8) and on
small_cnn_nobn (the same network without BatchNorm)."""
import jax
import numpy as np
import parity_harness
import pytest
import torch
from parity_harness import NORMALIZED_BLACK, Case, ModelPair, check_adam, check_float32, check_float64

UNION_TRAIN = Case("small_cnn", (32, 40), ((0, 2), (5,), (1, 3, 4, 5)), mode="union", train=True,
                   fill=NORMALIZED_BLACK, ex=True, weights=(0.7, 1.3, 2.0))
PER_LABEL_TRAIN = Case("small_cnn", (24, 40), ((0,), (2, 5), (0, 1, 3, 4)), mode="per_label", train=True, ex=True,
                       weights=(1.0, 0.5, 3.0))
UPSTREAM_BATCH_1 = Case("small_cnn", (32, 32), ((1, 3, 4),), mode="per_label", train=True, grads_off=True,
                        upstream_total=True)
UNION_EVAL = Case("small_cnn", (32, 40), ((0, 2), (5,), (1, 3, 4, 5)), mode="union", train=False, ex=True,
                  weights=(1.0, 1.0, 2.0))
PER_LABEL_EVAL = Case("small_cnn", (32, 32), ((2, 4),), mode="per_label", train=False, grads_off=True,
                      fill=NORMALIZED_BLACK, ex=True, dropout=0.5)

# small_cnn_nobn: the same network without BatchNorm (no running statistics, nothing for frozen BN to freeze)
NOBN_UNION_TRAIN = Case("small_cnn_nobn", (32, 40), ((0, 2), (5,), (1, 3, 4, 5)), mode="union", train=True,
                        fill=NORMALIZED_BLACK, ex=True, weights=(0.7, 1.3, 2.0))
NOBN_PER_LABEL_TRAIN = Case("small_cnn_nobn", (24, 40), ((0,), (2, 5), (0, 1, 3, 4)), mode="per_label", train=True,
                            ex=True, weights=(1.0, 0.5, 3.0))
NOBN_PER_LABEL_EVAL = Case("small_cnn_nobn", (32, 32), ((2, 4),), mode="per_label", train=False, grads_off=True,
                           fill=NORMALIZED_BLACK, ex=True, dropout=0.5)

# the fast tier keeps every small_cnn case; small_cnn_nobn's (about 12 s) run with the whole suite
FLOAT64_CASES = [UNION_TRAIN, PER_LABEL_TRAIN, UPSTREAM_BATCH_1, UNION_EVAL, PER_LABEL_EVAL,
                 *(pytest.param(case, marks=pytest.mark.slow) for case in
                   (NOBN_UNION_TRAIN, NOBN_PER_LABEL_TRAIN, NOBN_PER_LABEL_EVAL))]
FLOAT32_CASES = [UNION_TRAIN, PER_LABEL_TRAIN, UNION_EVAL]
ADAM_CASES = [PER_LABEL_TRAIN, pytest.param(NOBN_PER_LABEL_TRAIN, marks=pytest.mark.slow)]
pytestmark = pytest.mark.usefixtures("torch_one_thread")  # the root conftest.py: tiny torch ops, a busy machine


@pytest.fixture(scope="module")
def pairs():
    """pairs(name): the ModelPair of backbone `name`, built on first use and kept for the module."""
    built = {}

    def pair(name):
        if name not in built:
            built[name] = ModelPair(name)
        return built[name]

    return pair


@pytest.mark.parametrize("case", FLOAT64_CASES, ids=lambda case: case.id)
def test_float64_outputs_losses_grads(pairs, case, request):
    check_float64(pairs(case.model), case, request)


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda case: case.id)
def test_float32_outputs_losses(pairs, case, request):
    check_float32(pairs(case.model), case, request)


@pytest.mark.parametrize("case", ADAM_CASES, ids=lambda case: case.id)
def test_adam_steps(pairs, case, request):
    check_adam(pairs(case.model), case, request)


def test_nobn_forward_matches_the_torch_twin_float64(pairs):
    """small_cnn_nobn's plain forward (Grad-CAM layer and logits) on imported weights, evaluation mode."""
    case = NOBN_UNION_TRAIN
    pair = pairs(case.model)
    assert not pair.has_batch_norm
    images = parity_harness.make_inputs(case).images
    with torch.no_grad():
        torch_feats = pair.torch_model("float64").features(images).numpy().transpose(0, 2, 3, 1)
        torch_logits = pair.torch_model("float64")(images).numpy()
    with jax.enable_x64(True):
        variables = pair.flax_variables("float64")
        assert set(variables) == {"params"}
        model, nhwc = parity_harness.jax_model(case), np.ascontiguousarray(images.numpy().transpose(0, 2, 3, 1))
        feats = np.asarray(model.apply(variables, nhwc, method="features"))
        logits = np.asarray(model.apply(variables, nhwc))
    assert feats.dtype == logits.dtype == np.float64
    assert feats.shape == torch_feats.shape == (3, 4, 5, 128)
    for ours, theirs in ((feats, torch_feats), (logits, torch_logits)):
        assert np.abs(ours - theirs).max() <= parity_harness.FLOAT64_TOL * np.abs(theirs).max()
