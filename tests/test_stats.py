"""gain_jax.stats: the intervals and rules of a study's claims, on numbers worked out by hand."""
import math

import numpy as np
import pytest

from gain_jax import metrics, stats


def _t_density(x, df: int):
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_norm - (df + 1) / 2 * np.log1p(np.asarray(x) ** 2 / df))


def _t_cdf(q: float, df: int) -> float:
    """The t distribution's CDF at q > 0 by integrating its density (Simpson's rule on a fine grid)."""
    x = np.linspace(0.0, q, 200_001)
    density = _t_density(x, df)
    h = x[1] - x[0]
    return 0.5 + h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())


def test_t_table_matches_the_t_distribution():
    # textbook values, then every entry: its CDF is 0.975 up to what the table's 3-decimal rounding (at most
    # 0.0005 in q) moves it, i.e. the density there x 0.0005
    assert stats.t_quantile_975(1) == 12.706 and stats.t_quantile_975(4) == 2.776
    assert stats.t_quantile_975(30) == 2.042
    for df in range(1, 31):
        q = stats.t_quantile_975(df)
        assert abs(_t_cdf(q, df) - 0.975) <= _t_density(q, df) * 0.0005 + 1e-9, df
    for bad in (0, 31, 2.5):
        with pytest.raises(ValueError, match="degrees of freedom"):
            stats.t_quantile_975(bad)


def test_t_interval_by_hand():
    # 1..5: mean 3, sd sqrt(2.5), se sqrt(2.5 / 5) = 0.7071068; half-width 2.776 * 0.7071068 = 1.9629284
    interval = stats.t_interval([1, 2, 3, 4, 5])
    assert interval.mean == 3 and interval.n == 5
    assert interval.low == pytest.approx(3 - 1.9629284, abs=1e-6)
    assert interval.high == pytest.approx(3 + 1.9629284, abs=1e-6)
    with pytest.raises(ValueError, match="2 or more finite"):
        stats.t_interval([1.0])
    with pytest.raises(ValueError, match="2 or more finite"):
        stats.t_interval([1.0, float("nan")])


def test_paired_differences_by_seed():
    arm = {2: 0.7, 0: 0.5, 1: 0.6}
    baseline = {0: 0.4, 1: 0.45, 2: 0.5}
    np.testing.assert_allclose(stats.paired_differences(arm, baseline), [0.1, 0.15, 0.2])
    with pytest.raises(ValueError, match="paired by seed"):
        stats.paired_differences(arm, {0: 0.4, 1: 0.45})


def test_target_verdict_needs_the_lower_bound_above_the_target():
    # differences 0.1, 0.15, 0.2: mean 0.15, sd 0.05, se 0.0288675; half-width 4.303 * 0.0288675 = 0.124217,
    # so the interval is [0.025783, 0.274217]
    differences = [0.1, 0.15, 0.2]
    met = stats.target_verdict(differences, 0.02)
    assert met["verdict"] == "met" and met["met"]
    assert met["low"] == pytest.approx(0.025783, abs=1e-6) and met["high"] == pytest.approx(0.274217, abs=1e-6)
    # every difference is above 0.10 and so is the mean, but the interval is not: undecided, not met
    undecided = stats.target_verdict(differences, 0.10)
    assert undecided["verdict"] == "undecided" and not undecided["met"]
    assert stats.target_verdict(differences, 0.3)["verdict"] == "not met"


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    # 400 values, half 1 and half 0: the mean's standard error is sqrt(0.25 / 400) = 0.025, so the 95%
    # interval is about 0.5 +- 0.049
    values = np.array([1.0, 0.0] * 200)
    interval = stats.bootstrap_interval(lambda rows: values[rows].mean(), len(values), seed=0)
    assert interval.mean == 0.5 and interval.n == 400
    assert 0.5 - 0.06 < interval.low < 0.5 - 0.04 and 0.5 + 0.04 < interval.high < 0.5 + 0.06
    again = stats.bootstrap_interval(lambda rows: values[rows].mean(), len(values), seed=0)
    assert again == interval  # seeded
    constant = stats.bootstrap_interval(lambda rows: np.ones(5)[rows].mean(), 5, seed=1, resamples=50)
    assert (constant.low, constant.high) == (1.0, 1.0)


def test_bootstrap_of_map_drops_resamples_where_it_is_nan():
    scores = np.array([[0.9], [0.1], [0.8]])
    targets = np.array([[1], [0], [0]])
    interval = stats.bootstrap_interval(
        lambda rows: metrics.mean_average_precision(scores[rows], targets[rows]), 3, seed=0, resamples=200)
    # AP on all three: the positive ranks first: 1.0; resamples without the positive are nan and dropped
    assert interval.mean == 1.0 and interval.high == 1.0 and interval.low <= 1.0


def test_pooled_counts_statistic_is_pxap_of_the_summed_counts():
    rng = np.random.default_rng(0)
    maps = rng.random((6, 5, 5))
    masks = (rng.random((6, 5, 5)) < 0.3).astype(np.int64)
    per_image = [metrics.pixel_score_counts(maps[i:i + 1], masks[i:i + 1]) for i in range(6)]
    positives, negatives = (np.stack(counts) for counts in zip(*per_image))
    statistic = stats.pooled_counts_statistic([positives, negatives], metrics.pixel_average_precision_from_counts)
    assert statistic(np.arange(6)) == pytest.approx(metrics.pixel_average_precision(maps, masks))
    rows = np.array([0, 0, 3])  # a resample counts image 0 twice
    twice = metrics.pixel_average_precision(maps[rows], masks[rows])
    assert statistic(rows) == pytest.approx(twice)


def test_choose_threshold_takes_the_best_validation_value_lowest_on_ties():
    assert stats.choose_threshold({0.3: 0.5, 0.5: 0.7, 0.4: 0.7, 0.6: float("nan")}) == 0.4
    with pytest.raises(ValueError, match="no finite value"):
        stats.choose_threshold({0.5: float("nan")})
