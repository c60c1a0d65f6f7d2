"""gain-jax: GAIN (Guided Attention Inference Network, CVPR 2018) in JAX/Flax.

The core (everything but `gain_jax.data`) imports neither TensorFlow nor PyTorch. The training loop
(`gain_jax.train_loop`), its configuration (`gain_jax.config`) and evaluation (`gain_jax.evaluate`) are
modules of their own; the loop imports TensorFlow (through `gain_jax.data`) only when a run starts.
"""
from gain_jax.attention import (
    apply_mask,
    cam_from_gradients,
    gradcam,
    head_gradcams,
    minmax_normalize,
    resize_align_corners,
    soft_mask,
)
from gain_jax.config import Config, ConfigError, RunError
from gain_jax.convert import from_torchvision
from gain_jax.gain import (
    GainConfig,
    GainOutput,
    LabelPacking,
    check_max_labels,
    extra_supervision_loss,
    gain_forward,
    gain_losses,
    pack_labels,
    slot_labels_from_multihot,
    total_loss,
)
from gain_jax.models import build_model
from gain_jax.training import (
    TrainState,
    class_cams,
    create_train_state,
    make_eval_step,
    make_sweep_train_step,
    make_train_step,
    stack_trees,
    tree_slice,
)
from gain_jax.variants import AM_FORWARDS, AM_SCORES, CAM_METHODS, ERASE_FILLS, MASK_FUNCTIONS, register

__version__ = "0.1.0"

__all__ = [
    "AM_FORWARDS", "AM_SCORES", "CAM_METHODS", "ERASE_FILLS", "MASK_FUNCTIONS", "Config", "ConfigError", "GainConfig",
    "GainOutput", "LabelPacking", "RunError", "TrainState", "apply_mask", "build_model", "cam_from_gradients",
    "check_max_labels", "class_cams", "create_train_state", "extra_supervision_loss", "from_torchvision",
    "gain_forward", "gain_losses", "gradcam", "head_gradcams", "make_eval_step", "make_sweep_train_step",
    "make_train_step", "minmax_normalize", "pack_labels", "register", "resize_align_corners",
    "slot_labels_from_multihot", "soft_mask", "stack_trees", "total_loss", "tree_slice",
]
