"""Parity of gain_jax and gain_torch_ref on resnet18: BatchNorm in training mode (batch statistics, running
statistics updated by the classification stream only) and in evaluation mode; the attention-mining stream
runs BN frozen in both. Images of 64 pixels make layer4 (the Grad-CAM layer) 2x2 or 2x3."""
import pytest
from parity_harness import FLOAT32_TOL, NORMALIZED_BLACK, Case, ModelPair, check_float32, check_float64

UNION_TRAIN = Case("resnet18", (64, 64), ((0, 2), (5,), (1, 3, 4, 5)), mode="union", train=True,
                   fill=NORMALIZED_BLACK, ex=True, weights=(0.7, 1.3, 2.0))
UPSTREAM_BATCH_1 = Case("resnet18", (64, 96), ((0, 3, 5),), mode="per_label", train=True, grads_off=True,
                        upstream_total=True)
PER_LABEL_EVAL = Case("resnet18", (64, 64), ((1,), (0, 4), (2, 3, 5)), mode="per_label", train=False, ex=True)

FLOAT64_CASES = [UNION_TRAIN, UPSTREAM_BATCH_1, PER_LABEL_EVAL]
# (case, float32 tolerance). UNION_TRAIN needs 3e-5: measured 1.9e-5 (masked_images; heatmap 1.2e-5, mask
# 1.4e-5, logits_am 1.0e-5). That is torch's own float32 roundoff: torch float32 against torch float64 differs
# by 1.9e-5 on this case, gain_jax float32 against torch float64 by 5e-6 (18 layers with train-mode BN, then
# min-max scaling and the omega=10 sigmoid, slope 2.5, amplify the Grad-CAM layer's relative error).
FLOAT32_CASES = [(UNION_TRAIN, 3e-5), (PER_LABEL_EVAL, FLOAT32_TOL)]


@pytest.fixture(scope="module")
def pair():
    return ModelPair("resnet18")


@pytest.mark.parametrize("case", FLOAT64_CASES, ids=lambda case: case.id)
@pytest.mark.slow
def test_float64_outputs_losses_grads(pair, case, request):
    check_float64(pair, case, request)


@pytest.mark.parametrize("case, tolerance", FLOAT32_CASES, ids=[case.id for case, _ in FLOAT32_CASES])
@pytest.mark.slow
def test_float32_outputs_losses(pair, case, tolerance, request):
    check_float32(pair, case, request, tolerance)

