"""What the seed-robustness aggregation computes from every seed's feature-agreement values
(CASE Sec. V-A.1, Fig. 4): the per-seed Wilcoxon table, the across-seed summary with the
ranking consistency (Kendall's W), its markdown rendering and the Fig. 4 plot. Pure pandas /
scipy / matplotlib: no runs, no files (see :mod:`experiments.aggregate_seeds`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats as scipy_stats

from contrastive_saliency.stats import wilcoxon_below

AGREEMENT = "feature_agreement"
PAIR_POLICY = "top1_vs_top2"

WILCOXON_COLUMNS = [
    "seed", "method", "layer", "n", "mean_agreement", "median_agreement", "sd_agreement",
    "wilcoxon_statistic", "p_value", "rejects_h0", "threshold", "alpha", "rank",
]  # fmt: skip
SUMMARY_COLUMNS = [
    "method", "seeds", "mean", "sd", "min", "max", "seeds_rejecting_h0", "mean_rank",
    "min_rank", "max_rank", "modal_rank", "modal_rank_share", "kendalls_w", "kendalls_w_p",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def agreement_values(per_sample: pd.DataFrame, layer: str | None = None) -> pd.DataFrame:
    """The top-1 vs top-2 feature-agreement rows of one evaluation's ``per_sample`` table
    (columns ``method, layer, index, value``), at ``layer`` (``None``: the only layer)."""
    rows = per_sample[
        (per_sample["metric"] == AGREEMENT) & (per_sample["target_policy"] == PAIR_POLICY)
    ]
    if rows.empty:
        raise ValueError(
            f"the evaluation has no {AGREEMENT!r} values for target policy {PAIR_POLICY!r}: "
            f"use a study with both (configs/evaluate/seed_robustness.yaml), and note that with "
            f"correct_only no sample counts if the model classified none of them correctly"
        )
    layers = list(pd.unique(rows["layer"]))
    if layer is None:
        if len(layers) > 1:
            raise ValueError(f"the evaluation has several layers {layers}: pass --layer")
        return rows[["method", "layer", "index", "value"]].reset_index(drop=True)
    chosen = rows[rows["layer"] == layer]
    if chosen.empty:
        raise ValueError(f"the evaluation has no values at layer {layer!r}; it has {layers}")
    return chosen[["method", "layer", "index", "value"]].reset_index(drop=True)


def seed_wilcoxon_table(
    values: pd.DataFrame, threshold: float, alpha: float = 0.05
) -> pd.DataFrame:
    """One row per (seed, method) of ``values`` (columns ``seed, method, layer, value``):
    n, mean / median / sd of the agreement, the one-sided Wilcoxon signed-rank test of
    H1: median < ``threshold`` (:func:`contrastive_saliency.stats.wilcoxon_below`, CASE Eq. 8), whether
    H0 is rejected (p < ``alpha``) and the method's rank within the seed by mean agreement
    (1 = lowest = most class-distinct; ties share the average rank). Methods keep their order
    of first appearance, seeds are sorted."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    methods = list(pd.unique(values["method"]))
    rows = []
    for seed in sorted(pd.unique(values["seed"])):
        for method in methods:
            group = values[(values["seed"] == seed) & (values["method"] == method)]
            if group.empty:
                continue
            agreement = group["value"].to_numpy(np.float64)
            agreement = agreement[np.isfinite(agreement)]
            test = wilcoxon_below(agreement, threshold)
            rows.append(
                {
                    "seed": int(seed),
                    "method": method,
                    "layer": ", ".join(map(str, pd.unique(group["layer"]))),
                    "n": agreement.size,
                    "mean_agreement": agreement.mean() if agreement.size else math.nan,
                    "median_agreement": float(np.median(agreement)) if agreement.size else math.nan,
                    "sd_agreement": agreement.std(ddof=1) if agreement.size > 1 else math.nan,
                    "wilcoxon_statistic": test.statistic,
                    "p_value": test.p_value,
                    "rejects_h0": bool(test.p_value < alpha),
                    "threshold": float(threshold),
                    "alpha": float(alpha),
                }
            )
    table = pd.DataFrame(rows, columns=WILCOXON_COLUMNS[:-1])
    table["rank"] = table.groupby("seed")["mean_agreement"].rank(method="average")
    return table[WILCOXON_COLUMNS]


def kendalls_w(ranks: np.ndarray) -> tuple[float, float]:
    """Kendall's coefficient of concordance of ``m`` rankings of ``n`` objects, ``ranks[n, m]``
    (column j = the ranks given by rater j, ties as average ranks), with the tie correction:
    ``W = 12 S / (m² (n³ − n) − m Σ_j T_j)``, ``S = Σ_i (R_i − R̄)²``, ``R_i = Σ_j r_ij``,
    ``T_j = Σ_groups (t³ − t)`` (Kendall & Babington Smith 1939; Siegel & Castellan 1988,
    Sec. 9.4). Returns ``(W, p)`` with p from ``χ² = m (n − 1) W`` on ``n − 1`` degrees of
    freedom. ``W = 1``: identical rankings; ``(nan, nan)`` for fewer than 2 objects or raters, or
    when every rater ties every object."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be a [objects, raters] matrix, got shape {ranks.shape}")
    n, m = ranks.shape
    if n < 2 or m < 2:
        return math.nan, math.nan
    totals = ranks.sum(axis=1)
    s = float(((totals - totals.mean()) ** 2).sum())
    ties = 0.0
    for column in ranks.T:
        _, counts = np.unique(column, return_counts=True)
        ties += float((counts**3 - counts).sum())
    denominator = m**2 * (n**3 - n) - m * ties
    if denominator <= 0:
        return math.nan, math.nan
    w = 12.0 * s / denominator
    chi2 = m * (n - 1) * w
    return w, float(scipy_stats.chi2.sf(chi2, n - 1))


def seed_summary_table(wilcoxon: pd.DataFrame) -> pd.DataFrame:
    """Per method, over seeds (from :func:`seed_wilcoxon_table`): mean, sd (ddof 1), min and max
    of the per-seed mean agreement, the number of seeds rejecting H0, the mean / min / max rank,
    the most frequent rank and the share of seeds that give it, and Kendall's W (with its
    p-value) of the method ranking across seeds — the same value on every row, computed over
    the methods evaluated in every seed."""
    methods = list(pd.unique(wilcoxon["method"]))
    pivot = wilcoxon.pivot(index="method", columns="seed", values="mean_agreement").loc[methods]
    complete = pivot.dropna()
    ranks = complete.rank(axis=0, method="average").to_numpy()
    w, w_p = kendalls_w(ranks)
    rows = []
    for method in methods:
        group = wilcoxon[wilcoxon["method"] == method]
        means = group["mean_agreement"].to_numpy(np.float64)
        method_ranks = group["rank"].to_numpy(np.float64)
        counts = pd.Series(method_ranks).value_counts()
        modal = float(counts.index[counts.to_numpy() == counts.max()].min())
        rows.append(
            {
                "method": method,
                "seeds": len(group),
                "mean": means.mean(),
                "sd": means.std(ddof=1) if means.size > 1 else math.nan,
                "min": means.min(),
                "max": means.max(),
                "seeds_rejecting_h0": int(group["rejects_h0"].sum()),
                "mean_rank": method_ranks.mean(),
                "min_rank": method_ranks.min(),
                "max_rank": method_ranks.max(),
                "modal_rank": modal,
                "modal_rank_share": float(counts.max() / len(group)),
                "kendalls_w": w,
                "kendalls_w_p": w_p,
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def wilcoxon_markdown(wilcoxon: pd.DataFrame, summary: pd.DataFrame, context: str) -> str:
    """The per-seed Wilcoxon table as markdown: methods × seeds, cells ``mean (p) ✓/✗``."""
    from callbacks.report.markdown import markdown_table
    from callbacks.report.plots import format_p, format_value

    seeds = sorted(pd.unique(wilcoxon["seed"]))
    threshold = wilcoxon["threshold"].iloc[0]
    alpha = wilcoxon["alpha"].iloc[0]
    header = ["method", *[f"seed {s}" for s in seeds], "mean ± sd over seeds", "seeds rejecting H0"]
    rows = []
    for _, method_row in summary.iterrows():
        cells = [method_row["method"]]
        for seed in seeds:
            row = wilcoxon[
                (wilcoxon["method"] == method_row["method"]) & (wilcoxon["seed"] == seed)
            ]
            if row.empty:
                cells.append("–")
                continue
            row = row.iloc[0]
            mark = "✓" if row["rejects_h0"] else "✗"
            cells.append(
                f"{format_value(row['mean_agreement'], 3)} (p = {format_p(row['p_value'])}) {mark}"
            )
        cells.append(f"{format_value(method_row['mean'], 3)} ± {format_value(method_row['sd'], 2)}")
        cells.append(f"{method_row['seeds_rejecting_h0']} / {method_row['seeds']}")
        rows.append(cells)
    w = summary["kendalls_w"].iloc[0] if len(summary) else math.nan
    w_p = summary["kendalls_w_p"].iloc[0] if len(summary) else math.nan
    return "\n".join(
        [
            "# Seed robustness: per-seed Wilcoxon tests (CASE Sec. V-A.1, Fig. 4)",
            "",
            context,
            "",
            f"Cells: mean top-5 % feature agreement of the top-1 and top-2 maps (p-value of the "
            f"one-sided Wilcoxon signed-rank test of H1: median agreement < {threshold:g}); "
            f"✓ = H0 rejected at α = {alpha:g} (class-distinct maps), ✗ = not rejected.",
            "",
            markdown_table(header, rows, [False] + [True] * (len(header) - 1)),
            "",
            f"Ranking consistency across seeds (methods ranked by mean agreement within each "
            f"seed): Kendall's W = {format_value(w, 3)} (p = {format_p(w_p)}; 1 = the same "
            f"ranking in every seed).",
            "",
        ]
    )


# --------------------------------------------------------------------------------------------
# Figure (CASE Fig. 4)
# --------------------------------------------------------------------------------------------


def build_seed_agreement_figure(
    wilcoxon: pd.DataFrame, summary: pd.DataFrame, context: str
) -> Figure:
    """CASE Fig. 4: per method, a bar of the across-seed mean of the per-seed mean agreement
    with ± 1 sd, one marker per seed, the Wilcoxon threshold as a line and, above each bar, how
    many seeds reject H0. ``context`` (model, data, layer, sample count) goes in the title."""
    from matplotlib import colormaps

    methods = list(summary["method"])
    seeds = sorted(pd.unique(wilcoxon["seed"]))
    threshold = float(wilcoxon["threshold"].iloc[0])
    alpha = float(wilcoxon["alpha"].iloc[0])
    figure = Figure(figsize=(max(7.5, 1.25 * len(methods) + 3.0), 5.4), layout="constrained")
    ax = figure.subplots()
    x = np.arange(len(methods), dtype=np.float64)
    ax.bar(
        x, summary["mean"], width=0.6, color="0.85", edgecolor="0.35",
        label="mean over seeds (± 1 sd)", zorder=1,
    )  # fmt: skip
    ax.errorbar(
        x, summary["mean"], yerr=summary["sd"].fillna(0.0), fmt="none", ecolor="black",
        capsize=6, linewidth=1.5, zorder=3,
    )  # fmt: skip
    colours = colormaps["tab10" if len(seeds) <= 10 else "tab20"]
    offsets = np.linspace(-0.2, 0.2, len(seeds)) if len(seeds) > 1 else np.zeros(1)
    for position, seed in enumerate(seeds):
        rows = wilcoxon[wilcoxon["seed"] == seed].set_index("method")
        present = [m for m in methods if m in rows.index]
        ax.scatter(
            x[[methods.index(m) for m in present]] + offsets[position],
            rows.loc[present, "mean_agreement"],
            color=colours(position % colours.N), edgecolor="black", linewidth=0.5, s=36,
            label=f"seed {seed}", zorder=4,
        )  # fmt: skip
    ax.axhline(
        threshold, color="tab:red", linestyle="--", linewidth=2, zorder=2,
        label=f"Wilcoxon threshold θ = {threshold:g} (H1: median < θ)",
    )  # fmt: skip
    for position, row in summary.iterrows():
        top = max(row["max"], row["mean"] + (0.0 if math.isnan(row["sd"]) else row["sd"]))
        ax.annotate(
            f"H0 rejected\n{row['seeds_rejecting_h0']}/{row['seeds']} seeds",
            (x[position], min(top + 0.03, 1.02)), ha="center", va="bottom", fontsize="small",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none",
                  "alpha": 0.85},
            zorder=5,
        )  # fmt: skip
    ax.set_xticks(x, methods)
    ax.set_xlabel("saliency method")
    ax.set_ylabel("mean top-5 % feature agreement,\ntop-1 vs top-2 class map (0–1)")
    ax.set_ylim(0.0, 1.15)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    w = summary["kendalls_w"].iloc[0] if len(summary) else math.nan
    figure.suptitle(
        f"CASE Fig. 4: mean agreement per method across {len(seeds)} training seeds "
        f"(lower = more class-distinct)\n{context}\none-sided Wilcoxon per seed at α = {alpha:g}; "
        f"ranking consistency Kendall's W = {w:.3f}",
        fontsize="medium",
    )
    return figure
