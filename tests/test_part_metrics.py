"""gain_jax.part_metrics on hand-made arrays whose answers are computed by hand in the comments."""
import numpy as np
import pytest

from gain_jax import metrics, part_metrics

# one 2x4 image: map, body (part excluded), part, and the VOC mask of the object (class 0 -> 1)
MAP = np.array([[[1.0, 0.5, 0.0, 0.0],
                 [0.0, 0.5, 0.25, 0.25]]])
BODY = np.array([[[0, 1, 1, 0],
                  [0, 1, 1, 0]]], np.uint8)
PART = np.array([[[1, 0, 0, 0],
                  [0, 0, 0, 0]]], np.uint8)


def test_mass_shares_by_hand():
    body, part = part_metrics.mass_shares(MAP, BODY, PART)
    # total 2.5; on the body 0.5 + 0 + 0.5 + 0.25 = 1.25; on the part 1.0
    np.testing.assert_allclose(body, [0.5])
    np.testing.assert_allclose(part, [0.4])
    # an all-zero map puts its mass nowhere: nan, not 0
    body, part = part_metrics.mass_shares(np.zeros_like(MAP), BODY, PART)
    assert np.isnan(body).all() and np.isnan(part).all()
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        part_metrics.mass_shares(MAP, BODY[:, :1], PART)


def test_region_hits_by_hand():
    # body values 0.5, 0.0, 0.5, 0.25: >= 0.25 three, >= 0.5 two, >= 1 none; 4 body pixels
    hits, pixels = part_metrics.region_hits(MAP, BODY, thresholds=(0.25, 0.5, 1.0))
    np.testing.assert_array_equal(hits, [3, 2, 0])
    assert pixels == 4
    hits, pixels = part_metrics.region_hits(MAP, PART, thresholds=(0.25, 0.5, 1.0))
    np.testing.assert_array_equal(hits, [1, 1, 1])
    assert pixels == 1


def test_part_only_maps_at_pixels_and_on_a_grid():
    part = np.zeros((1, 4, 4), np.uint8)
    part[0, 0, 0] = part[0, 0, 1] = part[0, 1, 0] = 1  # 3 of the top-left cell's 4 pixels
    part[0, 2, 2] = 1  # 1 of the bottom-right cell's 4
    np.testing.assert_array_equal(part_metrics.part_only_maps(part), part.astype(np.float32))
    grid = part_metrics.part_only_maps(part, cell=2)
    # cell means 3/4 and 1/4, scaled to a maximum of 1: 1 and 1/3, spread over their 2x2 blocks
    want = np.zeros((1, 4, 4), np.float32)
    want[0, :2, :2] = 1.0
    want[0, 2:, 2:] = 1.0 / 3.0
    np.testing.assert_allclose(grid, want, rtol=1e-6)
    # no part: an all-zero map, not nan
    assert not part_metrics.part_only_maps(np.zeros((1, 4, 4)), cell=2).any()
    with pytest.raises(ValueError, match="does not divide"):
        part_metrics.part_only_maps(part, cell=3)


def test_label_maps_takes_each_images_label_class():
    cams = np.arange(2 * 3 * 1 * 2, dtype=np.float32).reshape(2, 3, 1, 2)
    labels = np.array([[0, 0, 1], [1, 0, 0]])
    np.testing.assert_array_equal(part_metrics.label_maps(cams, labels), [cams[0, 2], cams[1, 0]])
    with pytest.raises(ValueError, match="one label per image"):
        part_metrics.label_maps(cams, np.array([[1, 0, 1], [1, 0, 0]]))


def test_part_totals_pool_two_batches():
    gt = np.where((BODY | PART) > 0, 1, 0).astype(np.uint8)
    gt[0, 1, 3] = metrics.IGNORE_LABEL  # a ring pixel, left out of PxAP
    # batch 2: the object map itself, plus 1 on one background pixel and on the ignored pixel
    second = ((BODY | PART) > 0).astype(np.float64)
    second[0, 0, 3] = 1.0
    second[0, 1, 3] = 1.0
    totals = part_metrics.PartTotals(thresholds=(0.25, 0.5))
    totals.add(MAP, BODY, PART, gt, p_image=[0.8], p_part_erased=[0.4])
    totals.add(second, BODY, PART, gt, p_image=[0.6], p_part_erased=[0.2])
    result = totals.summarize()
    # body shares 0.5 and 4/7 (the second map sums to 7: 4 on the body, 1 on the part, 2 off the object)
    np.testing.assert_allclose(result["body_share"], (0.5 + 4 / 7) / 2)
    np.testing.assert_allclose(result["part_share"], (0.4 + 1 / 7) / 2)
    # body recall pooled over 8 body pixels: >= 0.25: 3 + 4, >= 0.5: 2 + 4
    assert result["body_recall"] == {0.25: 7 / 8, 0.5: 6 / 8}
    assert result["part_recall"] == {0.25: 1.0, 0.5: 1.0}
    assert result["body_recall_mean"] == pytest.approx((7 / 8 + 6 / 8) / 2)
    assert result["num_images"] == result["num_maps"] == 2
    # PxAP pools both maps' pixels: the same as gain_jax.metrics on them together
    maps = np.concatenate([MAP, second])
    masks = np.concatenate([gt, gt])
    assert result["pxap"] == pytest.approx(metrics.pixel_average_precision(maps, masks))
    np.testing.assert_allclose(result["p_image"], 0.7)
    np.testing.assert_allclose(result["p_part_erased"], 0.3)
    np.testing.assert_allclose(result["p_kept_without_part"], 0.3 / 0.7)


def test_whole_object_pxap_by_hand():
    gt = np.where((BODY | PART) > 0, 1, 0).astype(np.uint8)
    gt[0, 1, 3] = metrics.IGNORE_LABEL
    perfect = ((BODY | PART) > 0).astype(np.float64)
    assert part_metrics.PartTotals().add(perfect, BODY, PART, gt).summarize()["pxap"] == pytest.approx(1.0)
    # one background pixel at the top (and the ignored one, which does not count): 5 object pixels and 1
    # background pixel at score 1, nothing lower: precision 5/6 at recall 1
    leaky = perfect.copy()
    leaky[0, 0, 3] = leaky[0, 1, 3] = 1.0
    assert part_metrics.PartTotals().add(leaky, BODY, PART, gt).summarize()["pxap"] == pytest.approx(5 / 6)


def test_summarize_needs_a_batch_and_skips_zero_maps():
    with pytest.raises(ValueError, match="no batch"):
        part_metrics.PartTotals().summarize()
    gt = ((BODY | PART) > 0).astype(np.uint8)
    totals = part_metrics.PartTotals().add(np.concatenate([MAP, np.zeros_like(MAP)]), np.concatenate([BODY, BODY]),
                                           np.concatenate([PART, PART]), np.concatenate([gt, gt]))
    result = totals.summarize()
    assert result["num_images"] == 2 and result["num_maps"] == 1 and result["body_share"] == pytest.approx(0.5)
