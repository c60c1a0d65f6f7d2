"""Parity of gain_jax and gain_torch_ref on small_cnn (BatchNorm after every conv; Grad-CAM layer at 1/8)."""
import pytest
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

FLOAT64_CASES = [UNION_TRAIN, PER_LABEL_TRAIN, UPSTREAM_BATCH_1, UNION_EVAL, PER_LABEL_EVAL]
FLOAT32_CASES = [UNION_TRAIN, PER_LABEL_TRAIN, UNION_EVAL]


@pytest.fixture(scope="module")
def pair():
    return ModelPair("small_cnn")


@pytest.mark.parametrize("case", FLOAT64_CASES, ids=lambda case: case.id)
def test_float64_outputs_losses_grads(pair, case, request):
    check_float64(pair, case, request)


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda case: case.id)
def test_float32_outputs_losses(pair, case, request):
    check_float32(pair, case, request)


@pytest.mark.parametrize("case", [PER_LABEL_TRAIN], ids=lambda case: case.id)
def test_adam_steps(pair, case, request):
    check_adam(pair, case, request)
