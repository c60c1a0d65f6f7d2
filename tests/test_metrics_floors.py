"""Floors beside every CAM metric (all-zero, centred blob, uniform random maps), the object-only mIoU,
gain_shapes' bias-conflicting flag through the input pipeline, and both in the evaluation summary and
the end-of-run table. No model and no compilation: the eval step here is a numpy stand-in."""
import math
import types

import numpy as np
import pytest

from gain_jax import evaluate as evaluation
from gain_jax import metrics
from gain_jax.data import shapes

NUM_CLASSES = len(shapes.CLASS_NAMES)


# ---------------------------------------------------------------------------------------------- floor maps

def test_zero_maps_are_zero_with_the_class_cams_shape():
    maps = metrics.zero_maps((2, 3, 5, 7))
    assert maps.shape == (2, 3, 5, 7) and maps.dtype == np.float32
    assert not maps.any()


def test_centre_maps_peak_at_the_centre_with_the_fixed_width():
    maps = metrics.centre_maps((2, 3, 64, 64))
    assert maps.shape == (2, 3, 64, 64) and maps.dtype == np.float32
    assert maps.max() == pytest.approx(1.0, abs=2e-3) and maps.min() > 0
    np.testing.assert_array_equal(maps[1, 2], maps[0, 0])  # every image and class: the same blob
    assert np.unravel_index(np.argmax(maps[0, 0]), (64, 64)) == (31, 31)  # first of the 4 central pixels
    np.testing.assert_allclose(maps[0, 0], maps[0, 0].T)  # isotropic
    np.testing.assert_allclose(maps[0, 0], maps[0, 0, ::-1, ::-1])  # centred
    # sigma = 16 px: above 0.5 within 1.177 sigma of the centre, pi (18.8)^2 / 64^2 ~ 27% of the image
    assert (maps[0, 0] >= 0.5).mean() == pytest.approx(0.27, abs=0.01)
    odd = metrics.centre_maps((1, 1, 5, 9))
    assert np.unravel_index(np.argmax(odd[0, 0]), (5, 9)) == (2, 4) and odd[0, 0, 2, 4] == 1.0


def test_random_maps_are_uniform_and_reproducible_from_the_generator():
    shape = (4, 3, 16, 16)
    maps = metrics.random_maps(shape, np.random.default_rng([0, 8]))
    assert maps.shape == shape and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() < 1.0
    assert maps.mean() == pytest.approx(0.5, abs=0.02)
    np.testing.assert_array_equal(maps, metrics.random_maps(shape, np.random.default_rng([0, 8])))
    assert not np.array_equal(maps, metrics.random_maps(shape, np.random.default_rng([0, 9])))


def test_floor_maps_by_name():
    rng = np.random.default_rng(0)
    assert metrics.FLOOR_NAMES == ("zero", "centre", "random")
    np.testing.assert_array_equal(metrics.floor_maps("zero", (1, 2, 3, 3)), np.zeros((1, 2, 3, 3)))
    np.testing.assert_array_equal(metrics.floor_maps("centre", (1, 2, 3, 3)), metrics.centre_maps((1, 2, 3, 3)))
    assert metrics.floor_maps("random", (1, 2, 3, 3), rng).std() > 0
    with pytest.raises(ValueError, match="needs a numpy Generator"):
        metrics.floor_maps("random", (1, 2, 3, 3))
    with pytest.raises(ValueError, match="unknown floor"):
        metrics.floor_maps("blank", (1, 2, 3, 3))


# ---------------------------------------------------------------------------------------------- object mIoU

def test_object_mean_iou_leaves_out_the_background():
    intersection = np.array([90, 1, 0, 3])
    union = np.array([100, 2, 0, 4])  # background 0.9; class 0: 0.5; class 1 absent; class 2: 0.75
    assert metrics.mean_iou(intersection, union) == pytest.approx((0.9 + 0.5 + 0.75) / 3)
    assert metrics.object_mean_iou(intersection, union) == pytest.approx((0.5 + 0.75) / 2)
    assert math.isnan(metrics.object_mean_iou(np.array([5, 0]), np.array([5, 0])))  # background only


def _masks_with_two_classes():
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 1:3, 1:4] = 1  # 6 pixels of class 0
    masks[0, 0, :] = 255  # 8 ignored pixels
    masks[1, 5:8, 5:8] = 3  # 9 pixels of class 2
    labels = np.zeros((2, 3), np.float32)
    labels[0, 0] = labels[1, 2] = 1
    return masks, labels


def test_the_all_zero_map_scores_background_iou_over_the_classes_present():
    masks, labels = _masks_with_two_classes()
    maps = metrics.zero_maps((2, 3, 8, 8))
    predicted = metrics.cam_segmentation(maps, labels, threshold=0.5)
    assert not predicted.any()  # all background
    intersection, union = metrics.iou_counts(predicted, masks, num_classes=3)
    kept = 2 * 64 - 8
    background_iou = (kept - 6 - 9) / kept
    assert metrics.per_class_iou(intersection, union)[0] == pytest.approx(background_iou)
    assert metrics.mean_iou(intersection, union) == pytest.approx(background_iou / 3)  # background + 2 classes
    assert metrics.object_mean_iou(intersection, union) == 0.0
    # its maximum is the top-left pixel: a hit only for an object within the tolerance of it
    assert metrics.pointing_game(maps, labels, masks, tolerance=2.0) == (1, 2)  # class 0 at (1, 1)
    assert metrics.pointing_game(maps, labels, masks, tolerance=1.0) == (0, 2)


def test_cam_segmentation_equals_the_argmax_over_masked_label_maps():
    """The per-image version (label maps only) against the direct formula, ties and nan included."""
    rng = np.random.default_rng(3)
    for trial in range(20):
        cams = rng.integers(0, 4, (3, 5, 4, 6)) / 3.0
        if trial % 4 == 0:
            cams[0, :, 0, 0] = np.nan
        labels = rng.random((3, 5)) < 0.4
        candidate = np.where(labels[:, :, None, None], cams, -np.inf)
        for threshold in (0.0, 0.4, 1.0):
            expected = np.where(candidate.max(axis=1) >= threshold, candidate.argmax(axis=1) + 1, 0)
            np.testing.assert_array_equal(metrics.cam_segmentation(cams, labels, threshold), expected)


# ---------------------------------------------------------------------------------------------- conflicting flag

def _expected_conflicting(example) -> bool:
    return example["labels"][example["background"]] == 0


def test_common_features_flag_gain_shapes_images_whose_texture_is_a_non_label_class():
    import tensorflow as tf

    from gain_jax.data import pipeline

    examples = [shapes.generate_example(split, index) for split in ("validation", "validation_unbiased")
                for index in range(40)]
    to_features = pipeline._common_features("gain_shapes", NUM_CLASSES)
    flags = []
    for example in examples:
        tensors = {"image": tf.constant(shapes.decode_png(example["image"])),
                   "labels": tf.constant(example["labels"]), "mask": tf.constant(example["mask"]),
                   "has_mask": tf.constant(True), "filename": tf.constant(example["filename"]),
                   "background": tf.constant(example["background"], tf.int64)}
        mapped = to_features(tensors)
        assert tuple(mapped) == pipeline.output_keys("gain_shapes")
        flags.append(bool(mapped["bias_conflicting"].numpy()))
        assert flags[-1] == _expected_conflicting(example), example["filename"]
    # the flag is not constant: validation's bias leaves a few conflicting images, validation_unbiased many
    assert 0 < sum(flags[:40]) < 10 < sum(flags[40:])
    # other data sets keep the common keys only
    assert pipeline.output_keys("gain_voc2012") == pipeline.OUTPUT_KEYS
    other = pipeline._common_features("gain_voc2012", 20)({**tensors, "objects": tf.constant([0])})
    assert tuple(other) == pipeline.OUTPUT_KEYS


# ---------------------------------------------------------------------------------------------- evaluation

def _shapes_batches(indices, batch_size, with_flag=True):
    """Batches of real gain_shapes validation examples (image content unused by the stand-in step)."""
    examples = [shapes.generate_example("validation", i) for i in indices]
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {"image": np.zeros((len(chunk), 4, 4, 3), np.float32),
                 "labels": np.stack([e["labels"] for e in chunk]),
                 "mask": np.stack([e["mask"] for e in chunk]),
                 "has_mask": np.ones(len(chunk), bool),
                 "filename": np.array([e["filename"].encode() for e in chunk])}
        if with_flag:
            batch["bias_conflicting"] = np.array([_expected_conflicting(e) for e in chunk])
        batches.append(batch)
    return batches


def _oracle_step(seen_keys):
    """A stand-in eval step: every class's map is its ground-truth mask; logits favour the labels except
    for the second class, which always scores high (a wrong, confident classifier on that class)."""
    def eval_step(state, batch):
        seen_keys.append(tuple(sorted(batch)))
        mask = np.asarray(batch["mask"])
        cams = np.stack([(mask == c + 1) for c in range(NUM_CLASSES)], axis=1).astype(np.float32)
        logits = np.asarray(batch["labels"]) * 2.0
        logits[:, 1] = 5.0
        return {"logits": logits, "class_cams": cams, "loss": 0.5, "cl": 0.25, "am": 0.25, "ex": 0.0}
    return eval_step


def _evaluate(batches, seen_keys=None, device_count=1):
    return evaluation.evaluate_with_step(
        _oracle_step([] if seen_keys is None else seen_keys), {"params": {}}, batches, shapes.CLASS_NAMES,
        cam_threshold=0.5, pointing_tolerance=2.0, device_count=device_count, to_device=dict, to_host=np.asarray)


@pytest.fixture(scope="module")
def flagged():
    batches = _shapes_batches(range(60), batch_size=16)
    return batches, _evaluate(batches)


def test_summary_has_object_miou_and_every_floor_on_the_same_images(flagged):
    batches, result = flagged
    for key in ("mAP", "topk_accuracy", "cam_mIoU", "pointing_game", "pointing_hits", "pointing_trials",
                "iou_per_class", "cam_threshold", "pointing_tolerance_px"):
        assert key in result, key  # the keys existing consumers read
    # the oracle maps are the masks: perfect objects and pointing
    assert result["cam_object_mIoU"] == pytest.approx(1.0)
    assert result["cam_mIoU"] == pytest.approx(1.0)
    assert result["pointing_game"] == 1.0
    assert set(result["floors"]) == set(metrics.FLOOR_NAMES)
    for name, floor in result["floors"].items():
        assert set(floor) == {"cam_mIoU", "cam_object_mIoU", "pointing_game"}, name
        assert floor["cam_mIoU"] < 0.9 and floor["cam_object_mIoU"] < 0.5, name
    # the all-zero map: background everywhere, so its mIoU is the background's IoU (background pixels over
    # all kept ones) over the classes present (those of the masks, as for the oracle)
    zero = result["floors"]["zero"]
    masks = np.concatenate([b["mask"] for b in batches])
    background_iou = (masks == 0).sum() / (masks != 255).sum()
    present = sum(1 for value in result["iou_per_class"].values() if not math.isnan(value))
    assert present == NUM_CLASSES + 1
    assert zero["cam_mIoU"] == pytest.approx(background_iou / present)
    assert zero["cam_object_mIoU"] == 0.0
    assert result["floors"]["centre"]["cam_object_mIoU"] > 0
    assert result["floors"]["random"]["cam_object_mIoU"] > 0


def test_floors_are_deterministic_and_do_not_depend_on_the_model(flagged):
    batches, result = flagged
    again = _evaluate(batches)
    assert again["floors"] == result["floors"]
    # different model maps (all ones): the floors stay, the model's figures move
    def flat_step(state, batch):
        out = _oracle_step([])(state, batch)
        return {**out, "class_cams": np.ones_like(out["class_cams"])}
    other = evaluation.evaluate_with_step(flat_step, {"params": {}}, batches, shapes.CLASS_NAMES, cam_threshold=0.5,
                                          pointing_tolerance=2.0, to_device=dict, to_host=np.asarray)
    assert other["floors"] == result["floors"]
    assert other["cam_object_mIoU"] < result["cam_object_mIoU"]


def test_conflicting_subset_metrics_and_padding(flagged):
    batches, result = flagged
    flags = np.concatenate([b["bias_conflicting"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    logits = labels * 2.0
    logits[:, 1] = 5.0
    assert 0 < flags.sum() < len(flags)
    assert result["num_conflicting"] == int(flags.sum())
    assert result["mAP_conflicting"] == pytest.approx(metrics.mean_average_precision(logits[flags], labels[flags]))
    assert result["mAP"] == pytest.approx(metrics.mean_average_precision(logits, labels))
    assert result["topk_accuracy_conflicting"] == pytest.approx(metrics.topk_accuracy(logits[flags], labels[flags]))
    assert result["cam_object_mIoU_conflicting"] == pytest.approx(1.0)
    assert result["pointing_game_conflicting"] == 1.0
    # padded to 3 devices: the padding rows are dropped again, the flags with them; the step sees no flag
    seen = []
    padded = _evaluate(batches, seen, device_count=3)
    assert seen and all(keys == tuple(sorted(evaluation.BATCH_KEYS)) for keys in seen)
    for key in ("num_examples", "num_conflicting", "mAP", "mAP_conflicting", "cam_mIoU", "pointing_trials"):
        assert padded[key] == pytest.approx(result[key]), key


def test_without_the_flag_there_are_no_conflicting_keys():
    result = _evaluate(_shapes_batches(range(10), batch_size=8, with_flag=False))
    assert not [key for key in result if "conflicting" in key]
    assert "floors" in result and "cam_object_mIoU" in result


def test_summary_without_masks_has_nan_cam_metrics_and_floors():
    batches = _shapes_batches(range(4), batch_size=4)
    batches[0]["has_mask"][:] = False
    result = _evaluate(batches)
    assert math.isnan(result["cam_mIoU"]) and math.isnan(result["cam_object_mIoU"])
    assert all(math.isnan(value) for floor in result["floors"].values() for value in floor.values())
    assert result["pointing_trials"] == 0 and "iou_per_class" not in result


# ---------------------------------------------------------------------------------------------- report

def test_report_shows_object_miou_floors_and_the_conflicting_map(flagged):
    from gain_jax.config import Config, TrainConfig
    from gain_jax.train_loop import report

    _, result = flagged
    config = Config(train=TrainConfig(epochs=2, pretrain_epochs=1))
    paths = types.SimpleNamespace(run_dir="runs/x", metrics_path="runs/x/metrics.json",
                                  checkpoint_dir="runs/x/checkpoints", heatmap_dir="runs/x/heatmaps")
    run = types.SimpleNamespace(config=config, pointing_tolerance=2.0, paths=paths)
    older = {key: value for key, value in result.items()  # a pre-trained row from an older metrics.json
             if key != "floors" and key != "cam_object_mIoU" and "conflicting" not in key}
    history = {"epochs": [{"epoch": 1, "validation": older, "validation_unbiased": older}],
               "final": {"validation": result, "validation_unbiased": result}}
    text = report(run, history, 12.0, 4)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("split"))
    assert "object mIoU" in header and "mAP conflicting" in header
    final_row = next(line for line in lines if line.startswith("validation ") and "pre-trained" not in line)
    assert f"{result['mAP_conflicting']:.3f} (n={result['num_conflicting']})" in final_row
    assert "nan" in next(line for line in lines if line.startswith("validation (pre-trained)"))
    assert any(line.startswith("floors") and "zero / centre / random" in line for line in lines)
    floors = result["floors"]
    expected = "/".join(f"{floors[name]['cam_mIoU']:.3f}" for name in metrics.FLOOR_NAMES)
    floor_rows = [line for line in lines if f"mIoU {expected}," in line]
    assert len(floor_rows) == 2 and "object mIoU 0.000/" in floor_rows[0]
    from gain_jax.train_loop.console import floors_line  # a split name as wide as the column stays apart

    assert floors_line("validation", result, len("validation")).startswith("  validation mIoU ")
