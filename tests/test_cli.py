"""train.py and evaluate.py end to end on tiny runs: seeds, outputs, DDP, bad input."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
import train
from callbacks.evaluation import CONTRASTS_FROM_MATRIX
from datamodules import ShapesDataModule
from datamodules.train_holdout import per_class_sample
from lightning_modules.cli import run_cli
from tests.conftest import TINY_DATA, TINY_SIZES, tiny_train_args

REPO = Path(__file__).resolve().parent.parent
_RUN_NUMBERS = itertools.count()


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def test_seed_is_honoured(trained_run, tmp_path):
    train.main(tiny_train_args(tmp_path, "same", 5))
    train.main(tiny_train_args(tmp_path, "other", 6))
    first, same, other = (
        _weights(trained_run),
        _weights(tmp_path / "same"),
        _weights(tmp_path / "other"),
    )
    assert first.keys() == same.keys()
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if k.endswith("weight"))
    metrics = [pd.read_csv(d / "metrics.csv") for d in (trained_run, tmp_path / "same")]
    pd.testing.assert_frame_equal(*metrics)


def test_training_run_directory_holds_everything(trained_run):
    for name in ("config.yaml", "metrics.csv", "confusion_matrix.npy", "confusion_matrix.csv"):
        assert (trained_run / name).is_file(), name
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    matrix = np.load(trained_run / "confusion_matrix.npy")
    assert matrix.shape == (10, 10) and matrix.sum() == 30  # every validation sample once
    provenance = json.loads((trained_run / "confusion_matrix.json").read_text())
    assert provenance["source"] == ShapesDataModule().split_source("val")
    assert (provenance["split"], provenance["samples"]) == ("val", 30)
    assert "seed_everything: 5" in (trained_run / "config.yaml").read_text()


def _evaluate_args(run_dir: Path, output_dir: Path, run_name: str) -> list[str]:
    return [
        "--model.checkpoint", str(run_dir / "checkpoints" / "last.ckpt"),
        "--output_dir", str(output_dir),
        "--run_name", run_name,
        "--wandb.mode", "disabled",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--data.batch_size", "2",
        "--data.num_workers", "0",
        *TINY_SIZES,  # the test split has 7 samples: uneven over 2 processes
    ]  # fmt: skip


# methods × layers × targets × metrics, with a contrast selector and a layer-free method
WIDE = [
    "--evaluation.methods",
    "[grad_cam, {name: case, kwargs: {contrast: {selector: confusion, k: 1}}}, input_x_gradient]",
    "--evaluation.layers", "[features.3, features.2]",
    "--evaluation.targets", "[top1_vs_top2, top1]",
    "--evaluation.metrics",
    "[feature_agreement, deletion_auc, confidence_drop, "
    "{name: energy_pointing_game, label: mark_energy, kwargs: {mask_key: part_mask}}]",
    "--evaluation.gallery_size", "3",
    "--evaluation.confusion_matrix", "holdout", "--evaluation.confusion_holdout_per_class", "3",
]  # fmt: skip
# feature_agreement, deletion_auc and confidence_drop rank the ReLU'd maps, whose zeros tie:
# their ties are broken by the sample index, so DDP's other batches must not change them.


def test_ddp_evaluation_equals_single_device_each_sample_once(trained_run, tmp_path):
    evaluation = evaluate.main(
        [*_evaluate_args(trained_run, tmp_path, "one"), *WIDE, "--trainer.devices", "1"]
    )
    # CASE's matrix from a seeded 3-per-class hold-out of the train split (30 of its 96)
    summary = evaluation.summary.set_index(["method", "layer", "metric"])
    agreement = summary.loc[("grad_cam", "features.3", "feature_agreement")]
    assert np.isfinite(agreement[["mean", "wilcoxon_p"]].astype(float)).all()
    assert np.isfinite(summary.loc[("case", "features.2", "deletion_auc"), "mean"])

    ddp = _evaluate_args(trained_run, tmp_path, "two") + WIDE
    ddp += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CONTRASTIVE_SALIENCY")}
    completed = subprocess.run(
        [sys.executable, "evaluate.py", *ddp], cwd=REPO, env=environment,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]

    keys = ["method", "layer", "target_policy", "metric", "index"]
    single = pd.read_parquet(tmp_path / "one" / "per_sample.parquet").sort_values(keys)
    double = pd.read_parquet(tmp_path / "two" / "per_sample.parquet").sort_values(keys)
    assert len(single) == 5 * 4 * 7  # (method, layer) pairs × values × samples
    for frame in (single, double):
        counts = frame.groupby(keys[:-1])["index"].agg(list)
        assert all(sorted(indices) == list(range(7)) for indices in counts), counts
    assert (double[keys].to_numpy() == single[keys].to_numpy()).all()
    np.testing.assert_allclose(double["value"].to_numpy(), single["value"].to_numpy(), atol=1e-6)
    assert (double["top1"].to_numpy() == single["top1"].to_numpy()).all()
    column = CONTRASTS_FROM_MATRIX
    assert double[column].equals(single[column]) and single[column].notna().sum() == 2 * 4 * 7
    # the hold-out matrix: train samples only, 3 per class, each once, the same under DDP
    matrices = [np.load(tmp_path / run / "confusion_matrix.npy") for run in ("one", "two")]
    np.testing.assert_array_equal(*matrices)
    assert matrices[0].sum() == 30 and (matrices[0].sum(axis=1) == 3).all()
    provenance = [
        json.loads((tmp_path / r / "confusion_matrix.json").read_text()) for r in ("one", "two")
    ]
    assert provenance[0] == provenance[1]
    chosen = per_class_sample([i % 10 for i in range(96)], 3, 0)
    digest = hashlib.sha256(np.asarray(chosen, dtype=np.int64).tobytes()).hexdigest()
    assert provenance[0]["source"] == ShapesDataModule().split_source("train")
    assert (provenance[0]["samples"], provenance[0]["indices_sha256"]) == (30, digest)
    # the same comparisons on the same samples (t statistics of near-identical methods, whose
    # differences are ~1e-6, are not compared: float noise of that size moves them)
    stats = [pd.read_csv(tmp_path / run / "stats.csv") for run in ("one", "two")]
    columns = ["layer", "target_policy", "metric", "method", "reference", "n"]
    pd.testing.assert_frame_equal(stats[0][columns], stats[1][columns])
    np.testing.assert_allclose(stats[0]["mean"], stats[1]["mean"], atol=1e-6)
    # the gallery samples seen by the other process reach rank 0's gallery
    gallery = sorted(p.name for p in (tmp_path / "two" / "gallery").glob("gallery__sample-*"))
    assert gallery == [f"gallery__sample-{i:06d}.png" for i in range(3)]
    assert (tmp_path / "two" / "manifest.json").is_file()


def _cli_error(module, args, monkeypatch, capsys) -> str:
    run_name = f"bad-{next(_RUN_NUMBERS)}"  # each case its own run directory
    monkeypatch.setattr(sys, "argv", [module.__file__, *args, "--run_name", run_name])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main)
    assert exit_info.value.code not in (0, None)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_bad_input_gives_one_line_and_nonzero_exit(trained_run, tmp_path, monkeypatch, capsys):
    base = ["--output_dir", str(tmp_path), "--wandb.mode", "disabled"]
    checkpoint = str(trained_run / "checkpoints" / "last.ckpt")

    message = _cli_error(
        evaluate, [*base, "--model.checkpoint", "missing.ckpt"], monkeypatch, capsys
    )
    assert "checkpoint not found: missing.ckpt" in message and "train.py" in message

    empty = ["--model.outputs_dir", str(tmp_path / "empty")]
    message = _cli_error(evaluate, [*base, *empty], monkeypatch, capsys)
    assert "no checkpoint found" in message and "train.py" in message

    message = _cli_error(
        train, [*base, "--model.backbone", "torchvision:resnet1800"], monkeypatch, capsys
    )
    assert "unknown torchvision model 'resnet1800'" in message and "resnet18" in message

    evaluate_base = [*base, "--model.checkpoint", checkpoint, *TINY_DATA]
    message = _cli_error(
        evaluate, [*evaluate_base, "--evaluation.layers", "[features.9]"], monkeypatch, capsys
    )
    assert "'features.9'" in message and "features.3" in message

    message = _cli_error(
        evaluate, [*evaluate_base, "--evaluation.methods", "[grad_cams]"], monkeypatch, capsys
    )
    assert "unknown saliency method 'grad_cams'" in message and "grad_cam" in message

    message = _cli_error(
        evaluate, [*evaluate_base, "--model.num_classes", "5"], monkeypatch, capsys
    )
    assert "num_classes=5" in message and "10 classes" in message

    wrong_data = [*evaluate_base, "--data.num_shapes", "2"]
    message = _cli_error(evaluate, wrong_data, monkeypatch, capsys)
    assert "the data has 4 classes" in message
