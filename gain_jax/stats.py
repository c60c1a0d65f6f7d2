"""The statistics of a study's claims (issue 20's protocol): intervals, not means and standard deviations.

    differences = paired_differences(arm_by_seed, baseline_by_seed)   # same seeds, arm - baseline
    verdict = target_verdict(differences, target=0.10)                # "met" only when the 95% t-interval's
                                                                      # lower bound clears the target
    low, high = bootstrap_interval(lambda rows: mean_average_precision(scores[rows], targets[rows]),
                                   len(scores), seed=0)               # over the test images, for a lead row

Pure numpy (no scipy): the t quantiles come from `T_975`, a table checked in the tests against the t density
integrated numerically. A threshold is chosen on validation with `choose_threshold` and then applied once on
test (the CAM mIoU of an arm at its own validation-chosen threshold, not at a fixed 0.5).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

# Student's t 0.975 quantiles (two-sided 95%) for 1..30 degrees of freedom (standard tables, 3 decimals).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
CONFIDENCE = 0.95


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the half-width factor of a 95% interval from df + 1 values."""
    if not 1 <= df <= len(T_975) or int(df) != df:
        raise ValueError(f"t quantile table covers 1..{len(T_975)} degrees of freedom, got {df}")
    return T_975[int(df) - 1]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with its two-sided 95% interval [low, high] from n values."""

    mean: float
    low: float
    high: float
    n: int
    method: str  # "t over seeds" or "bootstrap over images"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def t_interval(values: Sequence[float]) -> Interval:
    """The 95% t-interval of the mean of `values`: mean +- t_{0.975, n-1} * sd / sqrt(n) (sd with ddof=1)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2 or np.isnan(values).any():
        raise ValueError(f"a t-interval needs 2 or more finite values, got {values.tolist()}")
    mean = float(values.mean())
    half = t_quantile_975(len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values), "t over seeds")


def paired_differences(arm_by_seed: Mapping, baseline_by_seed: Mapping) -> np.ndarray:
    """arm - baseline per seed (the runs of one seed share initialization and data order, so the pairs
    cancel what the seed does to both), in sorted seed order. Both must hold the same seeds."""
    if set(arm_by_seed) != set(baseline_by_seed):
        raise ValueError(f"paired by seed: the arm has seeds {sorted(arm_by_seed)}, the baseline "
                         f"{sorted(baseline_by_seed)}")
    seeds = sorted(arm_by_seed)
    return np.array([float(arm_by_seed[s]) - float(baseline_by_seed[s]) for s in seeds])


def target_verdict(differences: Sequence[float], target: float) -> dict:
    """Whether a target "difference >= target" is met: only when the 95% t-interval of the paired
    differences lies above it (lower bound > target). "not met" when the upper bound is below it too,
    "undecided" when the interval contains it."""
    interval = t_interval(differences)
    if interval.low > target:
        verdict = "met"
    elif interval.high < target:
        verdict = "not met"
    else:
        verdict = "undecided"
    return {"target": float(target), "verdict": verdict, "met": verdict == "met", **interval.as_dict(),
            "differences": [float(d) for d in differences]}


def bootstrap_interval(statistic: Callable[[np.ndarray], float], num_items: int, *, seed: int,
                       resamples: int = 1000) -> Interval:
    """Percentile bootstrap 95% interval of `statistic(rows)` over `num_items` items (test images): `rows`
    is an index array drawn with replacement (`np.arange(num_items)` for the point estimate). Resamples on
    which the statistic is nan (e.g. a class without positives everywhere) are dropped."""
    if num_items < 2 or resamples < 2:
        raise ValueError(f"bootstrap needs 2 or more items and resamples, got {num_items} and {resamples}")
    rng = np.random.default_rng(seed)
    estimate = float(statistic(np.arange(num_items)))
    values = np.array([statistic(rng.integers(0, num_items, num_items)) for _ in range(resamples)], np.float64)
    values = values[~np.isnan(values)]
    if values.size < 2:
        raise ValueError("the statistic is nan on (almost) every resample")
    low, high = np.quantile(values, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return Interval(estimate, float(low), float(high), num_items, "bootstrap over images")


def pooled_counts_statistic(per_item_counts: Sequence[np.ndarray], metric: Callable[..., float]
                            ) -> Callable[[np.ndarray], float]:
    """A bootstrap statistic for a metric of counts summed over items (PxAP of per-image pixel counts):
    `metric(*(counts[rows].sum(0) for counts in per_item_counts))`."""
    arrays = [np.asarray(counts) for counts in per_item_counts]
    return lambda rows: metric(*(counts[rows].sum(axis=0) for counts in arrays))


def choose_threshold(values_by_threshold: Mapping[float, float]) -> float:
    """The threshold with the highest validation value (ties: the lowest such threshold), nan values
    ignored: chosen on validation, then applied unchanged on test."""
    finite = {float(t): float(v) for t, v in values_by_threshold.items() if not math.isnan(float(v))}
    if not finite:
        raise ValueError("no finite value to choose a threshold on")
    best = max(finite.values())
    return min(t for t, v in finite.items() if v == best)
