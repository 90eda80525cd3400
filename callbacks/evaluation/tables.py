"""Tables of an evaluation run from its per-sample values: summary, tests against a reference
method, mean curves. Pure pandas/scipy; the callback writes them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from callbacks.evaluation.keys import CurveKey
from contrastive_saliency.stats import (
    benjamini_hochberg,
    compare_methods,
    holm,
    mean_confidence_interval,
    wilcoxon_below,
)

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
    references: str | Sequence[str],
    agreement_threshold: float,
    alternative: str = "two_sided",
) -> pd.DataFrame:
    """Every method vs each of ``references`` per (layer, target policy, metric), paired on the
    sample index (:func:`contrastive_saliency.stats.compare_methods`): paired t-test, Cohen's d_z, and for
    feature agreement the Wilcoxon test against the threshold. The t-test's direction is
    ``alternative`` (``method_greater``, ``method_less``, ``two_sided``: each method relative
    to its reference; H1 in words in the ``hypothesis`` column). One row per (method,
    reference); a pair of references is tested once (the later reference against the earlier
    one). P-values are Holm- and BH-corrected over the WHOLE table (every row is one test of the
    family); the Wilcoxon test does not involve the reference, so each (layer, policy, metric,
    method) counts once in its correction.

    Methods without a layer (input-gradient family, reference maps: layer ``input``) are paired
    with a layered reference at every layer; a layer-free reference is paired with the methods
    of every layer, and with the other layer-free methods once, under layer ``input``."""
    references = [references] if isinstance(references, str) else list(references)
    frames = []
    for position, reference in enumerate(references):
        earlier = set(references[:position])  # already tested against this reference
        tested = _reference_tests(per_sample, reference, agreement_threshold, alternative)
        frames.append(tested[~tested["method"].isin(earlier)])
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return pd.DataFrame(columns=STATS_COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    table["t_p_holm"] = holm(table["t_p_value"].to_numpy())
    table["t_p_bh"] = benjamini_hochberg(table["t_p_value"].to_numpy())
    wilcoxon = table.drop_duplicates(["layer", "target_policy", "metric", "method"])
    keys = ["layer", "target_policy", "metric", "method"]
    corrected = wilcoxon[keys].assign(
        wilcoxon_p_holm=holm(wilcoxon["wilcoxon_p"].to_numpy()),
        wilcoxon_p_bh=benjamini_hochberg(wilcoxon["wilcoxon_p"].to_numpy()),
    )
    table = table.drop(columns=["wilcoxon_p_holm", "wilcoxon_p_bh"]).merge(corrected, on=keys)
    return table[STATS_COLUMNS]


def _reference_tests(
    per_sample: pd.DataFrame, reference: str, agreement_threshold: float, alternative: str
) -> pd.DataFrame:
    """Every method vs ``reference`` (uncorrected p-values) per (layer, policy, metric)."""
    frames = []
    layer_free = per_sample[per_sample["layer"] == "input"]
    reference_is_layer_free = reference in set(layer_free["method"])
    for (layer, policy, metric), group in per_sample.groupby(GROUP[1:], sort=False):
        if layer == "input" and reference not in set(group["method"]):
            continue
        if layer != "input":
            extra = layer_free[
                (layer_free["target_policy"] == policy) & (layer_free["metric"] == metric)
            ]
            if reference_is_layer_free:  # the other layer-free methods: once, under "input"
                extra = extra[extra["method"] == reference]
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


def sibling_share(
    samples: pd.DataFrame, siblings: Sequence[Sequence[int]] | None
) -> dict[str, float | int]:
    """Among correctly classified samples (``label == top1``), the share whose top-2
    prediction is a sibling of the label — whether the model's confusions are the fine-grained
    ones a benchmark was built for. ``siblings[c]``: the sibling classes of class ``c`` (the
    datamodule's ``sibling_classes``, where the dataset defines them); ``{}`` without them;
    share ``None`` when no sample is correctly classified."""
    if siblings is None:
        return {}
    sibling_sets = [set(int(c) for c in row) for row in siblings]
    correct = samples[samples["label"] == samples["top1"]]
    hits = sum(
        int(top2) in sibling_sets[int(label)]
        for label, top2 in zip(correct["label"], correct["top2"], strict=True)
    )
    count = len(correct)
    return {
        "top2_sibling_share": hits / count if count else None,
        "top2_sibling_count": int(hits),
        "correct_samples": int(count),
    }


def describe_sibling_share(checks: dict[str, float | int | None]) -> str:
    """``0.842 (421 of 500)``: the :func:`sibling_share` result in words."""
    share = checks["top2_sibling_share"]
    shown = "–" if share is None else f"{share:.3f}"
    return f"{shown} ({checks['top2_sibling_count']} of {checks['correct_samples']})"


def mean_curves(curves: dict[CurveKey, np.ndarray]) -> pd.DataFrame:
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
