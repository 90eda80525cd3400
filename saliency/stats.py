"""Statistical tests between saliency methods (scipy underneath)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats


@dataclass(frozen=True)
class HypothesisTestResult:
    statistic: float
    p_value: float
    n: int


def wilcoxon_below(values: np.ndarray, threshold: float) -> HypothesisTestResult:
    """One-sided Wilcoxon signed-rank test of H1: median(values) < threshold (CASE Eq. 8).

    Zero differences are dropped (scipy's ``zero_method="wilcox"``). When every value equals
    the threshold there is no evidence against H0 and the p-value is 1.
    """
    differences = np.asarray(values, dtype=np.float64) - threshold
    n = int(np.count_nonzero(differences))
    if n == 0:
        return HypothesisTestResult(statistic=math.nan, p_value=1.0, n=0)
    result = scipy_stats.wilcoxon(differences, alternative="less", zero_method="wilcox")
    return HypothesisTestResult(
        statistic=float(result.statistic), p_value=float(result.pvalue), n=n
    )


def mean_confidence_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval for the mean; ``(nan, nan)`` with fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return math.nan, math.nan
    mean = values.mean()
    half = scipy_stats.t.ppf(0.5 + level / 2, values.size - 1) * scipy_stats.sem(values)
    return float(mean - half), float(mean + half)
