"""Parity of gain_jax and gain_torch_ref on vgg19, in evaluation mode with dropout 0.5 (inactive there);
48x64 images give a 1x2 Grad-CAM layer (see test_parity_vgg16.py on sizes and cost)."""
import pytest
from parity_harness import Case, ModelPair, check_float32, check_float64

PER_LABEL_EVAL = Case("vgg19", (48, 64), ((2, 4),), mode="per_label", train=False, grads_off=True, fill=0.7,
                      dropout=0.5)


@pytest.fixture(scope="module")
def pair():
    return ModelPair("vgg19")


@pytest.mark.parametrize("case", [PER_LABEL_EVAL], ids=lambda case: case.id)
@pytest.mark.slow
def test_float64_outputs_losses_grads(pair, case, request):
    check_float64(pair, case, request)


@pytest.mark.parametrize("case", [PER_LABEL_EVAL], ids=lambda case: case.id)
@pytest.mark.slow
def test_float32_outputs_losses(pair, case, request):
    check_float32(pair, case, request)
