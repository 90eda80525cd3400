"""Finer-CAM Fig. 1 (left) across runs: several classifiers' sorted weight-similarity curves.

Each run directory must hold ``analyses/classifier_similarity/curve.csv``, written by
:class:`callbacks.analyses.classifier_similarity.ClassifierSimilarityCallback` during
``evaluate.py`` (e.g. ``configs/experiment/finer_cam_weight_similarity_*.yaml``). Fig. 1 overlays the CLIP
linear probes of three fine-grained datasets; curves are labelled by the run's model and data
(``config.yaml``; :mod:`experiments.run_labels`) or ``--labels``.

    uv run python -m experiments.classifier_similarity_curves outputs/finer-cam-similarity-cub \\
        outputs/finer-cam-similarity-cars ... --output outputs/finer_cam_fig1.png

Writes the PNG and, next to it, ``<stem>.csv`` (every run's curve with a ``model`` column).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

ANALYSIS = "classifier_similarity"


def main(argv: Sequence[str] | None = None) -> Path:
    from callbacks.analyses.classifier_similarity import SimilaritySeries, build_similarity_figure
    from callbacks.report.plots import save_figure
    from experiments.run_labels import run_label

    parser = argparse.ArgumentParser(
        prog="python -m experiments.classifier_similarity_curves",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (evaluate.py)")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--labels", nargs="+", help="one legend label per run")
    parser.add_argument("--max_rank", type=int, help="draw ranks 1..max_rank only")
    parser.add_argument("--name", default=ANALYSIS, help="analysis name (folder in analyses/)")
    parser.add_argument("--title", help="figure title (default: Finer-CAM Fig. 1 ...)")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
    if args.max_rank is not None and args.max_rank < 1:
        parser.error(f"--max_rank must be positive, got {args.max_rank}")
    labels = args.labels or [run_label(run) for run in args.runs]
    series, tables = [], []
    for run, label in zip(args.runs, labels, strict=True):
        path = run / "analyses" / args.name / "curve.csv"
        if not path.is_file():
            raise SystemExit(
                f"{path} not found: evaluate the run with callbacks.analyses.classifier_similarity."
                f"ClassifierSimilarityCallback (e.g. configs/experiment/"
                f"finer_cam_weight_similarity_shapes.yaml) or pass --name"
            )
        curve = pd.read_csv(path)
        if args.max_rank is not None:
            curve = curve[curve["rank"] <= args.max_rank]
        classes = int(curve["classes"].iloc[0])
        series.append(SimilaritySeries(f"{label} ({classes} classes)", curve))
        tables.append(curve.assign(model=label, run=str(run)))
    title = args.title or (
        "Finer-CAM Fig. 1: sorted cosine similarity between classifier weights\n"
        "mean over classes of each class's k-th most similar other class, ± 1 sd"
    )
    output = save_figure(build_similarity_figure(series, title=title), args.output)
    pd.concat(tables, ignore_index=True).to_csv(output.with_suffix(".csv"), index=False)
    for item in series:
        first = item.curve.iloc[0]
        print(f"{item.label}: rank 1 mean {first['mean']:.4f} (sd {first['sd']:.4f})")
    print(f"\nwrote {output} and {output.with_suffix('.csv')}")
    return output


if __name__ == "__main__":
    main()
