"""experiments.compare_runs on fabricated evaluation runs with known per-sample values: the
table against contrastive_saliency.stats and scipy, which runs are paired, the outputs and W&B."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.image import imread
from scipy import stats as scipy_stats

from contrastive_saliency.stats import holm, mean_confidence_interval
from datamodules.cache_files import write_atomically
from experiments import compare_runs

SHAPES = {"class_path": "datamodules.ShapesDataModule", "init_args": {"test_size": 30}}
CUB = {"class_path": "datamodules.CUBDataModule", "init_args": {"root": "/data/cub"}}


def _run(
    root: Path,
    name: str,
    shift: float,
    data: dict,
    indices: np.ndarray,
    labels: np.ndarray | None = None,
    group: str | None = "seeds",
    batch_size: int = 50,
) -> Path:
    """An evaluation run: grad_cam and case, deletion AUC (values ``centre + shift + noise``)
    and feature agreement at threshold 0.5, one value per sample index."""
    rng = np.random.default_rng(sum(map(ord, name)))
    rows = []
    for method, centre in (("grad_cam", 0.6), ("case", 0.3)):
        for metric in ("deletion_auc", "feature_agreement"):
            values = centre + shift + 0.05 * rng.standard_normal(indices.size)
            rows.append(
                pd.DataFrame(
                    {"method": method, "layer": "features.3", "target_policy": "top1_vs_top2",
                     "metric": metric, "index": indices, "value": values,
                     "label": labels if labels is not None else indices % 10}
                )
            )  # fmt: skip
    run = root / name
    run.mkdir(parents=True)
    pd.concat(rows, ignore_index=True).to_parquet(run / "per_sample.parquet", index=False)
    loader = {"batch_size": batch_size, "num_workers": 1}
    config = {
        "data": {**data, "init_args": {**data["init_args"], **loader}},
        "evaluation": {"agreement_threshold": 0.5},
        "wandb": {"group": group},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    manifest = json.dumps({"files": {"per_sample.parquet": 1}}).encode()
    write_atomically(run / "manifest.json", lambda file: file.write(manifest))
    return run


def _values(run: Path, method: str, metric: str) -> pd.Series:
    frame = pd.read_parquet(run / "per_sample.parquet")
    rows = frame[(frame["method"] == method) & (frame["metric"] == metric)]
    return rows.set_index("index")["value"]


def test_table_equals_the_statistics_and_pairs_only_the_same_samples(tmp_path):
    everything = np.arange(30)
    a = _run(tmp_path, "eval-a", 0.0, SHAPES, everything)
    b = _run(tmp_path, "eval-b", 0.04, SHAPES, everything[5:], batch_size=8)  # subset; loader
    c = _run(tmp_path, "eval-c", 0.0, CUB, everything)  # another dataset: same indices
    relabelled = _run(tmp_path, "eval-d", 0.0, SHAPES, everything, labels=everything % 7)
    runs = compare_runs.load_runs([a, b, c, relabelled])
    table = compare_runs.comparison_table(runs)
    assert list(pd.unique(table["run"])) == ["eval-a", "eval-b", "eval-c", "eval-d"]
    assert len(table) == 2 * 2 * 4  # methods × metrics × runs
    paired = table.drop_duplicates("run").set_index("run")["paired"]
    assert paired.to_dict() == {"eval-a": False, "eval-b": True, "eval-c": False, "eval-d": False}

    rows = table.set_index(["method", "metric", "run"])
    for run_dir in (a, b, c):
        values = _values(run_dir, "case", "deletion_auc").to_numpy()
        row = rows.loc[("case", "deletion_auc", run_dir.name)]
        assert row["n"] == values.size and row["mean"] == pytest.approx(values.mean())
        ci = mean_confidence_interval(values)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(ci)
    # the paired test on the 25 samples both explained, as scipy computes it
    mine, reference = _values(b, "case", "deletion_auc"), _values(a, "case", "deletion_auc")
    expected = scipy_stats.ttest_rel(mine.to_numpy(), reference.loc[mine.index].to_numpy())
    row = rows.loc[("case", "deletion_auc", "eval-b")]
    assert row["n_paired"] == 25 and row["t_p_value"] == pytest.approx(expected.pvalue)
    assert row["mean_difference"] == pytest.approx((mine - reference.loc[mine.index]).mean())
    assert row["t_p_holm"] == pytest.approx(holm(np.array([expected.pvalue]))[0])
    for unpaired in ("eval-a", "eval-c", "eval-d"):
        assert np.isnan(rows.loc[("case", "deletion_auc", unpaired), "t_p_value"])
    # the run's own Wilcoxon test of feature agreement against its threshold
    agreement = rows.loc[("grad_cam", "feature_agreement", "eval-a")]
    assert agreement["wilcoxon_threshold"] == 0.5 and 0 <= agreement["wilcoxon_p"] <= 1
    assert np.isnan(rows.loc[("grad_cam", "deletion_auc", "eval-a"), "wilcoxon_p"])


def test_command_writes_table_markdown_plot_and_a_wandb_run_in_the_runs_group(tmp_path, capsys):
    runs = [_run(tmp_path, f"eval-seed{seed}", 0.01 * seed, SHAPES, np.arange(20))
            for seed in range(3)]  # fmt: skip
    output = tmp_path / "compared"
    table = compare_runs.main([
        *map(str, runs), "--labels", "s0", "s1", "s2", "--reference", "s1",
        "--metrics", "deletion_auc", "--output", str(output), "--wandb.mode", "offline",
    ])  # fmt: skip
    assert set(table["metric"]) == {"deletion_auc"} and set(table["reference"]) == {"s1"}
    assert table.loc[table["run"] == "s1", "t_p_value"].isna().all()
    assert table.loc[table["run"] != "s1", "n_paired"].eq(20).all()
    pd.testing.assert_frame_equal(pd.read_csv(output / "comparison.csv"), table, check_dtype=False)
    markdown = (output / "comparison.md").read_text()
    assert "## deletion_auc (layer features.3, targets top1_vs_top2)" in markdown
    assert "| method | s0 | s1 | s2 |" in markdown
    image = imread(output / "comparison.png")
    assert image.ndim == 3 and image.shape[1] > 300
    (offline,) = (output / "wandb").glob("offline-run-*")
    media = offline / "files" / "media" / "table" / "compare"
    (logged,) = media.glob("comparison_*.table.json")
    assert json.loads(logged.read_text())["columns"][:5] == [*compare_runs.KEYS, "run"]
    assert compare_runs.common_group(compare_runs.load_runs(runs)) == "seeds"
    assert "W&B group 'seeds'" in capsys.readouterr().out


def test_incomplete_runs_and_bad_labels_are_refused(tmp_path, capsys):
    complete = _run(tmp_path, "done", 0.0, SHAPES, np.arange(5))
    killed = tmp_path / "killed"
    killed.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        compare_runs.main([str(complete), str(killed), "--wandb.mode", "disabled"])
    assert exit_info.value.code == 2
    assert f"{killed} is not a complete evaluation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_runs.main([str(complete), "--labels", "x", "y", "--wandb.mode", "disabled"])
    assert "2 labels for 1 runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_runs.main([str(complete), "--reference", "nope", "--wandb.mode", "disabled"])
    assert "reference run 'nope'" in capsys.readouterr().err
