"""``report.md`` of an evaluation run: run info, key results per metric, paired tests, plots,
gallery and notes, as GitHub-flavoured markdown with links relative to the report's directory.

Tables use the small formatter :func:`markdown_table` (``tabulate``, which
``DataFrame.to_markdown`` needs, is not a dependency of the project).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from callbacks.report.plots import SUMMARY_COLUMNS, format_p, format_value, require_columns

STATS_COLUMNS = (
    "layer", "target_policy", "metric", "method", "reference", "n", "mean", "reference_mean",
    "t_statistic", "t_p_value", "t_p_holm", "t_p_bh", "cohens_d",
    "wilcoxon_p", "wilcoxon_p_holm", "wilcoxon_p_bh",
)  # fmt: skip
REPORT_NAME = "report.md"


def _cell(value: object) -> str:
    return str(value).replace("|", r"\|").replace("\n", " ")


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[bool] | None = None
) -> str:
    """A GitHub markdown table; ``|`` in cells is escaped, numeric columns are right-aligned."""
    numeric = list(numeric) if numeric is not None else [False] * len(header)
    if len(numeric) != len(header):
        raise ValueError(f"numeric has {len(numeric)} flags for {len(header)} columns")
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
    ]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"table row {list(row)} has {len(row)} cells, header {len(header)}")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _count(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return str(int(value))


def _mean_ci(row: pd.Series) -> str:
    mean = format_value(row["mean"])
    if math.isnan(row["ci_low"]) or math.isnan(row["ci_high"]):
        return mean
    return f"{mean} [{format_value(row['ci_low'])}, {format_value(row['ci_high'])}]"


def key_results(summary: pd.DataFrame) -> str:
    """One table per metric: method × mean [95 % CI], median, SD, n, and the one-sided Wilcoxon
    threshold and p-value (H1: median < θ, CASE Eq. 8) where the summary has them."""
    if summary is None or summary.empty:
        return "_No results in this run._"
    require_columns(summary, SUMMARY_COLUMNS, "summary")
    sections = []
    for metric in pd.unique(summary["metric"]):
        rows = summary[summary["metric"] == metric]
        wilcoxon = bool(rows["wilcoxon_p"].notna().any())
        header = ["Method", "Layer", "Targets", "Mean [95 % CI]", "Median", "SD", "n"]
        numeric = [False, False, False, True, True, True, True]
        if wilcoxon:
            header += ["Wilcoxon θ", "Wilcoxon p (median < θ)"]
            numeric += [True, True]
        body = []
        for _, row in rows.iterrows():
            cells = [
                row["method"],
                row["layer"],
                row["target_policy"],
                _mean_ci(row),
                format_value(row["median"]),
                format_value(row["sd"]),
                _count(row["n"]),
            ]
            if wilcoxon:
                cells += [format_value(row["wilcoxon_threshold"]), format_p(row["wilcoxon_p"])]
            body.append(cells)
        sections.append(f"### {metric}\n\n{markdown_table(header, body, numeric)}")
    return "\n\n".join(sections)


def stats_table(stats: pd.DataFrame | None) -> str:
    """Paired comparisons of each method with its reference: t statistic and p-value with Holm
    and Benjamini–Hochberg corrections, Cohen's d, Wilcoxon signed-rank p (and corrections)."""
    if stats is None or stats.empty:
        return "_No paired comparisons in this run._"
    require_columns(stats, STATS_COLUMNS, "stats")
    header = [
        "Metric", "Layer", "Targets", "Method", "Reference", "n", "Mean", "Reference mean",
        "t", "p (t)", "p (t, Holm)", "p (t, BH)", "Cohen's d",
        "Wilcoxon p", "Wilcoxon p (Holm)", "Wilcoxon p (BH)",
    ]  # fmt: skip
    numeric = [False] * 5 + [True] * 11
    body = [
        [
            row["metric"],
            row["layer"],
            row["target_policy"],
            row["method"],
            row["reference"],
            _count(row["n"]),
            format_value(row["mean"]),
            format_value(row["reference_mean"]),
            format_value(row["t_statistic"]),
            format_p(row["t_p_value"]),
            format_p(row["t_p_holm"]),
            format_p(row["t_p_bh"]),
            format_value(row["cohens_d"]),
            format_p(row["wilcoxon_p"]),
            format_p(row["wilcoxon_p_holm"]),
            format_p(row["wilcoxon_p_bh"]),
        ]
        for _, row in stats.iterrows()
    ]
    return markdown_table(header, body, numeric)


def paired_tests(stats: pd.DataFrame | None) -> str:
    """:func:`stats_table`, one table per reference method when there are several."""
    if stats is None or stats.empty or stats["reference"].nunique() < 2:
        return stats_table(stats)
    return "\n\n".join(
        f"### Against {reference}\n\n{stats_table(stats[stats['reference'] == reference])}"
        for reference in pd.unique(stats["reference"])
    )


def relative_link(path: Path, directory: Path) -> str:
    """URL-quoted POSIX path of ``path`` relative to ``directory``; a relative ``path`` is taken
    relative to ``directory``. The file must exist inside ``directory``."""
    directory = Path(directory).resolve()
    target = (directory / path).resolve()  # an absolute path replaces the directory
    if not target.is_relative_to(directory):
        raise ValueError(
            f"{path} is outside the report directory {directory}; its link would break when "
            "the directory moves"
        )
    if not target.is_file():
        raise FileNotFoundError(f"report image {target} does not exist")
    return quote(target.relative_to(directory).as_posix(), safe="/._-")


def _images(paths: Sequence[Path], directory: Path, empty: str) -> str:
    if not paths:
        return empty
    lines = []
    for path in paths:
        caption = Path(path).stem.replace("__", " · ").replace("[", "(").replace("]", ")")
        lines.append(f"![{caption}]({relative_link(Path(path), directory)})")
    return "\n\n".join(lines)


def write_report(
    directory: Path,
    *,
    title: str,
    run_info: Mapping[str, str],
    summary: pd.DataFrame,
    stats: pd.DataFrame | None,
    plot_paths: Sequence[Path],
    gallery_paths: Sequence[Path],
    notes: Sequence[str] = (),
) -> Path:
    """Write ``directory/report.md`` and return its path.

    Sections: the title; a run-info table (the ``run_info`` entries in order); "Key results"
    (:func:`key_results`); "Paired tests" (:func:`stats_table`); "Plots" and "Gallery" (images
    linked relative to ``directory``; every path must be an existing file inside it); "Notes".
    Numbers have 4 significant digits, p-values 2 (``3.2e-05``).
    """
    directory = Path(directory)
    run_table = markdown_table(["Key", "Value"], [[k, v] for k, v in run_info.items()])
    parts = [
        f"# {title}",
        "## Run",
        run_table if run_info else "_No run information._",
        "## Key results",
        "Mean with its 95 % Student-t confidence interval; Wilcoxon: one-sided signed-rank "
        "test of H1: median < θ (CASE Eq. 8).",
        key_results(summary),
        "## Paired tests against the reference method",
        "Paired t-test (t, p) with Holm and Benjamini–Hochberg (BH) corrected p-values over the "
        "comparisons, Cohen's d, and the Wilcoxon signed-rank test.",
        paired_tests(stats),
        "## Plots",
        _images(plot_paths, directory, "_No plots._"),
        "## Gallery",
        _images(gallery_paths, directory, "_No gallery samples._"),
    ]
    if notes:
        parts += ["## Notes", "\n".join(f"- {note}" for note in notes)]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / REPORT_NAME
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path
