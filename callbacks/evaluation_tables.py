"""Tables of an evaluation run from its per-sample values: summary, tests against a reference
method, mean curves. Pure pandas/scipy; the callback writes them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from saliency.stats import compare_methods, mean_confidence_interval, wilcoxon_below

GROUP = ["method", "layer", "target_policy", "metric"]
THRESHOLD_TESTED = ("feature_agreement",)  # metrics with a one-sided Wilcoxon vs a threshold


def _tested(metric: str) -> bool:
    return any(metric.startswith(name) for name in THRESHOLD_TESTED)


def summarise(per_sample: pd.DataFrame, agreement_threshold: float) -> pd.DataFrame:
    """One row per (method, layer, target policy, metric): n, mean, median, sd, 95 % t-CI, and
    for feature agreement the one-sided Wilcoxon test of H1: median < ``agreement_threshold``
    (CASE Eq. 8)."""
    rows = []
    for key, group in per_sample.groupby(GROUP, sort=False):
        values = group["value"].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        ci_low, ci_high = mean_confidence_interval(values)
        row = dict(zip(GROUP, key, strict=True))
        row |= {
            "n": values.size,
            "mean": values.mean() if values.size else math.nan,
            "median": float(np.median(values)) if values.size else math.nan,
            "sd": values.std(ddof=1) if values.size > 1 else math.nan,
            "ci_low": ci_low,
            "ci_high": ci_high,
            "wilcoxon_threshold": math.nan,
            "wilcoxon_statistic": math.nan,
            "wilcoxon_p": math.nan,
        }
        if _tested(row["metric"]) and values.size:
            test = wilcoxon_below(values, agreement_threshold)
            row |= {
                "wilcoxon_threshold": agreement_threshold,
                "wilcoxon_statistic": test.statistic,
                "wilcoxon_p": test.p_value,
            }
        rows.append(row)
    return pd.DataFrame(rows)


STATS_COLUMNS = [
    "layer", "target_policy", "metric", "method", "reference", "n", "mean", "reference_mean",
    "t_statistic", "t_p_value", "t_p_holm", "t_p_bh", "cohens_d", "wilcoxon_p",
    "wilcoxon_p_holm", "wilcoxon_p_bh", "hypothesis",
]  # fmt: skip


def method_tests(
    per_sample: pd.DataFrame,
    reference: str,
    agreement_threshold: float,
    alternative: str = "two_sided",
) -> pd.DataFrame:
    """Every method vs ``reference`` per (layer, target policy, metric), paired on the sample
    index (:func:`saliency.stats.compare_methods`): paired t-test in the named direction
    ``alternative`` (``method_greater``, ``method_less``, ``two_sided``: each method relative
    to the reference; its H1 in words in the ``hypothesis`` column), Cohen's d_z, and for
    feature agreement the Wilcoxon test against the threshold; p-values Holm- and BH-corrected
    across the methods compared within each group. Methods without a layer (input-gradient
    family) are paired with the reference at every layer."""
    frames = []
    layer_free = per_sample[per_sample["layer"] == "input"]
    for (layer, policy, metric), group in per_sample.groupby(GROUP[1:], sort=False):
        if layer == "input" and reference not in set(group["method"]):
            continue
        if layer != "input":
            extra = layer_free[
                (layer_free["target_policy"] == policy) & (layer_free["metric"] == metric)
            ]
            group = pd.concat([group, extra])
        if reference not in set(group["method"]) or group["method"].nunique() < 2:
            continue
        threshold = agreement_threshold if _tested(metric) else None
        result = compare_methods(
            group, reference, alternative=alternative, threshold=threshold, metric=metric
        ).assign(layer=layer, target_policy=policy, metric=metric)
        frames.append(result)
    if not frames:
        return pd.DataFrame(columns=STATS_COLUMNS)
    return pd.concat(frames, ignore_index=True)[STATS_COLUMNS]


def mean_curves(curves: dict[tuple[str, str, str, str], np.ndarray]) -> pd.DataFrame:
    """Long table ``method, layer, target_policy, curve, x, y, n`` of the mean of per-sample
    curves ``[n, points]`` on an even grid of [0, 1]."""
    frames = []
    for (method, layer, policy, kind), values in curves.items():
        if len(values) == 0:
            continue
        points = values.shape[1]
        frames.append(
            pd.DataFrame(
                {
                    "method": method,
                    "layer": layer,
                    "target_policy": policy,
                    "curve": kind,
                    "x": np.linspace(0.0, 1.0, points),
                    "y": values.mean(axis=0),
                    "n": len(values),
                }
            )
        )
    columns = ["method", "layer", "target_policy", "curve", "x", "y", "n"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
