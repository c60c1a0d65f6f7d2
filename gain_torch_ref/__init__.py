"""PyTorch reference implementation of GAIN with upstream (GAIN-pytorch) semantics.

Pins the numbers gain_jax is checked against (parity_tests/). Imports torch and torchvision;
the gain_jax core never imports this package.
"""
from gain_torch_ref.gain import MINMAX_EPS, RefConfig, gain_forward, gain_losses, upstream_per_label_total
from gain_torch_ref.models import MODEL_NAMES, build_model, split_model
from gain_torch_ref.small_cnn import SmallCNN

__all__ = ["MINMAX_EPS", "MODEL_NAMES", "RefConfig", "SmallCNN", "build_model", "gain_forward",
           "gain_losses", "split_model", "upstream_per_label_total"]
