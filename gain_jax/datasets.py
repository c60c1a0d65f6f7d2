"""The data sets a run trains on, as facts that need no TensorFlow: their names (`--dataset`'s choices) and
the splits a run evaluates at its end (and with `--test`). `gain_jax.config` reads them before TensorFlow
loads; `gain_jax.data` (the builders and the input pipeline) re-exports them beside the rest of what it
knows of each set (classes, default image size, splits: `gain_jax.data.dataset_info`).
"""
from __future__ import annotations

# gain_parts: its default config; gain_parts/<config>: each config (gain_jax/data/parts.py CONFIG_NAMES, which a
# test checks against these)
GAIN_PARTS_CONFIGS = tuple(f"gain_parts/part{part:02d}_rel{reliability:03d}"
                           for part in (4, 2, 8) for reliability in (60, 40, 80, 100))
# gain_shapes:3.0.0: gain_shapes' opt-in version (gain_jax/data/shapes.py); the default stays 2.0.0 until a study on
# 3.0.0 re-chooses the default configuration. Its oracle split train_unbiased trains with --train_split.
GAIN_SHAPES_VERSIONS = ("gain_shapes:3.0.0",)
DATASETS = ("gain_shapes", *GAIN_SHAPES_VERSIONS, "gain_voc2012", "gain_parts", *GAIN_PARTS_CONFIGS)
# validation is also evaluated after every epoch, the other final splits also when pre-training ends
FINAL_SPLITS = {**{name: ("validation", "validation_unbiased") for name in ("gain_shapes", *GAIN_SHAPES_VERSIONS)},
                "gain_voc2012": ("validation",),
                **{name: ("validation",) for name in DATASETS if name.startswith("gain_parts")}}
TEST_SPLITS = {**{name: ("test_unbiased",) for name in ("gain_shapes", *GAIN_SHAPES_VERSIONS)},
               "gain_voc2012": (),  # added with --test (eval.test)
               **{name: ("test",) for name in DATASETS if name.startswith("gain_parts")}}


def final_splits(dataset: str, test: bool = False) -> tuple[str, ...]:
    """The splits evaluated at the end of a run on `dataset`: FINAL_SPLITS, and TEST_SPLITS with `test`."""
    return FINAL_SPLITS[dataset] + (TEST_SPLITS[dataset] if test else ())
