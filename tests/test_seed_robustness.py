"""Seed-robustness study (CASE Sec. V-A.1, Fig. 4): the seed sweep, the W&B sweep config, the
aggregation tables on fabricated per-seed outputs, and one end-to-end sweep + aggregation.

That ``train.py`` with the same seed gives identical weights (and another seed different ones)
is tested in ``tests/test_cli.py::test_seed_is_honoured``; here the sweep must pass each seed
through to its run.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from matplotlib.image import imread

from callbacks.run_outputs import is_complete
from contrastive_saliency.stats import wilcoxon_below
from datamodules.cache_files import write_atomically
from experiments import _jobs, aggregate_seeds, seed_sweep
from experiments.seed_tables import (
    SUMMARY_COLUMNS,
    WILCOXON_COLUMNS,
    agreement_values,
    kendalls_w,
    seed_summary_table,
    seed_wilcoxon_table,
)
from tests.conftest import TINY_DATA

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
TWIN = REPO / "configs" / "experiment" / "shapes_seed_robustness.yaml"
STUDY = REPO / "configs" / "evaluate" / "seed_robustness.yaml"
SWEEP = REPO / "configs" / "sweeps" / "seed_robustness.yaml"
METHODS = ["grad_cam", "score_cam", "case"]
# per-method centre of the fabricated agreement values: case clearly below the 0.5 threshold,
# grad_cam clearly above, score_cam near it
CENTRES = {"grad_cam": 0.75, "score_cam": 0.48, "case": 0.2}


# ------------------------------------------------------------------------------ closed forms


def test_kendalls_w_closed_forms():
    assert kendalls_w(np.array([[1, 1, 1], [2, 2, 2], [3, 3, 3]]))[0] == pytest.approx(1.0)
    assert kendalls_w(np.array([[1, 2], [2, 1]]))[0] == pytest.approx(0.0)
    # R = (3, 3, 6), S = 6, W = 12·6 / (2²·(3³ − 3)) = 0.75; χ² = 2·2·0.75 = 3 on 2 df
    w, p = kendalls_w(np.array([[1, 2], [2, 1], [3, 3]]))
    assert w == pytest.approx(0.75) and p == pytest.approx(math.exp(-1.5))
    # a tie in rater 1 (T = 2³ − 2 = 6): R = (2.5, 3.5, 6), S = 6.5, W = 78 / (96 − 12)
    w, _ = kendalls_w(np.array([[1.5, 1], [1.5, 2], [3, 3]]))
    assert w == pytest.approx(78 / 84)
    assert all(math.isnan(v) for v in kendalls_w(np.array([[1], [2]])))  # one rater


def _per_sample(seed: int, n: int = 40, layer: str = "features.3") -> pd.DataFrame:
    """An evaluation's per_sample table with known agreement values plus rows the aggregation
    must ignore (another metric, another target policy)."""
    rng = np.random.default_rng(seed)
    frames = []
    for method in METHODS:
        values = np.clip(CENTRES[method] + 0.1 * rng.standard_normal(n), 0.0, 1.0)
        frames.append(
            pd.DataFrame(
                {"method": method, "layer": layer, "target_policy": "top1_vs_top2",
                 "metric": "feature_agreement", "index": np.arange(n), "value": values}
            )
        )  # fmt: skip
        frames.append(frames[-1].assign(metric="deletion_auc", value=rng.random(n)))
        frames.append(frames[-2].assign(target_policy="top1", metric="feature_agreement"))
    return pd.concat(frames, ignore_index=True)


def _agreement(per_sample: pd.DataFrame, method: str) -> np.ndarray:
    rows = per_sample[
        (per_sample["method"] == method)
        & (per_sample["metric"] == "feature_agreement")
        & (per_sample["target_policy"] == "top1_vs_top2")
    ]
    return rows["value"].to_numpy(np.float64)


def test_seed_tables_equal_saliency_stats_and_numpy():
    per_sample = {seed: _per_sample(seed) for seed in (0, 1, 2)}
    values = pd.concat(
        [agreement_values(frame).assign(seed=seed) for seed, frame in per_sample.items()]
    )
    wilcoxon = seed_wilcoxon_table(values, threshold=0.5, alpha=0.05)
    assert list(wilcoxon.columns) == WILCOXON_COLUMNS and len(wilcoxon) == 9
    for _, row in wilcoxon.iterrows():
        expected = _agreement(per_sample[row["seed"]], row["method"])
        test = wilcoxon_below(expected, 0.5)
        assert row["n"] == expected.size
        assert row["p_value"] == test.p_value and row["wilcoxon_statistic"] == test.statistic
        assert row["rejects_h0"] == (test.p_value < 0.05)
        assert row["mean_agreement"] == pytest.approx(expected.mean(), abs=1e-12)
        assert row["median_agreement"] == pytest.approx(np.median(expected), abs=1e-12)
    by_method = wilcoxon.set_index(["method", "seed"])
    assert by_method.loc[("case", 0), "rejects_h0"]
    assert not by_method.loc[("grad_cam", 0), "rejects_h0"]
    assert (wilcoxon[wilcoxon["method"] == "case"]["rank"] == 1).all()
    assert (wilcoxon[wilcoxon["method"] == "grad_cam"]["rank"] == 3).all()

    summary = seed_summary_table(wilcoxon)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(summary["method"]) == METHODS  # the study's order
    for _, row in summary.iterrows():
        means = np.array([_agreement(per_sample[s], row["method"]).mean() for s in (0, 1, 2)])
        assert row["mean"] == pytest.approx(means.mean(), abs=1e-12)
        assert row["sd"] == pytest.approx(means.std(ddof=1), abs=1e-12)
        assert (row["min"], row["max"]) == pytest.approx((means.min(), means.max()), abs=1e-12)
        assert row["seeds"] == 3
    assert (summary["kendalls_w"] == 1.0).all()  # the centres keep the ranking in every seed
    assert summary.set_index("method").loc["case", "seeds_rejecting_h0"] == 3
    assert summary.set_index("method").loc["case", "modal_rank_share"] == 1.0


def test_agreement_values_needs_one_layer_or_a_choice():
    two_layers = pd.concat([_per_sample(0, layer="features.3"), _per_sample(0, layer="features.2")])
    with pytest.raises(ValueError, match="several layers"):
        agreement_values(two_layers)
    chosen = agreement_values(two_layers, "features.2")
    assert set(chosen["layer"]) == {"features.2"} and len(chosen) == 40 * len(METHODS)
    with pytest.raises(ValueError, match="no values at layer 'layer4'"):
        agreement_values(two_layers, "layer4")


# ------------------------------------------------------------------ aggregation, no processes


def _training_run(root: Path, name: str, seed: int) -> Path:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(f"weights of seed {seed}".encode())
    config = {
        "seed_everything": seed,
        "model": {"class_path": "lightning_modules.ClassifierModule",
                  "init_args": {"backbone": "small_cnn"}},
        "data": {"class_path": "datamodules.ShapesDataModule", "init_args": {"test_size": 7}},
    }  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


class FakeEvaluations:
    """Stands in for ``run_jobs``: writes what ``evaluate.py`` publishes for each job."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __call__(self, jobs, gpus=None, on_finished=None, poll_s=0.5):
        results = []
        for job in jobs:
            command = list(job.command)
            self.commands.append(command)
            checkpoint = Path(_option(command, "--model.checkpoint"))
            seed = int(checkpoint.read_bytes().decode().rsplit(" ", 1)[1])
            run_dir = Path(_option(command, "--output_dir")) / _option(command, "--run_name")
            run_dir.mkdir(parents=True, exist_ok=True)
            _per_sample(seed).to_parquet(run_dir / "per_sample.parquet", index=False)
            pd.DataFrame({"metric": ["feature_agreement"], "wilcoxon_threshold": [0.5]}).to_csv(
                run_dir / "summary.csv", index=False
            )
            (run_dir / "config.yaml").write_text(
                yaml.safe_dump({"model": {"checkpoint": str(checkpoint)},
                                "data": {"class_path": "datamodules.ShapesDataModule"},
                                "evaluation": {"correct_only": True}})
            )  # fmt: skip
            files = {"per_sample.parquet": 1, "summary.csv": 1}
            manifest = json.dumps({"files": files}).encode()
            write_atomically(
                run_dir / "manifest.json", lambda file, text=manifest: file.write(text)
            )
            job.log.write_text("fake evaluation\n")
            result = _jobs.JobResult(job, 0, 0.1, None)
            results.append(result)
            if on_finished is not None:
                on_finished(result)
        return results


def test_aggregation_evaluates_each_seed_once_and_writes_fig4(tmp_path, monkeypatch):
    runs = [_training_run(tmp_path, f"seeds-x-seed{seed}", seed) for seed in (2, 0, 1)]
    fake = FakeEvaluations()
    monkeypatch.setattr(_jobs, "run_jobs", fake)
    output = tmp_path / "aggregate"
    arguments = [
        "--runs", *map(str, runs), "--evaluate_config", str(STUDY), "--output", str(output),
        "--layer", "features.3", "--wandb.mode", "disabled", "--", "--evaluation.sample_size", "9",
    ]  # fmt: skip
    tables = aggregate_seeds.main(arguments)

    assert len(fake.commands) == 3
    for command in fake.commands:
        run = Path(_option(command, "--model.checkpoint")).parent.parent
        assert _option(command, "--run_name") == run.name
        assert _option(command, "--evaluation.layers") == "[features.3]"
        assert _option(command, "--wandb.group") == "seeds-x"
        assert command[-2:] == ["--evaluation.sample_size", "9"]  # extras last: they win
        configs = [command[i + 1] for i, a in enumerate(command) if a == "--config"]
        data = yaml.safe_load(Path(configs[1]).read_text())["data"]
        assert configs[0] == str(STUDY) and data["init_args"] == {"test_size": 7}
        assert is_complete(output / "evaluations" / run.name)

    wilcoxon = pd.read_csv(output / "seed_wilcoxon.csv")
    assert sorted(set(wilcoxon["seed"])) == [0, 1, 2]
    for _, row in wilcoxon.iterrows():
        expected = wilcoxon_below(_agreement(_per_sample(row["seed"]), row["method"]), 0.5)
        assert row["p_value"] == pytest.approx(expected.p_value, rel=1e-12)
    summary = pd.read_csv(output / "seed_summary.csv")
    pd.testing.assert_frame_equal(summary, tables["seed_summary"], check_dtype=False)
    image = imread(output / "seed_agreement.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    markdown = (output / "seed_wilcoxon.md").read_text()
    assert all(f"| {method} |" in markdown for method in METHODS)
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert "".join(table_rows).count("✓") == int(wilcoxon["rejects_h0"].sum())
    assert "small_cnn on Shapes, layer features.3" in markdown
    assert not (output / "wandb").exists()

    # a second aggregation reuses the complete evaluations, also when it logs elsewhere ...
    aggregate_seeds.main(arguments)
    aggregate_seeds.main([*arguments[:-3], "--wandb.project", "elsewhere", *arguments[-3:]])
    assert len(fake.commands) == 3
    # ... unless the checkpoint changed (a retrained seed)
    (runs[0] / "checkpoints" / "last.ckpt").write_bytes(b"weights of seed 2")
    aggregate_seeds.main(arguments)
    assert len(fake.commands) == 4 and _option(fake.commands[-1], "--run_name") == runs[0].name


def test_aggregation_logs_an_offline_wandb_run(tmp_path, monkeypatch):
    runs = [_training_run(tmp_path, f"seeds-y-seed{seed}", seed) for seed in (0, 1)]
    monkeypatch.setattr(_jobs, "run_jobs", FakeEvaluations())
    monkeypatch.setenv("WANDB_MODE", "offline")
    output = tmp_path / "aggregate"
    aggregate_seeds.main(
        ["--runs", *map(str, runs), "--evaluate_config", str(STUDY), "--output", str(output)]
    )
    (offline,) = (output / "wandb").glob("offline-run-*")
    assert len(list(offline.glob("run-*.wandb"))) == 1
    media = offline / "files" / "media"
    assert len(list((media / "images" / "aggregate").glob("seed_agreement_*.png"))) == 1
    (summary,) = (media / "table" / "aggregate").glob("seed_summary_*.table.json")
    logged = json.loads(summary.read_text())
    assert [row[0] for row in logged["data"]] == METHODS and logged["columns"][0] == "method"


def test_aggregation_refuses_repeated_seeds_and_missing_checkpoints(tmp_path, capsys):
    first = _training_run(tmp_path, "a-seed0", 0)
    again = _training_run(tmp_path, "b-seed0", 0)
    base = ["--evaluate_config", str(STUDY), "--wandb.mode", "disabled"]
    with pytest.raises(SystemExit):
        aggregate_seeds.main(["--runs", str(first), str(again), *base])
    assert "repeated seeds [0, 0]" in capsys.readouterr().err
    (first / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(SystemExit, match="has no last checkpoint"):
        aggregate_seeds.main(["--runs", str(first), *base])


# ------------------------------------------------------------------------ sweep, no processes


class FakeTraining:
    """Stands in for ``run_jobs``: records the commands and writes a checkpoint per run."""

    def __init__(self, fail_seed: int | None = None) -> None:
        self.commands: list[list[str]] = []
        self.fail_seed = fail_seed

    def __call__(self, jobs, gpus=None, on_finished=None, poll_s=0.5):
        results = []
        for job in jobs:
            command = list(job.command)
            self.commands.append(command)
            run_dir = Path(_option(command, "--output_dir")) / _option(command, "--run_name")
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"w")
            job.log.write_text("fake training\n")
            if int(_option(command, "--seed")) == self.fail_seed:
                raise _jobs.JobsFailed([_jobs.JobResult(job, 1, 0.1, None)])
            result = _jobs.JobResult(job, 0, 0.1, None)
            results.append(result)
            on_finished(result)
        return results


def test_sweep_passes_each_seed_and_skips_trained_ones(tmp_path, monkeypatch):
    fake = FakeTraining()
    monkeypatch.setattr(seed_sweep, "run_jobs", fake)
    runs = seed_sweep.main(
        ["--config", str(TWIN), "--seeds", "3", "7", "--name", "s", "--output_dir",
         str(tmp_path), "--", "--trainer.max_epochs", "1"]
    )  # fmt: skip
    assert [r.status for r in runs] == ["trained", "trained"]
    for seed, command in zip((3, 7), fake.commands, strict=True):
        assert command[1] == str(REPO / "train.py") and command[0] == sys.executable
        assert _option(command, "--seed") == str(seed)
        assert _option(command, "--run_name") == f"s-seed{seed}"
        assert _option(command, "--config") == str(TWIN)
        assert command[-2:] == ["--trainer.max_epochs", "1"]
        done = json.loads((tmp_path / f"s-seed{seed}" / "seed_sweep.json").read_text())
        assert done["seed"] == seed
    # trained seeds are skipped; an unfinished one (log, no seed_sweep.json) is trained again
    (tmp_path / "s-seed7" / "seed_sweep.json").unlink()
    (tmp_path / "s-seed7" / "stale.txt").write_text("from the interrupted run")
    runs = seed_sweep.main(
        ["--config", str(TWIN), "--seeds", "3", "7", "--name", "s", "--output_dir", str(tmp_path)]
    )
    assert [r.status for r in runs] == ["skipped", "trained"] and len(fake.commands) == 3
    assert not (tmp_path / "s-seed7" / "stale.txt").exists()
    runs = seed_sweep.main(
        ["--config", str(TWIN), "--seeds", "3", "--name", "s", "--output_dir", str(tmp_path),
         "--force"]
    )  # fmt: skip
    assert runs[0].status == "trained" and len(fake.commands) == 4


def test_sweep_failure_names_the_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(seed_sweep, "run_jobs", FakeTraining(fail_seed=1))
    with pytest.raises(SystemExit, match=r"training failed for seed\(s\) 1") as error:
        seed_sweep.main(
            ["--config", str(TWIN), "--seeds", "0", "1", "--name", "f", "--output_dir",
             str(tmp_path)]
        )  # fmt: skip
    assert str(tmp_path / "f-seed1" / "seed_sweep.log") in str(error.value)
    assert "fake training" in str(error.value)  # the log's tail


def test_jobs_stop_after_a_failure_and_report_the_log(tmp_path):
    ok = _jobs.Job("ok", [sys.executable, "-c", "print('fine')"], tmp_path / "ok.log")
    bad = _jobs.Job(
        "bad", [sys.executable, "-c", "import sys; print('broken'); sys.exit(3)"],
        tmp_path / "bad.log",
    )  # fmt: skip
    never = _jobs.Job("never", [sys.executable, "-c", "print('x')"], tmp_path / "never.log")
    with pytest.raises(_jobs.JobsFailed) as error:
        _jobs.run_jobs([ok, bad, never], poll_s=0.05)
    assert "bad failed with exit status 3" in str(error.value) and "broken" in str(error.value)
    assert (tmp_path / "ok.log").read_text().strip() == "fine"
    assert not (tmp_path / "never.log").exists()
    # one job per "GPU" at a time, each seeing only its own device
    show = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
    jobs = [
        _jobs.Job(f"j{i}", [sys.executable, "-c", show], tmp_path / f"j{i}.log") for i in range(3)
    ]
    results = _jobs.run_jobs(jobs, gpus=["4", "5"], poll_s=0.05)
    assert len(results) == 3
    for result in results:
        assert result.job.log.read_text().strip() == result.gpu


# --------------------------------------------------------------------------- W&B sweep config


def test_wandb_sweep_command_is_a_valid_train_invocation(capsys):
    """The agent's command (``${args}`` = ``--seed=N``, as wandb builds it) parses in train.py."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    import train

    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["method"] == "grid" and sweep["program"] == "train.py"
    assert sweep["parameters"]["seed"]["values"] == [0, 1, 2, 3, 4]
    seed_arguments = create_sweep_command_args({"args": {"seed": {"value": 3}}})["args"]
    assert seed_arguments == ["--seed=3"]
    command = sweep["command"]
    assert command[:3] == ["${env}", "${interpreter}", "${program}"] and command[-1] == "${args}"
    arguments = [*command[3:-1], *seed_arguments]
    config = REPO / _option(arguments, "--config")
    assert config.is_file(), shlex.join(arguments)
    with pytest.raises(SystemExit):
        train.main([*arguments, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed_everything"] == 3 and printed["wandb"]["mode"] == "online"
    assert printed["model"]["init_args"]["backbone"] == "small_cnn"


# ------------------------------------------------------------------------------- end to end


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_sweep_and_aggregation_end_to_end(tmp_path, capsys):
    """Two seeds of the twin on tiny data through train.py and evaluate.py processes."""
    tiny = [*TINY_DATA, "--trainer.max_epochs", "1", "--wandb.mode", "disabled",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip
    sweep_arguments = ["--config", str(TWIN), "--seeds", "0", "1", "--name", "e2e",
                       "--output_dir", str(tmp_path)]  # fmt: skip
    runs = seed_sweep.main([*sweep_arguments, "--", *tiny])
    assert [r.status for r in runs] == ["trained", "trained"]
    for seed in (0, 1):
        config = yaml.safe_load((tmp_path / f"e2e-seed{seed}" / "config.yaml").read_text())
        assert config["seed_everything"] == seed
    zero, one = _weights(tmp_path / "e2e-seed0"), _weights(tmp_path / "e2e-seed1")
    assert not all(torch.equal(zero[k], one[k]) for k in zero if k.endswith("weight"))
    assert [r.status for r in seed_sweep.main([*sweep_arguments, "--", *tiny])] == ["skipped"] * 2

    output = tmp_path / "e2e-aggregate"
    arguments = [
        "--runs", str(tmp_path / "e2e-seed0"), str(tmp_path / "e2e-seed1"),
        "--evaluate_config", str(STUDY), "--wandb.mode", "disabled",
        "--", "--evaluation.correct_only", "false", "--evaluation.gallery_size", "0",
    ]  # fmt: skip
    tables = aggregate_seeds.main(arguments)
    wilcoxon = tables["seed_wilcoxon"]
    assert sorted(set(wilcoxon["seed"])) == [0, 1] and len(wilcoxon) == 2 * 6
    assert (wilcoxon["n"] == 7).all()  # the tiny test split, every sample explained
    for seed in (0, 1):
        per_sample = pd.read_parquet(
            output / "evaluations" / f"e2e-seed{seed}" / "per_sample.parquet"
        )
        for _, row in wilcoxon[wilcoxon["seed"] == seed].iterrows():
            values = _agreement(per_sample, row["method"])
            assert row["p_value"] == wilcoxon_below(values, 0.5).p_value
    for name in ("seed_agreement.png", "seed_wilcoxon.csv", "seed_wilcoxon.md", "seed_summary.csv"):
        assert (output / name).is_file(), name
    capsys.readouterr()
    aggregate_seeds.main(arguments)  # complete evaluations are reused
    assert capsys.readouterr().out.count("is complete: reused") == 2
