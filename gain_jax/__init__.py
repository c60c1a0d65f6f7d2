"""gain-jax: GAIN (Guided Attention Inference Network, CVPR 2018) in JAX/Flax.

The core (everything but `gain_jax.data`) imports neither TensorFlow nor PyTorch. The training loop
(`gain_jax.train_loop`), its configuration (`gain_jax.config`) and evaluation (`gain_jax.evaluate`) are
modules of their own; the loop imports TensorFlow (through `gain_jax.data`) only when a run starts.

The names below load their module on first use: `import gain_jax` itself imports no JAX, so that a program
(train.py) can install its signal handlers (`gain_jax.train_loop.stopping`) before the heavy imports.
"""
from __future__ import annotations

from gain_jax._lazy import lazy_attributes

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_attributes(__name__, {
    "attention": ("apply_mask", "cam_from_gradients", "gradcam", "head_gradcams", "minmax_normalize",
                  "resize_align_corners", "soft_mask"),
    "config": ("Config", "ConfigError", "RunError"),
    "convert": ("from_torchvision",),
    "gain": ("GainConfig", "GainOutput", "LabelPacking", "check_max_labels", "extra_supervision_loss",
             "gain_forward", "gain_losses", "pack_labels", "slot_labels_from_multihot", "total_loss"),
    "models": ("build_model",),
    "training": ("TrainState", "class_cams", "create_train_state", "make_eval_step", "make_sweep_train_step",
                 "make_train_step", "stack_trees", "tree_slice"),
    "variants": ("AM_FORWARDS", "AM_SCORES", "CAM_METHODS", "ERASE_FILLS", "MASK_FUNCTIONS", "register"),
}, submodules=("checkpoint", "evaluate", "explain", "metrics", "quiet", "train_loop", "viz"))
