"""gain_jax.metrics on tiny cases worked out by hand (the expected numbers are derived in comments)."""
import math

import numpy as np
import pytest

from gain_jax import metrics


def test_average_precision_uses_the_voc_precision_envelope():
    # Ranking N, P, P: precision 0, 1/2, 2/3 at recall 0, 1/2, 1. The envelope lifts the precision
    # at recall 1/2 to 2/3, so AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3 (the raw average would be 7/12).
    assert metrics.average_precision([0.9, 0.8, 0.7], [0, 1, 1]) == pytest.approx(2 / 3)


def test_average_precision_interleaved_ranking():
    # Ranking P, N, P, N: precision 1, 1/2, 2/3, 1/2; envelope 1, 2/3, 2/3, 1/2; recall steps at
    # ranks 1 and 3 (1/2 each): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert metrics.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert metrics.average_precision([0.1, 0.2, 0.9], [0, 0, 1]) == pytest.approx(1.0)


def test_average_precision_ties_keep_input_order():
    # All scores equal: the stable ranking is the input order, N then P: AP = 1/2.
    assert metrics.average_precision([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


def test_mean_average_precision_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.7, 0.2, 0.1]])
    targets = np.array([[0, 0, 0], [1, 1, 0], [1, 0, 0]])
    aps = metrics.average_precision_per_class(scores, targets)
    # class 0: ranking N, P, P -> 2/3 (as above); class 1: P first -> 1; class 2: no positive.
    assert aps[0] == pytest.approx(2 / 3)
    assert aps[1] == pytest.approx(1.0)
    assert math.isnan(aps[2])
    assert metrics.mean_average_precision(scores, targets) == pytest.approx((2 / 3 + 1) / 2)


def test_average_precision_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        metrics.average_precision_per_class(np.zeros((2, 3)), np.zeros((2, 2)))


def test_topk_accuracy_counts_set_hits_over_label_count():
    scores = np.array([[0.9, 0.1, 0.8], [0.2, 0.3, 0.1], [0.1, 0.8, 0.9], [0.5, 0.5, 0.5]])
    targets = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 0, 0]])
    hits = metrics.topk_hits(scores, targets)
    # image 0: top-2 {0, 2} = labels -> 1; image 1: top-1 {1}, label 2 -> 0;
    # image 2: top-2 ranked (2, 1), labels {1, 2} -> 1 (upstream's positional compare says 0);
    # image 3: no label -> nan, skipped by the mean.
    np.testing.assert_allclose(hits[:3], [1.0, 0.0, 1.0])
    assert math.isnan(hits[3])
    assert metrics.topk_accuracy(scores, targets) == pytest.approx(2 / 3)


def test_topk_accuracy_partial_hit():
    # 2 labels {0, 1}; top-2 is (2, 0): one hit of two.
    assert metrics.topk_accuracy(np.array([[0.5, 0.1, 0.9]]), np.array([[1, 1, 0]])) == pytest.approx(0.5)


def _two_by_two_case():
    cams = np.zeros((1, 3, 2, 2), np.float32)
    cams[0, 0] = [[0.9, 0.2], [0.6, 0.1]]
    cams[0, 1] = 1.0  # not a label of the image: must never win
    cams[0, 2] = [[0.5, 0.7], [0.4, 0.3]]
    labels = np.array([[1, 0, 1]], np.float32)
    return cams, labels


def test_cam_segmentation_argmax_over_label_classes_with_threshold():
    cams, labels = _two_by_two_case()
    predicted = metrics.cam_segmentation(cams, labels, threshold=0.5)
    # (0,0): class 0 (0.9) -> 1; (0,1): class 2 (0.7) -> 3; (1,0): class 0 (0.6) -> 1;
    # (1,1): best 0.3 < 0.5 -> background.
    np.testing.assert_array_equal(predicted, [[[1, 3], [1, 0]]])
    # A lower threshold turns the last pixel into class 2 (0.3 > 0.1).
    np.testing.assert_array_equal(metrics.cam_segmentation(cams, labels, threshold=0.2), [[[1, 3], [1, 3]]])


def test_cam_segmentation_without_labels_is_background():
    cams, _ = _two_by_two_case()
    np.testing.assert_array_equal(metrics.cam_segmentation(cams, np.zeros((1, 3)), 0.5), np.zeros((1, 2, 2)))


def test_iou_counts_and_mean_iou_ignore_255():
    predicted = np.array([[[1, 3], [1, 0]]])
    gt = np.array([[[1, 3], [0, 255]]])
    intersection, union = metrics.iou_counts(predicted, gt, num_classes=3)
    # Kept pixels: (gt 1, pred 1), (gt 3, pred 3), (gt 0, pred 1); the 255 pixel is dropped.
    # background: 0 / 1; class 0 (index 1): 1 / 2; class 1: absent; class 2 (index 3): 1 / 1.
    np.testing.assert_array_equal(intersection, [0, 1, 0, 1])
    np.testing.assert_array_equal(union, [1, 2, 0, 1])
    ious = metrics.per_class_iou(intersection, union)
    np.testing.assert_allclose(ious[[0, 1, 3]], [0.0, 0.5, 1.0])
    assert math.isnan(ious[2])
    assert metrics.mean_iou(intersection, union) == pytest.approx(0.5)


def test_iou_counts_accumulate_over_batches():
    a = metrics.iou_counts(np.array([[1, 1]]), np.array([[1, 0]]), num_classes=1)
    b = metrics.iou_counts(np.array([[0, 1]]), np.array([[0, 1]]), num_classes=1)
    intersection, union = a[0] + b[0], a[1] + b[1]
    # background: inter 1 (2nd batch), union 2; class: inter 2, union 3.
    assert metrics.mean_iou(intersection, union) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_iou_counts_reject_values_outside_the_classes():
    with pytest.raises(ValueError, match="mask value 7"):
        metrics.iou_counts(np.zeros((1, 2)), np.array([[7, 0]]), num_classes=3)


def test_pointing_game_tolerance_and_absent_classes():
    cams = np.zeros((1, 2, 5, 5), np.float32)
    cams[0, 0, 2, 2] = 1.0  # peak of class 0 at (2, 2)
    cams[0, 1, 4, 4] = 1.0
    mask = np.zeros((1, 5, 5), np.uint8)
    mask[0, 0, 0] = 1  # the only pixel of class 0, at squared distance 8 from the peak
    mask[0, 4, 4] = 255  # class 1 has only ignore pixels: no trial
    labels = np.array([[1, 1]])
    assert metrics.pointing_game(cams, labels, mask, tolerance=2) == (0, 1)  # 4 < 8
    assert metrics.pointing_game(cams, labels, mask, tolerance=3) == (1, 1)  # 9 >= 8


def test_pointing_game_hit_on_the_mask():
    cams = np.zeros((2, 1, 4, 4), np.float32)
    cams[0, 0, 1, 3] = 0.7
    cams[1, 0, 0, 0] = 0.7
    mask = np.zeros((2, 4, 4), np.uint8)
    mask[:, 1:3, 2:4] = 1
    # image 0 peaks inside the object, image 1 at distance sqrt(5) from it.
    assert metrics.pointing_game(cams, np.ones((2, 1)), mask, tolerance=0) == (1, 2)


def test_pixel_average_precision_perfect_map_is_one():
    mask = np.zeros((2, 4, 4), np.int64)
    mask[0, 1:3, 1:3] = 1
    mask[1, 0, :] = 1
    maps = mask * 5.0 - 2.0  # any affine map of the mask normalizes to the mask itself
    assert metrics.pixel_average_precision(maps, mask) == pytest.approx(1.0)


def test_pixel_average_precision_constant_map_is_the_prevalence():
    # 5 of 16 + 1 of 16 object pixels over the two images: every pixel ties at score 0, the one point of
    # the curve is recall 1 at precision 6/32.
    mask = np.zeros((2, 4, 4), np.int64)
    mask[0, 0, :] = 1
    mask[0, 1, 0] = 1
    mask[1, 3, 3] = 1
    assert metrics.pixel_average_precision(np.full((2, 4, 4), 0.3), mask) == pytest.approx(6 / 32)


def test_pixel_average_precision_hand_computed_without_envelope():
    # One 1x3 map, scores (0.9, 0.5, 0.1) normalize to (1, 0.5, 0); pixels N, P, P.
    # t = 1: 1 prediction, 0 hits (P 0, R 0); t = 0.5: 2 predictions, 1 hit (P 1/2, R 1/2);
    # t = 0: 3 predictions, 2 hits (P 2/3, R 1). PxAP = 1/2 * 1/2 + 2/3 * 1/2 = 7/12 (VOC's envelope
    # would lift the first step to 2/3: 2/3).
    maps = np.array([[[0.9, 0.5, 0.1]]])
    mask = np.array([[[0, 1, 1]]])
    assert metrics.pixel_average_precision(maps, mask) == pytest.approx(7 / 12)


def test_pixel_average_precision_pools_pixels_over_images():
    # Two 1x2 maps (1, 0): image 0 P, N; image 1 N, P. Pooled: t = 1: 2 predictions, 1 hit (P 1/2, R 1/2);
    # t = 0: 4 predictions, 2 hits (P 1/2, R 1): PxAP 1/2 (the mean of per-image APs, 1 and 1/2, is 3/4).
    maps = np.array([[[1.0, 0.0]], [[1.0, 0.0]]])
    masks = np.array([[[1, 0]], [[0, 1]]])
    assert metrics.pixel_average_precision(maps, masks) == pytest.approx(0.5)
    positives, negatives = (sum(counts) for counts in zip(
        *(metrics.pixel_score_counts(maps[i:i + 1], masks[i:i + 1]) for i in range(2))))
    assert metrics.pixel_average_precision_from_counts(positives, negatives) == pytest.approx(0.5)


def test_pixel_average_precision_leaves_ignored_pixels_out():
    # Scores (0.2 P, 0.1 N, 0.9 ignored) normalize to (0.125, 0, 1) (the ignored pixel takes part in the
    # normalization, as in Choe et al.). t = 0.12: 1 prediction, 1 hit (P 1, R 1): PxAP 1; counting the
    # ignored pixel as a negative would give P 0 at t = 1, then 1/2 at R 1: 1/2.
    assert metrics.pixel_average_precision(np.array([[[0.2, 0.1, 0.9]]]), np.array([[[1, 0, 255]]])) == 1.0


def test_pixel_average_precision_ties_within_a_threshold_bin():
    # Normalized scores 1, 0.505 (P), 0.501 (N), 0 (N): the two middle ones fall in the bin [0.50, 0.51)
    # and tie. t = 1: the top pixel, a positive (P 1, R 1/2); t = 0.5: 3 predictions, 2 hits (P 2/3, R 1).
    # PxAP = 1/2 + 2/3 * 1/2 = 5/6 (an exact ranking would score 1).
    maps = np.array([[[1.0, 0.505, 0.501, 0.0]]])
    mask = np.array([[[1, 1, 0, 0]]])
    assert metrics.pixel_average_precision(maps, mask) == pytest.approx(5 / 6)


def test_pixel_average_precision_without_positives_is_nan_and_shapes_are_checked():
    assert math.isnan(metrics.pixel_average_precision(np.ones((1, 2, 2)), np.zeros((1, 2, 2))))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        metrics.pixel_average_precision(np.ones((1, 2, 2)), np.zeros((1, 2, 3)))


def test_pxap_thresholds_grid():
    thresholds = metrics.pxap_thresholds()
    assert len(thresholds) == 101 and thresholds[0] == 0.0 and thresholds[-1] == 1.0
    assert thresholds[50] == pytest.approx(0.5)


def test_class_pixel_maps_pairs_each_label_with_its_pixels():
    cams, labels = _two_by_two_case()
    gt = np.array([[[1, 3], [255, 0]]])
    maps, masks = metrics.class_pixel_maps(cams, labels, gt)
    # labels 0 and 2: class 0's map against gt == 1, class 2's against gt == 3; 255 stays ignored.
    np.testing.assert_array_equal(maps, cams[0, [0, 2]])
    np.testing.assert_array_equal(masks, [[[1, 0], [255, 0]], [[0, 1], [255, 0]]])
