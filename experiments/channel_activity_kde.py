"""CASE Fig. 6: channel activity across architectures, one KDE per (run, layer) in one figure.

Each run directory must hold ``analyses/channel_activity/per_class.csv``, written by
:class:`callbacks.analyses.channel_activity.ChannelActivityCallback` during ``evaluate.py`` (e.g.
``configs/experiment/case_imagenet_*.yaml``). Curves are labelled by the run's model and data
(``config.yaml``; :mod:`experiments.run_labels`) or ``--labels``.

    uv run python -m experiments.channel_activity_kde outputs/case-imagenet-resnet50 \\
        outputs/case-imagenet-vgg19 ... --output outputs/case_fig6_channel_activity.png

Writes the PNG and, next to it, ``<stem>.csv`` (per run and layer: channels, classes, mean and
median active channels over classes, share active); prints that table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

ANALYSIS = "channel_activity"


def _read(run_dir: Path, name: str, table: str) -> pd.DataFrame:
    path = Path(run_dir) / "analyses" / name / f"{table}.csv"
    if not path.is_file():
        raise SystemExit(
            f"{path} not found: evaluate the run with callbacks.analyses.channel_activity."
            f"ChannelActivityCallback (e.g. configs/experiment/case_layer_ablation_shapes.yaml) "
            f"or pass --name if the analysis has another name"
        )
    return pd.read_csv(path)


def main(argv: Sequence[str] | None = None) -> Path:
    from callbacks.analyses.channel_activity import (
        build_channel_activity_figure,
        kde_series,
        summarise_per_class,
    )
    from callbacks.report.plots import save_figure
    from experiments.run_labels import run_label

    parser = argparse.ArgumentParser(
        prog="python -m experiments.channel_activity_kde", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (evaluate.py)")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--labels", nargs="+", help="one legend label per run")
    parser.add_argument("--layers", nargs="+", help="only these layers (default: all)")
    parser.add_argument("--name", default=ANALYSIS, help="analysis name (folder in analyses/)")
    parser.add_argument("--title", help="figure title (default: CASE Fig. 6 ...)")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
    labels = args.labels or [run_label(run) for run in args.runs]
    series, summaries, thresholds, selections = [], [], set(), set()
    for run, label in zip(args.runs, labels, strict=True):
        per_class = _read(run, args.name, "per_class")
        summary = _read(run, args.name, "summary")
        if args.layers:
            missing = sorted(set(args.layers) - set(per_class["layer"]))
            if len(missing) == len(set(args.layers)):
                parser.error(f"{run} has none of --layers {args.layers}")
            per_class = per_class[per_class["layer"].isin(args.layers)]
        thresholds.update(summary["threshold"].tolist())
        correct = set(summary["correct_only"].tolist())
        selections.add("correctly predicted" if correct == {True} else "all")
        series += kde_series(per_class, prefix=f"{label} · ")
        table = summarise_per_class(per_class, summary["threshold"].iloc[0], correct == {True})
        summaries.append(table.assign(run=str(run), model=label))
    threshold = ", ".join(f"{t:g}" for t in sorted(thresholds))
    title = args.title or (
        f"CASE Fig. 6: KDE over classes of the mean active channels per class\n"
        f"one curve per model and layer; τ = {threshold}; "
        f"{' / '.join(sorted(selections))} test images"
    )
    figure = build_channel_activity_figure(series, title=title)
    output = save_figure(figure, args.output)
    columns = ["run", "model", "layer", "channels", "classes", "images", "mean_over_classes",
               "median_over_classes", "share_active", "threshold"]  # fmt: skip
    table = pd.concat(summaries, ignore_index=True)[columns]
    table.to_csv(output.with_suffix(".csv"), index=False)
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(table.drop(columns="run").to_string(index=False))
    print(f"\nwrote {output} and {output.with_suffix('.csv')}")
    return output


if __name__ == "__main__":
    main()
