"""gain_jax.data: tfds builders, AutoAugment and the tf.data input pipeline.

The one part of gain_jax that imports TensorFlow. Importing it registers three tfds builders:
"gain_shapes" (embedded synthetic set with a texture-cue bias; splits train, validation (both biased),
validation_unbiased, test_unbiased; the opt-in version 3.0.0 adds train_unbiased), "gain_parts" (embedded
synthetic set of objects with a small discriminative part on a weakly informative body, with body and part masks;
configs part size x body reliability; splits train, validation, test) and "gain_voc2012" (PASCAL VOC 2012 from
local files in `manual_dir`; splits train, validation).

    import gain_jax.data as gd
    batches = gd.input_pipeline("gain_voc2012", "train", manual_dir=..., image_size=224, batch_size=8)

TensorFlow's and tfds' start-up logs, progress bars and deprecation warnings are silenced unless the program
called `gain_jax.quiet.quiet_libraries(verbose=True)` before importing this package (see gain_jax.quiet).
"""
from gain_jax import quiet as _quiet

_quiet.quiet_unless_chosen()
with _quiet.filtered_import_stderr():
    import tensorflow as tf
    import tensorflow_datasets as _tfds  # noqa: F401  (imported here, inside the filter)
_quiet.after_import()

# JAX owns the accelerators: keep TensorFlow (a full, non-CPU build included) off them.
try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # devices already initialized by the caller: leave them
    pass

from gain_jax.data import autoaugment  # noqa: E402
from gain_jax.data.parts import CLASS_NAMES as PARTS_CLASS_NAMES  # noqa: E402
from gain_jax.data.parts import GainParts  # noqa: E402
from gain_jax.data.pipeline import (  # noqa: E402
    DATASET_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetInfo,
    clear_decoded_cache,
    dataset_info,
    input_pipeline,
    make_dataset,
)
from gain_jax.data.shapes import CLASS_NAMES as SHAPES_CLASS_NAMES  # noqa: E402
from gain_jax.data.shapes import GainShapes  # noqa: E402
from gain_jax.data.voc import CLASS_NAMES as VOC_CLASS_NAMES  # noqa: E402
from gain_jax.data.voc import GainVoc2012, VocFormatError  # noqa: E402

CLASS_NAMES = {name: dataset_info(name).class_names for name in DATASET_NAMES}

__all__ = ["CLASS_NAMES", "DATASET_NAMES", "DatasetInfo", "GainParts", "GainShapes", "GainVoc2012", "IMAGENET_MEAN",
           "IMAGENET_STD", "PARTS_CLASS_NAMES", "SHAPES_CLASS_NAMES", "VOC_CLASS_NAMES", "VocFormatError",
           "autoaugment", "clear_decoded_cache", "dataset_info", "input_pipeline", "make_dataset"]

# the facts that need no TensorFlow (gain_jax.config reads them before it loads) have their home there
from gain_jax.datasets import DATASETS, FINAL_SPLITS, TEST_SPLITS, final_splits  # noqa: E402

__all__ += ["DATASETS", "FINAL_SPLITS", "TEST_SPLITS", "final_splits"]
