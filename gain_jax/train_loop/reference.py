"""The classification-only baseline trained as long as `train.py`'s default run: the closing table compares a
run with it, not with the run's own pre-training epochs (which have seen a third of the steps).

`DEFAULT_BASELINE` holds the means over seeds 0-4 of `experiments/biased_shapes.py --study default` (its
`select` writes them to experiments/results/default/default.selection.json under
"default_choice"/"baseline_trained_as_long"; a test checks that these are that file's). They describe a run only
when everything that moves a baseline's figures is the default's: data set, image size, augmentation, training
split and draws, backbone, initialization, dropout, optimizer, budget, the CAM method and the evaluation's
settings (`REFERENCE_FIELDS`). Loss weights, the pre-training epochs, the seed and where files go may differ.
"""
from __future__ import annotations

from collections.abc import Mapping

from gain_jax.config import Config

# (section, field) of everything a classification-only baseline's validation figures depend on
REFERENCE_FIELDS = (("data", "dataset"), ("data", "image_size"), ("data", "autoaugment"), ("data", "train_split"),
                    ("data", "ex_oversample"), ("train", "backbone"), ("train", "init"), ("train", "dropout"),
                    ("train", "lr"), ("train", "batch_size"), ("train", "epochs"), ("train", "steps_per_epoch"),
                    ("gain", "cam"), ("eval", "eval_examples"), ("eval", "cam_threshold"),
                    ("eval", "pointing_tolerance"))
# what a run resolves the default's unset values to on gain_shapes 2.0.0 (setup.resolve_config): 64 px, one pass
# over its 3000 training images in batches of 32
RESOLVED = {("data", "image_size"): 64, ("train", "steps_per_epoch"): 93}
SOURCE = "experiments/results/default/default.selection.json"
SEEDS = (0, 1, 2, 3, 4)
DEFAULT_BASELINE: Mapping[str, Mapping[str, float]] = {
    "validation": {"mAP": 0.845, "topk_accuracy": 0.808, "cam_mIoU": 0.184, "cam_object_mIoU": 0.134,
                   "pointing_game": 0.454, "mAP_conflicting": 0.346},
    "validation_unbiased": {"mAP": 0.362, "topk_accuracy": 0.277, "cam_mIoU": 0.308, "cam_object_mIoU": 0.222,
                            "pointing_game": 0.593, "mAP_conflicting": 0.292},
}


def baseline_trained_as_long(config: Config) -> Mapping[str, Mapping[str, float]] | None:
    """{split: {metric: mean over SEEDS}} of the baseline trained with `config`'s data and budget, when those
    are `train.py`'s defaults (REFERENCE_FIELDS); None otherwise."""
    default = Config()
    for section, name in REFERENCE_FIELDS:
        value, default_value = getattr(getattr(config, section), name), getattr(getattr(default, section), name)
        if value != default_value and not (default_value is None and value == RESOLVED.get((section, name))):
            return None
    return DEFAULT_BASELINE or None
