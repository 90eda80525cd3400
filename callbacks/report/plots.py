"""Plots of an evaluation run: agreement histograms, perturbation / PIC / sanity curves, summary.

Every public ``*_histograms`` / ``*_curves`` / ``metric_summary`` function writes one PNG per
group into the directory it is given and returns the written paths (``[]`` and no file for an
empty input). The ``build_*_figure`` functions return the :class:`matplotlib.figure.Figure`
of one group so that tests can inspect it. Figures are created with
:class:`~matplotlib.figure.Figure` directly, not through pyplot: they need no backend (PNG goes
through Agg), are never registered in pyplot's global figure list and are freed with their last
reference, so nothing leaks between runs. Output is deterministic (no dates in PNG metadata).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from contrastive_saliency.metrics.registry import curve_info

DPI = 100
AGREEMENT_METRIC = "feature_agreement"
AGREEMENT_BINS = 20

PERTURBATION_CURVES = ("deletion", "insertion")
PIC_CURVES = ("pic_sic", "pic_aic")
CURVE_KINDS = PERTURBATION_CURVES + PIC_CURVES

# Measures drawn on [0, 1] when no value is negative: the rank correlation of the maps'
# absolute values (Adebayo et al.) and SSIM are mostly positive but may dip below 0.
_MOSTLY_NON_NEGATIVE_MEASURES = frozenset({"spearman_abs", "ssim"})

PER_SAMPLE_COLUMNS = ("method", "layer", "target_policy", "metric", "index", "value")
SUMMARY_COLUMNS = (
    "method", "layer", "target_policy", "metric", "n", "mean", "median", "sd",
    "ci_low", "ci_high", "wilcoxon_threshold", "wilcoxon_statistic", "wilcoxon_p",
)  # fmt: skip
CURVE_COLUMNS = ("method", "layer", "target_policy", "curve", "x", "y", "n")
SANITY_COLUMNS = ("method", "layer", "step", "step_index", "similarity", "measure")

_SAFE = re.compile(r"[^a-z0-9._-]+")
_SEPARATOR = "__"
_MAX_SLUG = 120


def slug(*parts: object) -> str:
    """A file-name-safe, unique name for ``parts`` (e.g. ``("agreement", layer, policy)``).

    Parts are lower-cased, runs of characters outside ``[a-z0-9._-]`` become ``-`` and the
    parts are joined with ``__``. Whenever that changed anything (case, unsafe characters, a part
    that itself contains ``__`` or starts with ``.``/``-``, an empty part, over-long names), an
    8-hex SHA-1 of the original parts is appended, so distinct inputs do not share a name (up to
    a 2⁻³² hash collision), also on case-insensitive file systems. Clean inputs map to themselves.
    """
    if not parts:
        raise ValueError("slug() needs at least one part, got none")
    raw = [str(part) for part in parts]
    cleaned = [_SAFE.sub("-", part.lower()).strip("-.") for part in raw]
    name = _SEPARATOR.join(part or "empty" for part in cleaned)
    exact = all(
        clean == part and part and _SEPARATOR not in part
        for clean, part in zip(cleaned, raw, strict=True)
    )
    if exact and len(name) <= _MAX_SLUG:
        return name
    digest = hashlib.sha1(json.dumps(raw).encode()).hexdigest()[:8]
    return f"{name[:_MAX_SLUG]}-{digest}"


def format_value(value: float, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits; ``"–"`` for NaN/None."""
    if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
        return "–"
    return f"{float(value):.{digits}g}"


def format_p(p: float) -> str:
    """A p-value with 2 significant digits (``0.012``, ``3.2e-05``); ``"–"`` for NaN/None."""
    if p is None or math.isnan(p):
        return "–"
    return f"{float(p):.2g}"


def require_columns(frame: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    """Raise ``ValueError`` naming the columns of ``columns`` missing from ``frame``."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing the columns {missing}; it has {list(frame.columns)}")


def _ordered(values: Iterable[object]) -> list:
    """Unique values in order of first appearance (pandas' ``unique`` keeps that order)."""
    return list(pd.unique(pd.Series(list(values), dtype=object)))


def _colours(names: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One tab10/tab20 colour per name, by position (deterministic)."""
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def save_figure(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (parents created) and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


# --------------------------------------------------------------------------------------------
# Feature agreement histograms (CASE App. A)
# --------------------------------------------------------------------------------------------


def build_agreement_figure(
    per_sample: pd.DataFrame,
    summary: pd.DataFrame,
    *,
    layer: str,
    target_policy: str,
    metric: str = AGREEMENT_METRIC,
) -> Figure:
    """Histograms of per-sample feature agreement ``|topk(E) ∩ topk(E′)| / k`` (CASE Eq. 7), one
    panel per method, with the one-sided Wilcoxon threshold (CASE Eq. 8, H1: median < θ) and the
    median as vertical lines, as in CASE App. A.

    ``per_sample`` / ``summary`` may hold other groups; only rows of (``layer``,
    ``target_policy``, ``metric``) are used. Every method needs exactly one summary row with a
    finite ``wilcoxon_threshold``.
    """
    require_columns(per_sample, PER_SAMPLE_COLUMNS, "per_sample")
    require_columns(summary, SUMMARY_COLUMNS, "summary")
    selected = per_sample[
        (per_sample["layer"] == layer)
        & (per_sample["target_policy"] == target_policy)
        & (per_sample["metric"] == metric)
    ]
    if selected.empty:
        raise ValueError(
            f"per_sample has no {metric!r} rows for layer={layer!r}, "
            f"target_policy={target_policy!r}"
        )
    methods = _ordered(selected["method"])
    columns = min(len(methods), 3)
    rows = math.ceil(len(methods) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.6 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    bins = np.linspace(0.0, 1.0, AGREEMENT_BINS + 1)
    for ax, method in zip(axes, methods, strict=False):
        values = selected.loc[selected["method"] == method, "value"].to_numpy(np.float64)
        if not np.all((values >= 0.0) & (values <= 1.0)):
            bad = values[~((values >= 0.0) & (values <= 1.0))]
            raise ValueError(f"{metric} of {method!r} must lie in [0, 1]; got {bad[:5].tolist()}")
        row = summary[
            (summary["method"] == method)
            & (summary["layer"] == layer)
            & (summary["target_policy"] == target_policy)
            & (summary["metric"] == metric)
        ]
        if len(row) != 1:
            raise ValueError(
                f"summary needs exactly one row for method={method!r}, layer={layer!r}, "
                f"target_policy={target_policy!r}, metric={metric!r}; found {len(row)}"
            )
        threshold = float(row["wilcoxon_threshold"].iloc[0])
        if not math.isfinite(threshold):
            raise ValueError(
                f"summary row of {method!r} ({metric}) has wilcoxon_threshold={threshold}; "
                "the agreement histogram needs the finite threshold of the Wilcoxon test"
            )
        p_value = float(row["wilcoxon_p"].iloc[0])
        median = float(np.median(values))
        ax.hist(values, bins=bins, color="tab:blue", edgecolor="white", label="samples")
        ax.axvline(
            threshold,
            color="tab:red",
            linestyle="--",
            linewidth=2,
            label=f"Wilcoxon threshold θ = {format_value(threshold)}",
        )
        ax.axvline(median, color="black", linewidth=2, label=f"median = {format_value(median)}")
        ax.set_xlim(0.0, 1.0)
        ax.set_title(
            f"{method}\nn = {values.size}, median = {format_value(median)}, "
            f"Wilcoxon p = {format_p(p_value)}",
            fontsize="medium",
        )
        ax.set_xlabel("feature agreement of the two maps (0–1)")
        ax.set_ylabel("number of samples")
        ax.legend(loc="best", fontsize="small")
    for ax in axes[len(methods) :]:
        ax.set_axis_off()
    figure.suptitle(
        f"Feature agreement ({target_policy}), layer: {layer}\n"
        "top-k overlap of the two class maps; one-sided Wilcoxon signed-rank, H1: median < θ"
    )
    return figure


def agreement_histograms(
    per_sample: pd.DataFrame,
    summary: pd.DataFrame,
    directory: Path,
    metric: str = AGREEMENT_METRIC,
) -> list[Path]:
    """One PNG per (layer, target_policy) of :func:`build_agreement_figure`; ``[]`` if there is
    no ``metric`` row."""
    if per_sample.empty:
        return []
    require_columns(per_sample, PER_SAMPLE_COLUMNS, "per_sample")
    selected = per_sample[per_sample["metric"] == metric]
    paths = []
    for layer, policy in _ordered(zip(selected["layer"], selected["target_policy"], strict=True)):
        figure = build_agreement_figure(
            selected, summary, layer=layer, target_policy=policy, metric=metric
        )
        paths.append(
            save_figure(figure, Path(directory) / f"{slug('agreement', layer, policy)}.png")
        )
    return paths


# --------------------------------------------------------------------------------------------
# Deletion / insertion (RISE) and PIC (XRAI) curves
# --------------------------------------------------------------------------------------------


def _check_curves(curves: pd.DataFrame) -> None:
    require_columns(curves, CURVE_COLUMNS, "curves")
    unknown = sorted(set(curves["curve"]) - set(CURVE_KINDS))
    if unknown:
        raise ValueError(f"unknown curve kinds {unknown} in curves; valid: {list(CURVE_KINDS)}")
    x = curves["x"].to_numpy(np.float64)
    if not np.all((x >= 0.0) & (x <= 1.0)):
        raise ValueError(f"curve x must lie in [0, 1]; got range [{x.min()}, {x.max()}]")


def build_curve_figure(
    curves: pd.DataFrame, *, layer: str, target_policy: str, curve: str
) -> Figure:
    """Mean ``curve`` of every method at (``layer``, ``target_policy``), one line per method,
    with the area under the curve in the legend: ``AUC = Σ (x_{i+1} − x_i)(y_i + y_{i+1}) / 2``
    over the points sorted by ``x`` (RISE Sec. 4.1's normalised trapezoid for x spanning
    [0, 1]; XRAI Sec. 4's SIC/AIC area for the PIC curves). The AUC of the mean curve equals
    the mean of the per-sample AUCs when every sample shares the x grid.
    """
    _check_curves(curves)
    if curve not in CURVE_KINDS:
        raise ValueError(f"unknown curve kind {curve!r}; valid: {list(CURVE_KINDS)}")
    selected = curves[
        (curves["layer"] == layer)
        & (curves["target_policy"] == target_policy)
        & (curves["curve"] == curve)
    ]
    if selected.empty:
        raise ValueError(
            f"curves has no {curve!r} rows for layer={layer!r}, target_policy={target_policy!r}"
        )
    info, metric = curve_info(curve)  # the metric class's text and direction
    title, x_label, y_label = info.title, info.x_label, info.y_label
    meaning = "more faithful" if getattr(metric, "family", "") == "faithfulness" else "better"
    better = f"{'higher' if metric.higher_is_better else 'lower'} AUC = {meaning}"
    methods = _ordered(selected["method"])
    colours = _colours(methods)
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = figure.subplots()
    y_low, y_high = 0.0, 1.0
    for method in methods:
        points = selected[selected["method"] == method].sort_values("x", kind="stable")
        x = points["x"].to_numpy(np.float64)
        y = points["y"].to_numpy(np.float64)
        if np.any(np.diff(x) == 0):
            raise ValueError(
                f"{curve} curve of {method!r} at layer {layer!r} ({target_policy}) has repeated "
                "x values; expected one row per point of the mean curve"
            )
        counts = points["n"].unique()
        if counts.size != 1:
            raise ValueError(
                f"{curve} curve of {method!r} has several sample counts {counts.tolist()}; "
                "the n of one mean curve must be constant"
            )
        auc = _trapezoid(x, y)
        ax.plot(
            x,
            y,
            color=colours[method],
            marker="." if x.size <= 30 else None,
            label=f"{method} (AUC = {format_value(auc)}, n = {int(counts[0])})",
        )
        y_low, y_high = min(y_low, float(y.min())), max(y_high, float(y.max()))
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(y_low - 0.02, y_high + 0.02)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(f"{title} ({better})\nlayer: {layer}, targets: {target_policy}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return figure


def _curve_plots(curves: pd.DataFrame, directory: Path, kinds: Sequence[str]) -> list[Path]:
    if curves.empty:
        return []
    _check_curves(curves)
    selected = curves[curves["curve"].isin(kinds)]
    paths = []
    groups = zip(selected["layer"], selected["target_policy"], selected["curve"], strict=True)
    for layer, policy, curve in _ordered(groups):
        figure = build_curve_figure(selected, layer=layer, target_policy=policy, curve=curve)
        paths.append(save_figure(figure, Path(directory) / f"{slug(curve, layer, policy)}.png"))
    return paths


def perturbation_curves(curves: pd.DataFrame, directory: Path) -> list[Path]:
    """Deletion and insertion mean curves (RISE Sec. 4.1): one PNG per (layer, target_policy,
    curve kind) of :func:`build_curve_figure`; ``[]`` without such rows."""
    return _curve_plots(curves, directory, PERTURBATION_CURVES)


def pic_curves(curves: pd.DataFrame, directory: Path) -> list[Path]:
    """SIC and AIC performance-information curves (XRAI Sec. 4): one PNG per (layer,
    target_policy, curve kind) of :func:`build_curve_figure`; ``[]`` without such rows."""
    return _curve_plots(curves, directory, PIC_CURVES)


# --------------------------------------------------------------------------------------------
# Cascading-randomisation sanity check (Adebayo et al. 2018, Fig. 4; VAR Fig. 6)
# --------------------------------------------------------------------------------------------


def similarity_range(measure: str, values: np.ndarray) -> tuple[float, float]:
    """y range of a similarity measure: ``[0, 1]`` for the rank correlation of absolute maps and
    for SSIM when no value is negative, else ``[-1, 1]``; values outside it are an error."""
    low = -1.0
    if measure in _MOSTLY_NON_NEGATIVE_MEASURES and values.size and float(values.min()) >= 0.0:
        low = 0.0
    if values.size and not np.all((values >= low - 1e-6) & (values <= 1.0 + 1e-6)):
        raise ValueError(
            f"similarity measure {measure!r} must lie in [{low:g}, 1]; "
            f"got range [{values.min()}, {values.max()}]"
        )
    return low, 1.0


_SANITY_MEASURE_TEXT = {
    "spearman_abs": "Spearman rank correlation of |maps|",
    "spearman": "Spearman rank correlation of the signed maps",
    "ssim": "SSIM of the maps scaled to [0, 1]",
    "hog": "Spearman rank correlation of the maps' HOG features",
}
_SANITY_TARGET_TEXT = {
    "randomised_argmax": "explained: each randomised model's own prediction",
    "original": "explained: the trained model's prediction at every step",
}


def _sanity_line_keys(selected: pd.DataFrame) -> list[tuple[str, str, str, bool]]:
    """``(method, layer, colour key, is a wrapper)`` per line, in order of appearance. The
    colour key is the base method's (``base_method`` column; default the method itself) at its
    layer, so a method and its wrapper (e.g. VAR over it) share a colour; ``wrapper`` (default
    False) marks the wrappers' lines."""
    method = selected["method"].astype(str)
    base = selected["base_method"] if "base_method" in selected.columns else method
    base = base.fillna("").astype(str).where(lambda b: b != "", method)
    wrapper = (
        selected["wrapper"].astype(bool)
        if "wrapper" in selected.columns
        else method.map(lambda _: False)
    )
    rows = zip(method, selected["layer"].astype(str), base, wrapper, strict=True)
    return [(m, layer, f"{b}@{layer}", bool(v)) for m, layer, b, v in _ordered(rows)]


def _single_value(frame: pd.DataFrame, column: str) -> str | None:
    if column not in frame:
        return None
    values = [str(v) for v in _ordered(frame[column].dropna())]
    return ", ".join(values) if values else None


def build_sanity_figure(sanity: pd.DataFrame, *, measure: str, layer: str | None = None) -> Figure:
    """Mean similarity of the maps after cascading randomisation (logits → input) to the
    original maps, one line per (method, layer) — VAR Fig. 6 / Adebayo et al. (2018) Fig. 4.

    x: the randomisation steps labelled by the layer (or block) randomised last, from the
    logits towards the input (top axis: % of the steps done, VAR's x axis); y: the ``measure``.
    A method and its wrapper, e.g. VAR over it (``base_method`` / ``wrapper`` columns, written
    by the evaluation callback), share a colour, the wrapper's line dashed. With ``sd`` and ``n`` columns a band of
    ±1 standard error is drawn. ``layer`` restricts to one layer (default: all). The title
    names the ``model`` and ``target`` recorded in the frame.
    """
    require_columns(sanity, SANITY_COLUMNS, "sanity")
    selected = sanity[sanity["measure"] == measure]
    if layer is not None:
        selected = selected[selected["layer"] == layer]
    if selected.empty:
        raise ValueError(f"sanity has no rows for layer={layer!r}, measure={measure!r}")
    steps = selected[["step_index", "step"]].drop_duplicates().sort_values("step_index")
    if steps["step_index"].duplicated().any():
        clash = steps[steps["step_index"].duplicated(keep=False)]
        raise ValueError(f"sanity step_index must name one step; got {clash.to_dict('records')}")
    values = selected["similarity"].to_numpy(np.float64)
    low, high = similarity_range(measure, values)
    lines = _sanity_line_keys(selected)
    colours = _colours(_ordered(key for _, _, key, _ in lines))
    several_layers = any(
        len({line_layer for m, line_layer, _, _ in lines if m == method}) > 1
        for method, _, _, _ in lines
    )
    figure = Figure(figsize=(max(8.5, 0.45 * len(steps) + 4.0), 6.0), layout="constrained")
    ax = figure.subplots()
    for method, line_layer, key, is_wrapper in lines:
        points = selected[(selected["method"] == method) & (selected["layer"] == line_layer)]
        points = points.sort_values("step_index", kind="stable")
        x = points["step_index"].to_numpy(np.float64)
        y = points["similarity"].to_numpy(np.float64)
        label = f"{method} @ {line_layer}" if several_layers else method
        ax.plot(
            x, y, color=colours[key], linestyle="--" if is_wrapper else "-", marker="o",
            markersize=4, label=label + (f" (wraps {key.rsplit('@', 1)[0]})" if is_wrapper else ""),
        )  # fmt: skip
        if {"sd", "n"} <= set(points.columns):
            error = points["sd"].to_numpy(np.float64) / np.sqrt(
                np.maximum(points["n"].to_numpy(np.float64), 1.0)
            )
            ax.fill_between(x, y - error, y + error, color=colours[key], alpha=0.12, linewidth=0)
    if low < 0:
        ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(steps["step_index"].to_numpy(), labels=list(steps["step"]))
    ax.tick_params(axis="x", labelrotation=60)
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
    total = max(int(steps["step_index"].max()), 1)
    top = ax.secondary_xaxis(
        "top", functions=(lambda s: 100.0 * s / total, lambda p: p * total / 100.0)
    )
    top.set_xlabel("randomisation steps done (%)")
    ax.set_ylim(low - 0.02, high + 0.02)
    ax.set_xlabel("randomised from the logits down to this layer (cumulative, towards the input)")
    samples = _single_value(selected, "n")
    band = ", band ±1 s.e." if {"sd", "n"} <= set(selected.columns) else ""
    ax.set_ylabel(
        f"similarity to the original map ({measure}, {low:g} to {high:g})\n"
        f"mean over {samples or 'the'} samples{band}"
    )
    model = _single_value(selected, "model")
    target = _single_value(selected, "target")
    shown = "; ".join(
        part
        for part in (f"model: {model}" if model else "", f"layer: {layer}" if layer else "")
        if part
    )
    target_text = _SANITY_TARGET_TEXT.get(target, f"explained class: {target}") if target else ""
    title = [
        f"Cascading randomisation sanity check: {_SANITY_MEASURE_TEXT.get(measure, measure)}",
        shown,
        " · ".join(p for p in (target_text, "lower = the map depends on the weights") if p),
    ]
    ax.set_title("\n".join(line for line in title if line), fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(
        loc="best",
        fontsize="small",
        title="solid: method, dashed: wrapped (e.g. VAR)" if any(v for *_, v in lines) else None,
        title_fontsize="small",
    )
    return figure


def sanity_curves(sanity: pd.DataFrame, directory: Path) -> list[Path]:
    """One PNG per similarity measure of :func:`build_sanity_figure` (every method and layer in
    one panel); ``[]`` for an empty input."""
    if sanity.empty:
        return []
    require_columns(sanity, SANITY_COLUMNS, "sanity")
    paths = []
    for measure in _ordered(sanity["measure"]):
        figure = build_sanity_figure(sanity, measure=measure)
        paths.append(save_figure(figure, Path(directory) / f"{slug('sanity', measure)}.png"))
    return paths


# --------------------------------------------------------------------------------------------
# Summary: mean ± 95 % CI per method
# --------------------------------------------------------------------------------------------


def build_summary_figure(summary: pd.DataFrame, *, metric: str) -> Figure:
    """Mean ± 95 % Student-t CI (``ci_low``, ``ci_high`` of the summary) of ``metric`` per method,
    one series per (layer, target_policy); the Wilcoxon threshold as a dashed line where the
    summary has one. Points without a CI (n < 2) have no error bar."""
    require_columns(summary, SUMMARY_COLUMNS, "summary")
    selected = summary[summary["metric"] == metric]
    if selected.empty:
        raise ValueError(f"summary has no rows for metric={metric!r}")
    methods = _ordered(selected["method"])
    series = _ordered(zip(selected["layer"], selected["target_policy"], strict=True))
    colours = _colours([f"{layer} {policy}" for layer, policy in series])
    width = 0.8 / len(series)
    figure = Figure(
        figsize=(max(6.4, 1.1 * len(methods) + 2.5), 4.6 + 0.25 * len(series)), layout="constrained"
    )
    ax = figure.subplots()
    for s, (layer, policy) in enumerate(series):
        rows = selected[(selected["layer"] == layer) & (selected["target_policy"] == policy)]
        positions = [methods.index(m) + (s - (len(series) - 1) / 2) * width for m in rows["method"]]
        mean = rows["mean"].to_numpy(np.float64)
        error = np.stack(
            [
                mean - rows["ci_low"].to_numpy(np.float64),
                rows["ci_high"].to_numpy(np.float64) - mean,
            ]
        )
        ax.errorbar(
            positions,
            mean,
            yerr=error,
            fmt="o",
            capsize=4,
            color=colours[f"{layer} {policy}"],
            label=f"layer: {layer}, targets: {policy}",
        )
    thresholds = selected["wilcoxon_threshold"].dropna().unique()
    for threshold in thresholds:
        ax.axhline(
            threshold,
            color="tab:red",
            linestyle="--",
            label=f"Wilcoxon threshold θ = {format_value(threshold)}",
        )
    ax.set_xticks(range(len(methods)), labels=methods)
    if len(methods) > 4:
        ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_xlabel("saliency method")
    ax.set_ylabel(f"mean {metric}")
    ax.set_title(f"{metric}: mean ± 95 % CI per method\n(no error bar when n < 2)")
    ax.grid(axis="y", alpha=0.3)
    figure.legend(loc="outside lower center", fontsize="small")
    return figure


def metric_summary(summary: pd.DataFrame, directory: Path) -> list[Path]:
    """One PNG per metric of :func:`build_summary_figure`; ``[]`` for an empty summary."""
    if summary.empty:
        return []
    require_columns(summary, SUMMARY_COLUMNS, "summary")
    return [
        save_figure(
            build_summary_figure(summary, metric=metric),
            Path(directory) / f"{slug('summary', metric)}.png",
        )
        for metric in _ordered(summary["metric"])
    ]
