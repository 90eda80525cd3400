"""evaluate.py at full width: methods × layers × targets × metrics, every output, W&B read
back, bad configs rejected before any computation, atomic results, training-time watching."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import evaluate
import train
from callbacks.evaluation import CONTRASTS_FROM_MATRIX, SaliencyEvaluationCallback
from callbacks.run_outputs import is_complete
from contrastive_saliency.targets import ConfusionContrast
from datamodules import ShapesDataModule
from lightning_modules.cli import run_cli
from tests.conftest import TINY_DATA, TINY_SIZES, tiny_train_args
from tests.test_datamodules_folder_cifar import make_cifar

_RUNS = itertools.count()

WIDE = [
    "--evaluation.methods",
    "[grad_cam, {name: case, kwargs: {contrast: {selector: confusion, k: 1}}}, input_x_gradient]",
    "--evaluation.layers", "[features.3, features.2]",
    "--evaluation.targets", "[top1_vs_top2, top1, ground_truth]",
    "--evaluation.metrics",
    "[feature_agreement, deletion_auc, "
    "{name: energy_pointing_game, label: mark_energy, kwargs: {mask_key: part_mask}}, aupr]",
    "--evaluation.sanity_check", "{samples: 2, max_steps: 2}",
    "--evaluation.gallery_size", "2",
]  # fmt: skip


def _base(trained_run: Path, output_dir: Path, run_name: str, wandb: str = "disabled"):
    return [
        "--model.checkpoint", str(trained_run / "checkpoints" / "last.ckpt"),
        "--output_dir", str(output_dir),
        "--run_name", run_name,
        "--wandb.mode", wandb,
        "--wandb.group", "pipeline-test",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def _args(trained_run: Path, output_dir: Path, run_name: str, wandb: str = "disabled"):
    """The tiny shapes test split (7 samples) in batches of 4."""
    data = ["--data.batch_size", "4", "--data.num_workers", "0", *TINY_SIZES]
    return [*_base(trained_run, output_dir, run_name, wandb), *data]


def _capture_wandb(monkeypatch) -> dict:
    """Read the W&B run back in-process (``run.summary``) just before evaluate.py finishes it."""
    from lightning.pytorch.loggers import WandbLogger

    import lightning_modules.cli as cli

    captured: dict = {}
    finish = cli.finish_wandb

    def capture_then_finish(trainer) -> None:
        run = next(lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger))
        summary = {k: dict(v) if hasattr(v, "keys") else v for k, v in dict(run.summary).items()}
        captured.update(summary=summary, config=dict(run.config), dir=run.dir)
        captured["group"], captured["job_type"] = run.group, run.job_type
        finish(trainer)

    monkeypatch.setattr(cli, "finish_wandb", capture_then_finish)
    return captured


def test_full_width_evaluation_writes_every_output(trained_run, tmp_path, monkeypatch):
    wandb_run = _capture_wandb(monkeypatch)
    # The tiny model confuses every class with some other; clear class 0's row so that CASE's
    # k = 1 contrast of some samples has no matrix entry (both counts below occur).
    trained_run = shutil.copytree(
        trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("wandb")
    )
    matrix_file = trained_run / "confusion_matrix.npy"
    confusions = np.load(matrix_file)
    confusions[0, 1:] = 0
    np.save(matrix_file, confusions)
    evaluation = evaluate.main([*_args(trained_run, tmp_path, "wide", "offline"), *WIDE])
    run_dir = tmp_path / "wide"
    assert is_complete(run_dir)
    frame = pd.read_parquet(run_dir / "per_sample.parquet")
    assert {"method", "layer", "target_policy", "metric", "index", "value"} <= set(frame.columns)
    groups = frame.groupby(["method", "layer", "target_policy", "metric"])["index"]
    assert all(sorted(v) == list(range(7)) for v in groups.agg(list)), "each sample once"
    combos = set(groups.groups)
    # gradient CAMs at both layers, input_x_gradient once, under layer "input"
    assert {layer for m, layer, *_ in combos if m == "input_x_gradient"} == {"input"}
    assert {layer for m, layer, *_ in combos if m == "case"} == {"features.3", "features.2"}
    # each metric only on the policies of its kind; aupr gives two values
    agreement = {p for *_, p, metric in combos if metric == "feature_agreement"}
    assert agreement == {"top1_vs_top2"}
    assert {p for *_, p, metric in combos if metric == "aupr1"} == {"top1", "ground_truth"}
    # 5 (method, layer) pairs × (1 pair value + 2 single policies × 4 values)
    assert len(combos) == 5 * (1 + 2 * 4)
    # how many of CASE's k = 1 contrasts the matrix gave, per sample (fewest over a policy's
    # explained classes); NA for methods without a confusion selector
    is_case = frame["method"] == "case"
    counts = frame[CONTRASTS_FROM_MATRIX]
    assert counts[~is_case].isna().all() and counts[is_case].notna().all()
    matrix = ConfusionContrast(trained_run / "confusion_matrix.npy", k=1)
    explained = {"top1": ["top1"], "top1_vs_top2": ["top1", "top2"], "ground_truth": ["label"]}
    case_rows = frame[is_case]
    expected = [
        min(int(matrix.contrasts_from_matrix(torch.tensor([row[c]]))) for c in explained[policy])
        for policy, (_, row) in zip(case_rows["target_policy"], case_rows.iterrows(), strict=True)
    ]
    assert counts[is_case].tolist() == expected and len(set(expected)) == 2, expected

    summary = pd.read_csv(run_dir / "summary.csv")
    assert len(summary) == len(combos)
    assert summary.loc[summary.metric == "feature_agreement", "wilcoxon_p"].notna().all()
    stats = pd.read_csv(run_dir / "stats.csv")
    assert set(stats["reference"]) == {"grad_cam"}
    assert set(stats["method"]) == {"case", "input_x_gradient"}
    assert stats["t_p_holm"].ge(stats["t_p_value"] - 1e-12).all()
    # The default direction, stated in words per row and in the report.
    row = stats[(stats.method == "case") & (stats.metric == "deletion_auc")].iloc[0]
    assert row["hypothesis"] == (
        "H1: mean(case − grad_cam) ≠ 0 (case's mean deletion_auc is different from grad_cam's; "
        "two-sided)"
    )
    sanity = pd.read_csv(run_dir / "sanity_checks.csv")
    assert sanity.groupby(["method", "layer"])["step_index"].max().eq(2).all()

    pngs = sorted((run_dir / "plots").glob("*.png")) + sorted((run_dir / "gallery").glob("*.png"))
    names = {p.name for p in pngs}
    assert any(n.startswith("agreement") for n in names)
    assert any(n.startswith("deletion") for n in names)
    assert any(n.startswith("sanity") for n in names)
    assert len(list((run_dir / "gallery").glob("*.png"))) >= 2
    for png in pngs:
        with Image.open(png) as image:
            assert image.size[0] > 200 and image.size[1] > 100
    report = (run_dir / "report.md").read_text()
    links = [line.split("](")[1].split(")")[0] for line in report.splitlines() if "](" in line]
    assert links and all((run_dir / link).is_file() for link in links)
    assert "case" in report and "input_x_gradient" in report
    assert "all k=1 contrasts came from the confusion matrix" in report
    assert "test_alternative two_sided: H1: mean(method − grad_cam) ≠ 0" in report
    assert not list(run_dir.glob(".staging-*"))

    summary_keys = wandb_run["summary"]
    unique_key = "eval/input_x_gradient/input/top1/deletion_auc"
    expected = summary.query(
        "method == 'input_x_gradient' and metric == 'deletion_auc' and target_policy == 'top1'"
    )["mean"]
    assert summary_keys[unique_key] == pytest.approx(expected.item(), rel=1e-6)
    for table in ("eval/summary_table", "eval/per_sample_table", "eval/stats_table"):
        assert summary_keys[table]["_type"] == "table-file", table
    images = [
        k for k, v in summary_keys.items() if isinstance(v, dict) and v.get("_type") == "image-file"
    ]
    assert any(k.startswith("eval/plots/") for k in images)
    assert any(k.startswith("eval/gallery/") for k in images)
    assert wandb_run["config"]["evaluation"]["reference_method"] == "grad_cam"
    assert (wandb_run["group"], wandb_run["job_type"]) == ("pipeline-test", "evaluate")
    assert list(Path(wandb_run["dir"]).rglob("*.table.json"))
    assert evaluation.published[-1].name == "manifest.json"


def _error(args, monkeypatch, capsys) -> str:
    run_name = f"bad-{next(_RUNS)}"
    monkeypatch.setattr(sys, "argv", [evaluate.__file__, *args, "--run_name", run_name])

    def computed(*_, **__):
        raise AssertionError("a map was computed before the configuration error")

    monkeypatch.setattr(SaliencyEvaluationCallback, "evaluate_batch", computed)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate.main)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_bad_configs_fail_before_any_computation(trained_run, tmp_path, monkeypatch, capsys):
    base = [*_base(trained_run, tmp_path, "unused"), *TINY_DATA]
    message = _error([*base, "--evaluation.metrics", "[deletion_aucc]"], monkeypatch, capsys)
    assert "unknown metric 'deletion_aucc'" in message and "deletion_auc" in message

    message = _error([*base, "--evaluation.layers", "[features.33]"], monkeypatch, capsys)
    assert "'features.33'" in message and "features.3" in message

    message = _error([*base, "--evaluation.methods", "[grad_camm]"], monkeypatch, capsys)
    assert "unknown saliency method 'grad_camm'" in message and "grad_cam" in message

    grid = ["--evaluation.targets", "[grid_cells]", "--evaluation.metrics", "[grid_pointing_game]"]
    message = _error([*base, *grid], monkeypatch, capsys)
    assert "grid_cells" in message and "grid_labels" in message

    pair_only = ["--evaluation.targets", "[top1]", "--evaluation.metrics", "[feature_agreement]"]
    message = _error([*base, *pair_only], monkeypatch, capsys)
    assert "feature_agreement" in message and "top1_vs_top2" in message

    # a metric that needs masks on a dataset without them: the quad grids carry no part masks
    quad = [*_base(trained_run, tmp_path, "unused"), "--config", "configs/data/quad_shapes.yaml",
            "--data.test_samples", "4", "--data.val_samples", "0", "--data.num_workers", "0",
            "--evaluation.targets", "[top1]",
            "--evaluation.metrics", "[{name: energy_pointing_game, kwargs: {mask_key: part_mask}}]"]  # fmt: skip
    message = _error(quad, monkeypatch, capsys)
    assert "part_mask" in message and "grid_labels" in message
    # ... and a method that reads them (a reference map's batch_fields)
    oracle = [*quad[:-2], "--evaluation.metrics", "[deletion_auc]",
              "--evaluation.methods", "[grad_cam, oracle_part]"]  # fmt: skip
    message = _error(oracle, monkeypatch, capsys)
    assert "'oracle_part'" in message and "part_mask" in message and "grid_labels" in message

    # a contrast selector without a confusion matrix: a checkpoint whose run saved none
    lone = tmp_path / "lone" / "checkpoints"
    lone.mkdir(parents=True)
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", lone / "last.ckpt")
    no_matrix = [*base, "--model.checkpoint", str(lone / "last.ckpt"), "--evaluation.methods",
                 "[{name: case, kwargs: {contrast: {selector: confusion, k: 1}}}]"]  # fmt: skip
    message = _error(no_matrix, monkeypatch, capsys)
    assert "confusion matrix" in message and "evaluation.confusion_matrix" in message

    # CASE's matrix from the split it explains: a training run validated on the test data ...
    leaky = tmp_path / "leaky"
    shutil.copytree(trained_run, leaky, ignore=shutil.ignore_patterns("wandb"))
    provenance = json.loads((leaky / "confusion_matrix.json").read_text())
    assert provenance["source"] == ShapesDataModule().split_source("val")
    provenance["source"] = ShapesDataModule().split_source("test")
    (leaky / "confusion_matrix.json").write_text(json.dumps(provenance))
    case = ["--evaluation.methods", "[{name: case, kwargs: {contrast: {selector: confusion}}}]"]
    checkpoint = ["--model.checkpoint", str(leaky / "checkpoints" / "last.ckpt")]
    message = _error([*base, *checkpoint, *case], monkeypatch, capsys)
    explained = ShapesDataModule().split_source("test")  # its repr: the config has quoted strings
    assert repr(explained) in message and "confusion_matrix: holdout" in message
    # ... and `validate` on a datamodule whose val split is its test split (CIFAR-100, val = test)
    cifar = ["--data.class_path", "datamodules.CIFAR100DataModule",
             "--data.init_args.root", str(make_cifar(tmp_path / "cifar")),
             "--data.init_args.val_fraction", "0", "--data.init_args.num_workers", "0",
             "--evaluation.confusion_matrix", "validate"]  # fmt: skip
    message = _error([*_base(trained_run, tmp_path, "unused"), *cifar, *case], monkeypatch, capsys)
    assert "'CIFAR-100/test'" in message and "confusion_matrix: holdout" in message

    message = _error([*base, "--evaluation.autocast", "true"], monkeypatch, capsys)
    assert "CUDA" in message

    message = _error([*base, "--evaluation.test_alternative", "greater"], monkeypatch, capsys)
    assert "'greater'" in message and "method_greater, method_less" in message


def test_class_sensitivity_study_shows_ceiling_chance_and_both_references(trained_run, tmp_path):
    """configs/evaluate/class_sensitivity.yaml as documented, on the tiny run: the reference
    maps reach their closed forms (oracle_part: mark energy 1; oracle_object: the mark's share
    of the object; random: about the mark's share of the image; every class-agnostic map:
    Random Logit 1), stats.csv tests every method against grad_cam AND edge, and the sibling
    share of the shapes datamodule (its sibling_classes) is reported."""
    from datamodules import ShapesDataModule

    def siblings(datamodule):
        return [datamodule.config.siblings(c) for c in range(datamodule.num_classes)]

    study = ["--config", "configs/evaluate/class_sensitivity.yaml", "--evaluation.correct_only",
             "false", "--evaluation.sanity_check", "null", "--evaluation.gallery_size", "1"]  # fmt: skip
    evaluate.main([*_args(trained_run, tmp_path, "study"), *study])
    run_dir = tmp_path / "study"
    frame = pd.read_parquet(run_dir / "per_sample.parquet")
    values = frame.pivot_table("value", ["index"], ["method", "metric"])
    datamodule = ShapesDataModule(train_size=96, val_size=30, test_size=7)  # TINY_SIZES
    test_split = datamodule.dataset("test")
    masks = [(test_split[i]["part_mask"], test_split[i]["mask"]) for i in values.index]
    part_area = np.array([float(part.float().mean()) for part, _ in masks])
    part_of_object = np.array([float((p & o).sum() / o.sum()) for p, o in masks])
    assert (values[("oracle_part", "mark_energy")] == 1.0).all()
    np.testing.assert_allclose(values[("oracle_object", "mark_energy")], part_of_object, rtol=1e-5)
    chance = values[("random", "mark_energy")].mean()
    assert abs(chance - part_area.mean()) < 0.2 * part_area.mean(), (chance, part_area.mean())
    for reference in ("oracle_part", "oracle_object", "random", "edge"):
        assert (values[(reference, "random_logit")] == 1.0).all(), reference
    assert values[("grad_cam", "random_logit")].lt(1.0).any()

    stats = pd.read_csv(run_dir / "stats.csv")
    assert set(stats["reference"]) == {"grad_cam", "edge"}
    against_edge = stats[stats["reference"] == "edge"]
    assert {"case", "finer_cam", "random"} <= set(against_edge["method"])
    assert "grad_cam" not in set(against_edge["method"])  # tested once, against grad_cam
    assert "random_logit" in set(stats["metric"])
    report = (run_dir / "report.md").read_text()
    assert "### Against grad_cam" in report and "### Against edge" in report
    samples = frame.drop_duplicates("index")
    correct = samples[samples["label"] == samples["top1"]]
    sibling_table = siblings(datamodule)
    hits = sum(
        int(top2) in sibling_table[int(label)]
        for label, top2 in zip(correct["label"], correct["top2"], strict=True)
    )
    checks = json.loads((run_dir / "manifest.json").read_text())["dataset_checks"]
    assert (checks["top2_sibling_count"], checks["correct_samples"]) == (hits, len(correct))
    assert "| top-2 = sibling (correctly classified) | " in report


def test_interrupted_evaluation_leaves_nothing_that_looks_complete(
    trained_run, tmp_path, monkeypatch
):
    import callbacks.report as report

    args = [*_args(trained_run, tmp_path, "crash"), "--evaluation.gallery_size", "1"]

    def killed(*_, **__):
        raise RuntimeError("killed while writing the report")

    with monkeypatch.context() as patch:
        patch.setattr(report, "write_report", killed)
        with pytest.raises(RuntimeError, match="killed while writing"):
            evaluate.main(args)
    run_dir = tmp_path / "crash"
    for name in ("per_sample.parquet", "summary.csv", "stats.csv", "report.md", "manifest.json"):
        assert not (run_dir / name).exists(), name
    assert not is_complete(run_dir)

    evaluate.main(args)  # the rerun into the same directory completes and cleans up
    assert is_complete(run_dir)
    assert not list(run_dir.glob(".staging-*"))
    first = pd.read_parquet(run_dir / "per_sample.parquet")
    evaluate.main(args)  # and a second rerun overwrites with identical results
    pd.testing.assert_frame_equal(first, pd.read_parquet(run_dir / "per_sample.parquet"))


def test_callback_watches_explanations_during_training(tmp_path):
    config = tmp_path / "watch.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: callbacks.evaluation.SaliencyEvaluationCallback\n"
        "      init_args:\n"
        "        methods: [grad_cam]\n"
        "        targets: [top1_vs_top2]\n"
        "        metrics: [feature_agreement]\n"
        "        every_n_epochs: 1\n"
        "        validation_batches: 1\n"
    )
    train.main([*tiny_train_args(tmp_path, "watch", 0), "--config", str(config)])
    metrics = pd.read_csv(tmp_path / "watch" / "metrics.csv")
    values = metrics["eval/grad_cam/feature_agreement"].dropna()
    assert len(values) == 1 and 0.0 <= values.item() <= 1.0


def test_training_and_evaluation_name_a_value_alike_in_wandb(tmp_path, monkeypatch):
    """The names the callback logs its means under while a model trains are the evaluation's
    W&B summary names of the same (method, layer, target policy, metric): one rule
    (``wandb_keys``). With two layers and one target policy the two old rules differed:
    input_x_gradient (layer-free: its metric at one layer and policy) was
    ``eval/input_x_gradient/input/top1_vs_top2/feature_agreement`` while training and
    ``eval/input_x_gradient/feature_agreement`` in the evaluation."""
    study = {
        "methods": "[grad_cam, input_x_gradient]",
        "layers": "[features.3, features.2]",
        "targets": "[top1_vs_top2]",
        "metrics": "[feature_agreement]",
    }
    config = tmp_path / "watch.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: callbacks.evaluation.SaliencyEvaluationCallback\n"
        "      init_args:\n"
        + "".join(f"        {name}: {value}\n" for name, value in study.items())
        + "        every_n_epochs: 1\n"
        "        validation_batches: 1\n"
    )
    train.main([*tiny_train_args(tmp_path, "watch", 0), "--config", str(config)])
    metrics = pd.read_csv(tmp_path / "watch" / "metrics.csv")
    trained = {column for column in metrics.columns if column.startswith("eval/")}

    wandb_run = _capture_wandb(monkeypatch)
    options = [arg for name, value in study.items() for arg in (f"--evaluation.{name}", value)]
    evaluate.main([*_args(tmp_path / "watch", tmp_path, "evaluated", "offline"), *options])
    evaluated = {
        key
        for key, value in wandb_run["summary"].items()
        if key.startswith("eval/") and isinstance(value, float) and not key.endswith("_p")
    }
    assert (
        trained
        == evaluated
        == {
            "eval/grad_cam/features.3/top1_vs_top2/feature_agreement",
            "eval/grad_cam/features.2/top1_vs_top2/feature_agreement",
            "eval/input_x_gradient/feature_agreement",
        }
    )


def test_wandb_keys_shorten_a_method_metric_found_at_one_layer_and_policy():
    from callbacks.evaluation.keys import MetricKey
    from callbacks.evaluation.wandb_logging import wandb_keys

    values = [
        MetricKey("cam", "a", "top1", "deletion_auc"),
        MetricKey("cam", "b", "top1", "deletion_auc"),
        MetricKey("cam", "a", "top1_vs_top2", "feature_agreement"),
        MetricKey("grad", "input", "top1", "deletion_auc"),
    ]
    assert list(wandb_keys(values).values()) == [
        "eval/cam/a/top1/deletion_auc",
        "eval/cam/b/top1/deletion_auc",
        "eval/cam/feature_agreement",
        "eval/grad/deletion_auc",
    ]


def test_metric_options_are_checked_by_name_and_value():
    from callbacks.evaluation.spec import parse_metrics
    from contrastive_saliency.errors import ConfigurationError

    (spec,) = parse_metrics([{"name": "relative_drop", "kwargs": {"reference": "runner_up"}}])
    assert spec.kwargs["reference"] == "runner_up"
    with pytest.raises(ConfigurationError, match="nearest_logit, runner_up"):
        parse_metrics([{"name": "relative_drop", "kwargs": {"reference": "nearest"}}])
    with pytest.raises(ConfigurationError, match=r"unknown option.*valid: fill, fraction"):
        parse_metrics([{"name": "confidence_drop", "kwargs": {"fractio": 0.1}}])
    with pytest.raises(ConfigurationError, match="appears twice"):
        parse_metrics(["deletion_auc", "deletion_auc"])
