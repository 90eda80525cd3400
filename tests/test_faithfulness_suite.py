"""configs/evaluate/faithfulness_suite.yaml runs as shipped (only the sample count and the
correct-only filter relaxed for the tiny one-epoch model): every metric of the Quantus-style
families gives one value per sample and method, and the reference maps behave as their
definitions say."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

import evaluate
from contrastive_saliency.metrics.registry import metric_class
from tests.test_evaluation_pipeline import _args

SUITE = Path(__file__).resolve().parents[1] / "configs" / "evaluate" / "faithfulness_suite.yaml"


def _configured_metrics() -> list[str]:
    entries = yaml.safe_load(SUITE.read_text())["evaluation"]["metrics"]
    return [entry if isinstance(entry, str) else entry["name"] for entry in entries]


def test_the_suite_covers_the_three_families():
    families = {metric_class(name).family for name in _configured_metrics()}
    assert families == {"faithfulness", "robustness", "complexity"}


def test_the_faithfulness_suite_runs_as_shipped(trained_run, tmp_path):
    evaluate.main([
        "--config", str(SUITE), *_args(trained_run, tmp_path, "suite"),
        "--evaluation.sample_size", "3", "--evaluation.correct_only", "false",
        "--evaluation.gallery_size", "0",
    ])  # fmt: skip
    frame = pd.read_parquet(tmp_path / "suite" / "per_sample.parquet")
    methods = yaml.safe_load(SUITE.read_text())["evaluation"]["methods"]
    expected_methods = {m if isinstance(m, str) else m["name"] for m in methods}
    assert set(frame["method"]) == expected_methods
    for name in _configured_metrics():
        rows = frame[frame["metric"] == name]
        assert len(rows) == 3 * len(expected_methods), name  # each sample and method once
    finite = frame[frame["metric"] != "irof"]  # IROF is NaN only for a zero starting score
    assert finite["value"].notna().all()
    # a map that does not depend on the input does not change under input noise
    random = frame[(frame["method"] == "random") & frame["metric"].str.endswith("_sensitivity")]
    assert len(random) == 6 and (random["value"] == 0).all()
