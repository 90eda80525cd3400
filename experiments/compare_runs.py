"""Compare evaluation runs — seeds, models, layers, datasets — in one table and one plot.

    uv run python -m experiments.compare_runs outputs/eval-A outputs/eval-B ... \\
        [--labels A B ...] [--reference A] [--metrics deletion_auc ...] [--output DIR]

Each argument is an ``evaluate.py`` run directory holding a complete result (its
``manifest.json``; :func:`callbacks.run_outputs.is_complete`). From every run's
``per_sample.parquet``:

- ``comparison.csv``: one row per (method, layer, target policy, metric, run): n, mean,
  median, sd and the 95 % Student-t CI of the mean (as the run's own ``summary.csv``:
  :func:`callbacks.evaluation.tables.summarise`, with the run's Wilcoxon test of feature
  agreement against its threshold), and the paired test of the run against the reference run
  (default: the first) on the samples both explained — paired t-test of ``run − reference``,
  Cohen's d_z, Holm- and Benjamini–Hochberg-corrected across the runs compared
  (:func:`contrastive_saliency.stats.compare_methods` with runs in place of methods). Runs are paired
  only when they explained the same samples: the same datamodule config (ignoring batch size
  and workers) and, where recorded, the same label at every shared sample index. Other pairs
  get no test (``paired`` false: different models on different datasets are compared by their
  CIs only).
- ``comparison.md``: the same as markdown tables, one per metric;
- ``comparison.png``: one panel per (metric, layer, target policy), mean ± 95 % CI per
  method, one colour per run;
- an offline W&B run (job type ``compare``) in the runs' group (their common
  ``wandb.group``, else ``--wandb.group``) with the table and the plot
  (``--wandb.mode disabled`` or ``WANDB_MODE=disabled``: none).

:mod:`experiments.aggregate_seeds` uses the same reading, table, plot and W&B logging for the
seeds of one training config, and adds CASE Fig. 4 on top.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from callbacks.evaluation.tables import GROUP, summarise
from lightning_modules.wandb_runs import log_tables_and_images, wandb_logger

KEYS = GROUP  # method, layer, target_policy, metric
COMPARISON_COLUMNS = [
    *KEYS, "run", "n", "mean", "median", "sd", "ci_low", "ci_high", "wilcoxon_threshold",
    "wilcoxon_p", "reference", "paired", "n_paired", "mean_difference", "t_statistic",
    "t_p_value", "t_p_holm", "t_p_bh", "cohens_d",
]  # fmt: skip
_LOADER_KEYS = ("batch_size", "num_workers", "pin_memory", "persistent_workers")
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class EvaluationRun:
    """One complete ``evaluate.py`` result: its label, directory, per-sample values and config."""

    label: str
    path: Path
    per_sample: pd.DataFrame
    config: dict[str, Any]

    @property
    def data(self) -> Any:
        """The datamodule config without loader settings (what decides the samples)."""
        return _without_loader_keys(self.config.get("data"))

    @property
    def wandb_group(self) -> str | None:
        group = (self.config.get("wandb") or {}).get("group")
        return str(group) if group else None

    @property
    def agreement_threshold(self) -> float:
        """The Wilcoxon threshold of the run's feature-agreement test: from its
        ``summary.csv``, else its config, else the paper's 0.5."""
        summary = self.path / "summary.csv"
        if summary.is_file():
            table = pd.read_csv(summary)
            if {"metric", "wilcoxon_threshold"} <= set(table.columns):
                tested = table[table["metric"].astype(str).str.startswith("feature_agreement")]
                values = tested["wilcoxon_threshold"].dropna().unique()
                if len(values) == 1:
                    return float(values[0])
        configured = (self.config.get("evaluation") or {}).get("agreement_threshold")
        return float(configured) if configured is not None else DEFAULT_THRESHOLD


def _without_loader_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_loader_keys(v) for k, v in value.items() if k not in _LOADER_KEYS}
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    return loaded if isinstance(loaded, dict) else {}


def load_runs(paths: Sequence[Path], labels: Sequence[str] | None = None) -> list[EvaluationRun]:
    """The evaluation runs at ``paths`` (labels: ``labels``, else the directory names, made
    unique with their parent's name). Raises :class:`ValueError` naming a run that is not a
    complete evaluation."""
    from callbacks.run_outputs import MANIFEST, is_complete

    paths = [Path(path) for path in paths]
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs: give one label per run")
    if labels is None:
        names = [path.name for path in paths]
        labels = [
            f"{path.parent.name}/{path.name}" if names.count(path.name) > 1 else path.name
            for path in paths
        ]
    if len(set(labels)) != len(labels):
        raise ValueError(f"run labels repeat ({list(labels)}): pass --labels")
    runs = []
    for path, label in zip(paths, labels, strict=True):
        if not is_complete(path):
            raise ValueError(
                f"{path} is not a complete evaluation (no {MANIFEST} listing its files): run "
                f"evaluate.py into it (--output_dir/--run_name) or pass another directory"
            )
        per_sample = pd.read_parquet(path / "per_sample.parquet")
        runs.append(EvaluationRun(str(label), path, per_sample, _read_yaml(path / "config.yaml")))
    return runs


# ------------------------------------------------------------------------------- table


def comparison_table(
    runs: Sequence[EvaluationRun],
    reference: str | None = None,
    metrics: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The comparison described in the module docstring, rows in the runs' order."""
    if not runs:
        raise ValueError("no runs to compare")
    labels = [run.label for run in runs]
    reference = reference or labels[0]
    if reference not in labels:
        raise ValueError(f"reference run {reference!r} is not one of {labels}")
    base = next(run for run in runs if run.label == reference)
    frames = []
    for run in runs:
        per_sample = run.per_sample
        if metrics is not None:
            per_sample = per_sample[per_sample["metric"].isin(metrics)]
        frames.append(summarise(per_sample, run.agreement_threshold).assign(run=run.label))
    summary = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if summary.empty:
        raise ValueError(
            f"the runs have no values{f' for metrics {list(metrics)}' if metrics else ''}"
        )
    paired = {run.label: pairs_with(run, base) for run in runs if run.label != reference}
    tests = _paired_tests(runs, reference, paired, metrics)
    table = summary.merge(tests, on=[*KEYS, "run"], how="left")
    table["reference"] = reference
    table["paired"] = table["run"].map(paired).fillna(False).astype(bool)
    # rows by (method, layer, policy, metric) in order of first appearance, runs in given order
    position = {label: index for index, label in enumerate(labels)}
    table["_key"] = table.groupby(KEYS, sort=False).ngroup()
    table["_run"] = table["run"].map(position)
    table = table.sort_values(["_key", "_run"], kind="stable")
    return table.reindex(columns=COMPARISON_COLUMNS).reset_index(drop=True)


def pairs_with(run: EvaluationRun, reference: EvaluationRun) -> bool:
    """Whether ``run`` explained the same samples as ``reference``: the same datamodule config
    (loader settings aside) and the same label at every shared sample index."""
    if run.data != reference.data:
        return False
    if "label" not in run.per_sample or "label" not in reference.per_sample:
        return True
    labels = [r.per_sample[["index", "label"]].drop_duplicates("index") for r in (run, reference)]
    joined = labels[0].merge(labels[1], on="index", suffixes=("", "_reference"))
    return bool((joined["label"] == joined["label_reference"]).all())


def _paired_tests(
    runs: Sequence[EvaluationRun],
    reference: str,
    paired: Mapping[str, bool],
    metrics: Sequence[str] | None,
) -> pd.DataFrame:
    """Per (method, layer, policy, metric): each paired run vs the reference run
    (:func:`contrastive_saliency.stats.compare_methods` over the run column)."""
    from contrastive_saliency.stats import compare_methods

    compared = [run for run in runs if run.label == reference or paired.get(run.label)]
    columns = [*KEYS, "run", "n_paired", "mean_difference", "t_statistic", "t_p_value",
               "t_p_holm", "t_p_bh", "cohens_d"]  # fmt: skip
    if len(compared) < 2:
        return pd.DataFrame(columns=columns)
    values = pd.concat(
        [run.per_sample[[*KEYS, "index", "value"]].assign(run=run.label) for run in compared],
        ignore_index=True,
    )
    if metrics is not None:
        values = values[values["metric"].isin(metrics)]
    values = values[np.isfinite(values["value"].astype(np.float64))]
    frames = []
    for key, group in values.groupby(KEYS, sort=False):
        if reference not in set(group["run"]) or group["run"].nunique() < 2:
            continue
        # compare_methods names its compared column "method": here those are the runs
        result = compare_methods(group, reference, method_col="run")
        result = result.rename(columns={"method": "run", "n": "n_paired"})
        for name, value in zip(KEYS, key, strict=True):
            result[name] = value
        frames.append(result)
    if not frames:
        return pd.DataFrame(columns=columns)
    tests = pd.concat(frames, ignore_index=True)
    tests["mean_difference"] = tests["mean"] - tests["reference_mean"]
    return tests.drop(columns=["reference"])[columns]


# ------------------------------------------------------------------------ markdown, plot


def comparison_markdown(table: pd.DataFrame, context: str = "") -> str:
    """One markdown table per (metric, layer, target policy): methods × runs, cells
    ``mean [95 % CI]`` and, for paired runs, the Holm-corrected p of the paired t-test."""
    from callbacks.report.markdown import markdown_table
    from callbacks.report.plots import format_p, format_value

    runs = list(pd.unique(table["run"]))
    reference = table["reference"].iloc[0]
    sections = ["# Comparison of evaluation runs", ""]
    if context:
        sections += [context, ""]
    sections += [
        f"Cells: mean [95 % CI]; p = Holm-corrected paired t-test against {reference!r} on "
        f"the samples both runs explained (only runs of the same data are paired).",
        "",
    ]
    for (metric, layer, policy), rows in table.groupby(
        ["metric", "layer", "target_policy"], sort=False
    ):
        sections += [f"## {metric} (layer {layer}, targets {policy})", ""]
        body = []
        for method, method_rows in rows.groupby("method", sort=False):
            cells = [method]
            for run in runs:
                row = method_rows[method_rows["run"] == run]
                if row.empty:
                    cells.append("–")
                    continue
                row = row.iloc[0]
                cell = format_value(row["mean"])
                if not (math.isnan(row["ci_low"]) or math.isnan(row["ci_high"])):
                    cell += f" [{format_value(row['ci_low'])}, {format_value(row['ci_high'])}]"
                if bool(row["paired"]) and not math.isnan(row["t_p_holm"]):
                    cell += f" (p = {format_p(row['t_p_holm'])})"
                cells.append(cell)
            body.append(cells)
        sections += [markdown_table(["method", *runs], body, [False] + [True] * len(runs)), ""]
    return "\n".join(sections)


def build_comparison_figure(table: pd.DataFrame, title: str = ""):
    """One panel per (metric, layer, target policy): mean ± 95 % CI per method, one colour and
    offset per run."""
    from matplotlib.figure import Figure

    from callbacks.report.plots import _colours

    panels = list(
        dict.fromkeys(zip(table["metric"], table["layer"], table["target_policy"], strict=True))
    )
    runs = list(pd.unique(table["run"]))
    colours = _colours(runs)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    methods_max = table["method"].nunique()
    figure = Figure(
        figsize=(max(5.0, 0.9 * methods_max + 2.5) * columns, 3.8 * rows + 0.6),
        layout="constrained",
    )
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    width = 0.8 / max(len(runs), 1)
    for ax, (metric, layer, policy) in zip(axes, panels, strict=False):
        selected = table[
            (table["metric"] == metric)
            & (table["layer"] == layer)
            & (table["target_policy"] == policy)
        ]
        methods = list(pd.unique(selected["method"]))
        for position, run in enumerate(runs):
            rows_of_run = selected[selected["run"] == run]
            if rows_of_run.empty:
                continue
            x = [
                methods.index(m) + (position - (len(runs) - 1) / 2) * width
                for m in rows_of_run["method"]
            ]
            mean = rows_of_run["mean"].to_numpy(np.float64)
            low = np.nan_to_num(mean - rows_of_run["ci_low"].to_numpy(np.float64))
            high = np.nan_to_num(rows_of_run["ci_high"].to_numpy(np.float64) - mean)
            ax.errorbar(x, mean, yerr=np.stack([low, high]), fmt="o", capsize=3,
                        color=colours[run], label=run)  # fmt: skip
        ax.set_xticks(range(len(methods)), labels=methods)
        if len(methods) > 3:
            ax.tick_params(axis="x", labelrotation=30)
        ax.set_title(f"{metric}\nlayer {layer}, targets {policy}", fontsize="medium")
        ax.set_ylabel(f"mean {metric} (95 % CI)")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(
        handles, names, loc="outside lower center", ncols=min(len(runs), 4), fontsize="small"
    )
    figure.suptitle(title or f"{len(runs)} evaluation runs: mean ± 95 % CI", fontsize="medium")
    return figure


def write_comparison(
    table: pd.DataFrame, output: Path, context: str = "", title: str = ""
) -> dict[str, Path]:
    """``comparison.csv``, ``comparison.md`` and ``comparison.png`` in ``output``."""
    from callbacks.report.plots import save_figure

    output.mkdir(parents=True, exist_ok=True)
    paths = {
        "comparison": output / "comparison.csv",
        "comparison_md": output / "comparison.md",
        "comparison_plot": output / "comparison.png",
    }
    table.to_csv(paths["comparison"], index=False)
    paths["comparison_md"].write_text(comparison_markdown(table, context))
    save_figure(build_comparison_figure(table, title), paths["comparison_plot"])
    return paths


# --------------------------------------------------------------------------------- W&B


def common_group(runs: Sequence[EvaluationRun]) -> str | None:
    """The W&B group every run was logged in, if they share one."""
    groups = {run.wandb_group for run in runs}
    return groups.pop() if len(groups) == 1 else None


def log_to_wandb(
    output: Path,
    tables: Mapping[str, pd.DataFrame],
    images: Mapping[str, Path],
    *,
    group: str,
    name: str,
    job_type: str,
    mode: str,
    project: str,
    config: dict,
    summary: Mapping[str, float] | None = None,
) -> Path | None:
    """A W&B run under ``output/wandb`` with ``<job_type>/<key>`` tables and images and the
    ``summary`` values; nothing when ``mode`` is ``disabled``. Returns the run's directory."""
    logger = wandb_logger(
        output, name, job_type=job_type, mode=mode, project=project, group=group, config=config
    )
    if logger is None:
        return None
    run = logger.experiment
    log_tables_and_images(
        run,
        {f"{job_type}/{key}": table for key, table in tables.items()},
        {f"{job_type}/{key}": path for key, path in images.items()},
    )
    for key, value in (summary or {}).items():
        run.summary[key] = value
    directory = Path(run.dir).parent
    run.finish()
    return directory


# ------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.compare_runs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("runs", nargs="+", type=Path, help="evaluate.py run directories")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: directory names)")
    parser.add_argument(
        "--reference", help="the run the others are tested against (default: first)"
    )
    parser.add_argument("--metrics", nargs="+", help="only these metrics (default: all)")
    parser.add_argument(
        "--output", type=Path, help="default: <first run's parent>/compare-<labels>"
    )
    parser.add_argument(
        "--wandb.mode", dest="wandb_mode", choices=["offline", "online", "disabled"],
        default=os.environ.get("WANDB_MODE", "offline"),
    )  # fmt: skip
    parser.add_argument("--wandb.project", dest="wandb_project", default="contrastive-saliency")
    parser.add_argument("--wandb.group", dest="wandb_group", help="default: the runs' common group")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs, args.labels)
        table = comparison_table(runs, args.reference, args.metrics)
    except ValueError as error:
        parser.error(str(error))
    labels = [run.label for run in runs]
    output = args.output or args.runs[0].parent / _default_name(labels)
    paths = write_comparison(table, output)
    group = args.wandb_group or common_group(runs) or output.name
    wandb_dir = log_to_wandb(
        output, {"comparison": table}, {"comparison_plot": paths["comparison_plot"]},
        group=group, name=output.name, job_type="compare", mode=args.wandb_mode,
        project=args.wandb_project, config={"runs": [str(r.path) for r in runs], "labels": labels},
    )  # fmt: skip
    shown = ["method", "layer", "target_policy", "metric", "run", "n", "mean", "ci_low",
             "ci_high", "n_paired", "t_p_holm"]  # fmt: skip
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(table[shown].to_string(index=False))
    print_outputs(output, paths, wandb_dir, f"; W&B group {group!r}")
    return table


def print_outputs(
    output: Path, paths: Mapping[str, Path], wandb_dir: Path | None, note: str = ""
) -> None:
    """The files a cross-run command wrote, and how to upload its W&B run."""
    print(f"\noutput: {output}")
    for path in paths.values():
        print(f"  {path}")
    if wandb_dir is not None:
        print(f"  {wandb_dir}  (upload: wandb sync {wandb_dir}{note})")


def _default_name(labels: Sequence[str]) -> str:
    joined = "-vs-".join(label.replace("/", "_") for label in labels)
    return f"compare-{joined}" if len(joined) <= 80 else f"compare-{len(labels)}-runs"


if __name__ == "__main__":
    main()
