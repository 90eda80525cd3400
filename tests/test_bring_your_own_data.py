"""A researcher's own data, as the README's "Bring your own data" section shows it (slow).

A fabricated class-folder dataset of JPEGs goes through ``train.py`` (a timm backbone, two
epochs) and ``evaluate.py`` with a study config and ``--data configs/data/image_folder.yaml``
to ``report.md`` and ``manifest.json``; a study that needs masks the folder lacks fails
naming every such metric and the ``--evaluation.metrics`` value that runs, and that value
runs. A timm model by name is evaluated on the folder and on a fabricated CUB copy.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import evaluate
import train
from lightning_modules.cli import run_cli
from tests.fabricated_data import make_image_folder
from tests.test_datamodules_cub_cars import make_cub

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
QUIET = [
    "--wandb.mode", "disabled", "--trainer.enable_progress_bar", "false",
    "--trainer.accelerator", "cpu", "--data.num_workers", "0",
]  # fmt: skip
FOLDER = ["--data", "configs/data/image_folder.yaml", "--data.transform.image_size", "64"]


def test_own_image_folder_trains_evaluates_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    # four classes: the studies' contrast methods compare each class with k = 3 others
    root = make_image_folder(tmp_path / "my_dataset", ("cat", "dog", "fox", "owl"), size=64)
    data = [*FOLDER, "--data.root", str(root), "--data.batch_size", "8"]
    metrics = train.main([
        *data, "--model.backbone", "timm:resnet18", "--trainer.max_epochs", "2",
        "--output_dir", str(tmp_path / "outputs"), "--run_name", "my-resnet18", *QUIET,
    ])  # fmt: skip
    run = tmp_path / "outputs" / "my-resnet18"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (
        run / "confusion_matrix.npy"
    ).is_file()
    assert 0.0 <= metrics["val/acc_top1"] <= 1.0

    checkpoint = ["--model.checkpoint", str(run / "checkpoints" / "last.ckpt")]
    outputs = ["--output_dir", str(tmp_path / "outputs")]
    evaluation = evaluate.main([
        "--config", "configs/evaluate/fidelity.yaml", *data, *checkpoint, *outputs,
        "--run_name", "my-fidelity", *QUIET,
    ])  # fmt: skip
    result = tmp_path / "outputs" / "my-fidelity"
    manifest = json.loads((result / "manifest.json").read_text())
    assert manifest["complete"] and "report.md" in manifest["files"]
    assert "Fidelity (CASE RQ2)" in (result / "report.md").read_text()
    assert set(evaluation.summary["metric"]) >= {"confidence_drop", "deletion_auc"}
    # correctly classified test images only (CASE RQ2), of the folder's 16
    assert (evaluation.summary["n"] >= 1).all() and (evaluation.summary["n"] <= 16).all()

    study = ["--config", "configs/evaluate/class_sensitivity.yaml", *data, *checkpoint, *outputs]
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *study, "--run_name", "my-rq1", *QUIET])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate.main)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "metric 'mark_energy' needs ['part_mask']" in message
    assert "metric 'object_energy' needs ['mask']" in message
    assert "method 'oracle_part' needs ['part_mask']" in message
    assert "method 'oracle_object' needs ['mask']" in message
    metrics = re.search(r"--evaluation\.metrics '([^']*)'", message).group(1)
    methods = re.search(r"--evaluation\.methods '([^']*)'", message).group(1)
    assert metrics == "[feature_agreement, random_logit]"
    assert "oracle" not in methods and "edge" in methods and "case" in methods
    evaluation = evaluate.main([
        *study, "--evaluation.metrics", metrics, "--evaluation.methods", methods,
        "--run_name", "my-rq1", *QUIET,
    ])  # fmt: skip
    assert set(evaluation.summary["metric"]) == {"feature_agreement", "random_logit"}
    assert "oracle_part" not in set(evaluation.summary["method"])
    assert (tmp_path / "outputs" / "my-rq1" / "manifest.json").is_file()


@pytest.mark.parametrize("dataset", ["image_folder", "cub"])
def test_a_timm_model_by_name_on_a_users_dataset(dataset, tmp_path, monkeypatch):
    """The README's command: evaluate.py --data configs/data/<dataset>.yaml --data.root ...
    --model.model_name timm:resnet18 --model.num_classes N --data.transform.image_size 64."""
    monkeypatch.chdir(REPO)
    if dataset == "cub":
        root, classes = tmp_path, 3
        make_cub(root)  # three bird species, two test images each
    else:
        root, classes = make_image_folder(tmp_path / "folder"), 2
    evaluate.main([
        "--data", f"configs/data/{dataset}.yaml", "--data.root", str(root),
        "--model.model_name", "timm:resnet18", "--model.num_classes", str(classes),
        "--data.transform.image_size", "64", "--output_dir", str(tmp_path / "outputs"),
        "--run_name", dataset, *QUIET,
    ])  # fmt: skip
    assert (tmp_path / "outputs" / dataset / "manifest.json").is_file()
