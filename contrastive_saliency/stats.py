"""Statistical tests between saliency methods (scipy underneath)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
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


# --------------------------------------------------------------------------------------------
# Paired comparisons, effect sizes, bootstrap, multiple-comparison correction
# --------------------------------------------------------------------------------------------

_ALTERNATIVES = ("two-sided", "greater", "less")


def _check_alternative(alternative: str) -> None:
    if alternative not in _ALTERNATIVES:
        raise ValueError(
            f"alternative must be one of {_ALTERNATIVES}, got {alternative!r}; "
            "pick 'greater' for H1: mean(a - b) > 0"
        )


METHOD_ALTERNATIVES: dict[str, str] = {
    "two_sided": "two-sided",
    "method_greater": "greater",
    "method_less": "less",
}
"""Directions of a method's paired test against the *reference method*, by name, and scipy's
``alternative`` for the difference ``d = method − reference`` they test:

- ``method_greater``: H1: mean(method − reference) > 0, the method's mean is larger;
- ``method_less``: H1: mean(method − reference) < 0, the method's mean is smaller;
- ``two_sided``: H1: mean(method − reference) ≠ 0.

CASE Eq. 9 (H1: Mean(D_CASE) > Mean(D_baseline)) with CASE as the reference method is
``method_less``: each baseline's mean drop is smaller than CASE's.
"""


def method_alternative(name: str) -> str:
    """scipy's ``alternative`` for the named direction of :data:`METHOD_ALTERNATIVES`; a bare
    ``greater`` / ``less`` / ``two-sided`` (which does not say which side is which) and any
    other value raise ``ValueError`` naming the valid ones."""
    if name in METHOD_ALTERNATIVES:
        return METHOD_ALTERNATIVES[name]
    valid = ", ".join(METHOD_ALTERNATIVES)
    if name in _ALTERNATIVES:
        raise ValueError(
            f"test alternative {name!r} does not say which side it is on; use {valid} — the "
            "hypothesis about each compared method relative to the reference method "
            "(method_greater: H1 mean(method − reference) > 0; method_less: < 0). CASE Eq. 9 "
            "with CASE as the reference is method_less"
        )
    raise ValueError(f"test alternative must be one of {valid}, got {name!r}")


def hypothesis_text(
    alternative: str, method: str = "the method", reference: str = "the reference", metric: str = ""
) -> str:
    """The alternative hypothesis of a paired test of ``method`` against ``reference`` in
    words, e.g. ``"H1: mean(grad_cam − case) < 0 (grad_cam's mean confidence_drop is lower
    than case's; one-sided)"``."""
    method_alternative(alternative)
    quantity = f"mean {metric}" if metric else "mean"
    sign, words = {
        "method_greater": (">", f"higher than {reference}'s; one-sided"),
        "method_less": ("<", f"lower than {reference}'s; one-sided"),
        "two_sided": ("≠", f"different from {reference}'s; two-sided"),
    }[alternative]
    return f"H1: mean({method} − {reference}) {sign} 0 ({method}'s {quantity} is {words})"


def _paired_differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(
            f"paired samples need equal lengths, got {a.size} and {b.size}; "
            "align them on the sample index first (compare_methods does an inner join)"
        )
    return a - b


def paired_t_test(
    a: np.ndarray, b: np.ndarray, alternative: str = "two-sided"
) -> HypothesisTestResult:
    """Paired Student t-test of the mean of ``d = a − b`` (CASE RQ2, Sec. 4.2).

    ``t = mean(d) / (sd(d, ddof=1) / √n)`` with ``n − 1`` degrees of freedom, identical to
    ``scipy.stats.ttest_rel(a, b, alternative=...)``. ``alternative="greater"`` is
    H1: mean(a − b) > 0. Degenerate cases: fewer than two pairs → ``(nan, nan)``; every
    difference zero → ``(nan, 1.0)`` (no evidence against H0); constant non-zero differences →
    ``t = ±inf`` with the p-value of that limit (0 or 1).
    """
    _check_alternative(alternative)
    d = _paired_differences(a, b)
    n = int(d.size)
    if n < 2:
        return HypothesisTestResult(statistic=math.nan, p_value=math.nan, n=n)
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        if mean == 0.0:
            return HypothesisTestResult(statistic=math.nan, p_value=1.0, n=n)
        statistic = math.copysign(math.inf, mean)
        if alternative == "two-sided":
            p_value = 0.0
        elif alternative == "greater":
            p_value = 0.0 if mean > 0 else 1.0
        else:
            p_value = 0.0 if mean < 0 else 1.0
        return HypothesisTestResult(statistic=statistic, p_value=p_value, n=n)
    result = scipy_stats.ttest_rel(
        np.asarray(a, dtype=np.float64).ravel(),
        np.asarray(b, dtype=np.float64).ravel(),
        alternative=alternative,
    )
    return HypothesisTestResult(
        statistic=float(result.statistic), p_value=float(result.pvalue), n=n
    )


def cohens_d_paired(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's d_z for paired samples: ``mean(a − b) / sd(a − b, ddof=1)`` (Cohen 1988, Eq. 2.3.5).

    ``nan`` with fewer than two pairs; with zero spread, 0 if the mean difference is 0 and
    ``±inf`` otherwise.
    """
    d = _paired_differences(a, b)
    if d.size < 2:
        return math.nan
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / sd


def bootstrap_ci(
    values: np.ndarray,
    level: float = 0.95,
    n_resamples: int = 10_000,
    seed: int | None = 0,
    max_chunk_elements: int = 10_000_000,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (Efron & Tibshirani 1993, Sec. 13.3).

    Draws ``n_resamples`` resamples of size ``n`` with replacement (``numpy.random
    .default_rng(seed)``, vectorised in chunks of at most ``max_chunk_elements`` indices) and
    returns the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of the resampled means. The
    same ``seed`` gives the same interval; ``(nan, nan)`` for an empty input, ``(x, x)`` for a
    single value.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}; e.g. 0.95 for a 95 % interval")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    values = np.asarray(values, dtype=np.float64).ravel()
    n = values.size
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, max_chunk_elements // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows_per_chunk):
        stop = min(n_resamples, start + rows_per_chunk)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[indices].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def _as_p_values(p_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p_values, dtype=np.float64).ravel()
    finite = ~np.isnan(p)
    if np.any((p[finite] < 0.0) | (p[finite] > 1.0)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[finite].min()}..{p[finite].max()}")
    return p, finite


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values (Holm 1979), in the input order.

    With the ``m`` p-values sorted ascending, ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))``.
    NaN entries (tests that could not run) stay NaN and do not count towards ``m``.
    """

    def adjust(ascending: np.ndarray) -> np.ndarray:
        m = ascending.size
        return np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * ascending))

    return _adjust_p_values(p_values, adjust)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg FDR-adjusted p-values (Benjamini & Hochberg 1995), in the input order.

    With the ``m`` p-values sorted ascending, ``p̃_(i) = min_{j ≥ i} min(1, m p_(j) / j)``;
    equal to ``scipy.stats.false_discovery_control(p, method="bh")``. NaN entries stay NaN and
    do not count towards ``m``.
    """

    def adjust(ascending: np.ndarray) -> np.ndarray:
        m = ascending.size
        scaled = ascending * m / np.arange(1, m + 1)
        return np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])

    return _adjust_p_values(p_values, adjust)


def _adjust_p_values(
    p_values: np.ndarray, adjust_ascending: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Apply a correction defined on ascending p-values, returning input order; NaN entries
    stay NaN and do not count as tests."""
    p, finite = _as_p_values(p_values)
    adjusted = np.full_like(p, np.nan)
    q = p[finite]
    if q.size == 0:
        return adjusted
    order = np.argsort(q, kind="stable")
    out = np.empty(q.size)
    out[order] = adjust_ascending(q[order])
    adjusted[finite] = out
    return adjusted


def compare_methods(
    frame: pd.DataFrame,
    reference: str,
    *,
    method_col: str = "method",
    index_col: str = "index",
    value_col: str = "value",
    alternative: str = "two_sided",
    threshold: float | None = None,
    metric: str = "",
) -> pd.DataFrame:
    """Compare every method with ``reference`` over the same samples (CASE RQ1/RQ2 protocol).

    ``frame`` is tidy: one row per (method, sample index) with the metric in ``value_col``.
    Each non-reference method is inner-joined with the reference on ``index_col``, so only the
    samples both have enter. Per method: paired t-test of ``method − reference``
    (:func:`paired_t_test`) in the direction ``alternative`` names
    (:data:`METHOD_ALTERNATIVES`: ``method_greater``, ``method_less`` or ``two_sided``),
    Cohen's d_z (:func:`cohens_d_paired`) and, when ``threshold`` is given, the one-sided
    Wilcoxon test of H1: median(method) < threshold (:func:`wilcoxon_below`, CASE Eq. 8).
    P-values are corrected across the compared methods with Holm and Benjamini–Hochberg.

    Returns one row per non-reference method with columns ``method, reference, n, mean,
    reference_mean, t_statistic, t_p_value, t_p_holm, t_p_bh, cohens_d, wilcoxon_p,
    wilcoxon_p_holm, wilcoxon_p_bh, hypothesis`` (Wilcoxon columns NaN without a threshold;
    ``hypothesis`` the t-test's H1 in words, :func:`hypothesis_text`, naming ``metric``).
    """
    scipy_alternative = method_alternative(alternative)
    missing = [c for c in (method_col, index_col, value_col) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"frame lacks column(s) {missing}; it has {list(frame.columns)}. "
            "Pass method_col/index_col/value_col to name them."
        )
    methods = list(pd.unique(frame[method_col]))
    if reference not in methods:
        raise ValueError(f"reference method {reference!r} not in the frame; methods: {methods}")
    duplicated = frame.duplicated([method_col, index_col])
    if duplicated.any():
        first = frame.loc[duplicated, [method_col, index_col]].iloc[0].tolist()
        raise ValueError(
            f"(method, index) pairs must be unique, {first} repeats; aggregate per sample first"
        )
    ref = frame.loc[frame[method_col] == reference, [index_col, value_col]]
    rows = []
    for method in methods:
        if method == reference:
            continue
        own = frame.loc[frame[method_col] == method, [index_col, value_col]]
        joined = own.merge(ref, on=index_col, how="inner", suffixes=("_m", "_r"))
        a = joined[f"{value_col}_m"].to_numpy(dtype=np.float64)
        b = joined[f"{value_col}_r"].to_numpy(dtype=np.float64)
        t = paired_t_test(a, b, alternative=scipy_alternative)
        wilcoxon_p = math.nan
        if threshold is not None and a.size > 0:
            wilcoxon_p = wilcoxon_below(a, threshold).p_value
        rows.append(
            {
                "method": method,
                "reference": reference,
                "n": int(a.size),
                "mean": float(a.mean()) if a.size else math.nan,
                "reference_mean": float(b.mean()) if b.size else math.nan,
                "t_statistic": t.statistic,
                "t_p_value": t.p_value,
                "cohens_d": cohens_d_paired(a, b),
                "wilcoxon_p": wilcoxon_p,
                "hypothesis": hypothesis_text(alternative, str(method), str(reference), metric),
            }
        )
    columns = [
        "method",
        "reference",
        "n",
        "mean",
        "reference_mean",
        "t_statistic",
        "t_p_value",
        "t_p_holm",
        "t_p_bh",
        "cohens_d",
        "wilcoxon_p",
        "wilcoxon_p_holm",
        "wilcoxon_p_bh",
        "hypothesis",
    ]
    result = pd.DataFrame(rows, columns=[c for c in columns if "holm" not in c and "_bh" not in c])
    if result.empty:
        return pd.DataFrame(columns=columns)
    for name in ("t_p", "wilcoxon_p"):
        source = "t_p_value" if name == "t_p" else "wilcoxon_p"
        result[f"{name}_holm"] = holm(result[source].to_numpy())
        result[f"{name}_bh"] = benjamini_hochberg(result[source].to_numpy())
    return result[columns]
