"""The data sets a run trains on, as facts that need no TensorFlow: their names (`--dataset`'s choices) and
the splits a run evaluates at its end (and with `--test`). `gain_jax.config` reads them before TensorFlow
loads; `gain_jax.data` (the builders and the input pipeline) re-exports them beside the rest of what it
knows of each set (classes, default image size, splits: `gain_jax.data.dataset_info`).
"""
from __future__ import annotations

DATASETS = ("gain_shapes", "gain_voc2012")
# validation is also evaluated after every epoch, the other final splits also when pre-training ends
FINAL_SPLITS = {"gain_shapes": ("validation", "validation_unbiased"), "gain_voc2012": ("validation",)}
TEST_SPLITS = {"gain_shapes": ("test_unbiased",), "gain_voc2012": ()}  # added with --test (eval.test)


def final_splits(dataset: str, test: bool = False) -> tuple[str, ...]:
    """The splits evaluated at the end of a run on `dataset`: FINAL_SPLITS, and TEST_SPLITS with `test`."""
    return FINAL_SPLITS[dataset] + (TEST_SPLITS[dataset] if test else ())
