"""gain-jax: GAIN (Guided Attention Inference Network, CVPR 2018) in JAX/Flax.

The core (everything but `gain_jax.data`) imports neither TensorFlow nor PyTorch.
"""
from gain_jax.attention import (apply_mask, cam_from_gradients, gradcam, head_gradcams, minmax_normalize,
                                resize_align_corners, soft_mask)
from gain_jax.gain import (GainConfig, GainOutput, check_max_labels, extra_supervision_loss, gain_forward,
                           gain_losses, LabelPacking, pack_labels, slot_labels_from_multihot, total_loss)
from gain_jax.convert import from_torchvision
from gain_jax.models import build_model
from gain_jax.variants import AM_FORWARDS, AM_SCORES, CAM_METHODS, MASK_FUNCTIONS, register
from gain_jax.training import TrainState, class_cams, create_train_state, make_eval_step, make_train_step

__version__ = "0.1.0"
from gain_jax.config import Config, ConfigError, RunError  # a training run's settings (gain_jax.config)
