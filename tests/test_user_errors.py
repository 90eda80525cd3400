"""A user's mistake ends the program with one ``error:`` line and exit status 2, never a
traceback: corrupt, empty and foreign checkpoints, a missing dataset root, an unreadable
image (raised in a data-loading worker), a training run that writes no checkpoint, a
``--data`` file of the wrong kind. A failed evaluation leaves no staging directory, and those
of killed runs are swept at the next start.

The cases run in this process through :func:`lightning_modules.cli.run_cli` (the code path
of ``python evaluate.py``); one (slow) runs as a real subprocess to show the command line itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import train
from callbacks.run_outputs import OWNER, StagedResults
from lightning_modules.cli import run_cli
from tests.conftest import TINY_DATA, tiny_train_args
from tests.fabricated_data import make_image_folder

REPO = Path(__file__).resolve().parent.parent
QUIET = ["--wandb.mode", "disabled", "--trainer.enable_progress_bar", "false"]


def _fails_with(module, args: list[str], monkeypatch, capsys) -> str:
    """Run ``module`` as ``python <module>.py *args``; its one ``error:`` line (exit 2)."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *args])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    return errors[0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty (0 bytes)"),
        (b"\x80\x02garbage" * 50, "not a readable PyTorch file"),
        ("state_dict", "not a train.py checkpoint (it holds a dict with keys weight)"),
        ("module", "holds pickled Python objects"),
    ],
    ids=["empty", "corrupt", "bare-state-dict", "pickled-module"],
)
def test_unusable_checkpoints_name_the_file_and_what_was_expected(
    content, expected, tmp_path, monkeypatch, capsys
):
    path = tmp_path / "model.ckpt"
    if content == "state_dict":
        torch.save({"weight": torch.zeros(2)}, path)
    elif content == "module":
        torch.save(torch.nn.Linear(2, 2), path)
    else:
        path.write_bytes(content)
    message = _fails_with(
        evaluate, ["--model.checkpoint", str(path), "--output_dir", str(tmp_path), *QUIET],
        monkeypatch, capsys,
    )  # fmt: skip
    assert str(path) in message and expected in message
    assert "train.py checkpoint" in message
    assert "weights_only" not in message  # never the unsafe advice


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """A two-class ImageFolder whose fourth test image is not an image."""
    root = make_image_folder(tmp_path_factory.mktemp("folder"), size=32)
    (root / "test" / "dog" / "001.jpg").write_bytes(b"this is not a JPEG")
    return root


def _folder_evaluation(root, tmp_path) -> list[str]:
    return [
        "--data", "configs/data/image_folder.yaml", "--data.root", str(root),
        "--data.transform", "{image_size: 32, resize_size: null}",
        "--data.batch_size", "4",
        "--data.num_workers", "1", "--model.model_name", "small_cnn",
        "--model.num_classes", "2", "--output_dir", str(tmp_path), "--run_name", "broken",
        *QUIET,
    ]  # fmt: skip


def test_dataset_errors_are_one_line_and_the_staging_folder_goes(
    user_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO)
    arguments = _folder_evaluation(user_folder, tmp_path)
    message = _fails_with(evaluate, arguments, monkeypatch, capsys)
    # raised in the data-loading worker: the message without the worker's traceback
    assert message.startswith("error: image file ") and "001.jpg" in message
    assert "cannot be read as an image" in message
    assert (tmp_path / "broken").is_dir() and not list((tmp_path / "broken").glob(".staging-*"))
    assert not (tmp_path / "broken" / "manifest.json").exists()

    missing = [*arguments, "--data.root", str(tmp_path / "nowhere")]
    message = _fails_with(evaluate, missing, monkeypatch, capsys)
    assert str(tmp_path / "nowhere") in message and "expected" in message


def test_an_evaluation_that_explains_nothing_says_why(trained_run, tmp_path, monkeypatch, capsys):
    """``correct_only`` with a model that classifies no sample correctly (an untrained model;
    here every prediction is counted wrong) ends with the reason and the flag to change, not
    with an error of the report's table."""
    import callbacks.evaluation.engine as evaluation_engine

    def nothing_correct(logits, batch):
        return torch.zeros(len(logits), dtype=torch.bool, device=logits.device)

    monkeypatch.setattr(evaluation_engine, "correct_rows", nothing_correct)
    monkeypatch.chdir(REPO)
    arguments = [
        "--model.checkpoint", str(trained_run / "checkpoints" / "last.ckpt"), *TINY_DATA,
        "--evaluation.correct_only", "true", "--evaluation.methods", "[grad_cam]",
        "--evaluation.metrics", "[deletion_auc]", "--evaluation.gallery_size", "0",
        "--output_dir", str(tmp_path), "--run_name", "nothing", *QUIET,
    ]  # fmt: skip
    message = _fails_with(evaluate, arguments, monkeypatch, capsys)
    assert "none of the 7 evaluated test samples correctly" in message
    assert "--evaluation.correct_only false" in message
    assert not list((tmp_path / "nothing").glob(".staging-*"))


def test_a_run_that_writes_no_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    arguments = tiny_train_args(tmp_path, "untrained", 0, "--trainer.max_epochs", "0")
    message = _fails_with(train, arguments, monkeypatch, capsys)
    assert "wrote no checkpoint" in message and "max_epochs=0" in message
    assert str(tmp_path / "untrained" / "checkpoints") in message


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("configs/model/small_cnn_sgd.yaml", "the keys model"),
        ("configs/train.yaml", "a config of several groups goes to --config"),
    ],
)
def test_a_data_file_of_the_wrong_kind_names_the_file(config, expected, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    message = _fails_with(train, ["--data", config, "--print_config"], monkeypatch, capsys)
    assert f"--data {config}" in message and expected in message


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("resize_size", "10", "transform.resize_size 10 is smaller than the crop"),
        ("interpolation", "cubic", "unknown transform.interpolation 'cubic'; choose one of"),
        ("image_size", "0", "transform.image_size must be positive, got 0"),
        ("from_model", "null", "transform.from_model 'None' is not a model name"),
    ],
)
def test_a_bad_transform_value_is_one_line(flag, value, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    arguments = [
        "--data", "configs/data/image_folder.yaml", f"--data.transform.{flag}", value,
        "--output_dir", str(tmp_path), *QUIET,
    ]  # fmt: skip
    message = _fails_with(train, arguments, monkeypatch, capsys)
    assert expected in message


def test_a_class_path_that_is_not_a_datamodule_names_the_file(tmp_path, monkeypatch, capsys):
    model_file = tmp_path / "model.yaml"
    model_file.write_text("class_path: lightning_modules.ClassifierModule\ninit_args: {}\n")
    message = _fails_with(
        evaluate, ["--data", str(model_file), "--print_config"], monkeypatch, capsys
    )
    assert str(model_file) in message and "is not a LightningDataModule" in message


def test_stale_staging_folders_of_killed_runs_are_swept_at_the_next_start(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(finished.stdout)
    owners = {
        "killed": {"host": os.uname().nodename, "pid": dead_pid},
        "running": {"host": os.uname().nodename, "pid": os.getpid()},
        "elsewhere": {"host": "another-host", "pid": dead_pid},
    }
    for run, owner in owners.items():
        staging = tmp_path / f"eval-{run}" / ".staging-0123"
        staging.mkdir(parents=True)
        (staging / OWNER).write_text(json.dumps(owner))
        (staging / "summary.csv").write_text("partial")
    staged = StagedResults(tmp_path / "eval-new")
    assert not (tmp_path / "eval-killed" / ".staging-0123").exists()
    assert (tmp_path / "eval-running" / ".staging-0123").is_dir()
    assert (tmp_path / "eval-elsewhere" / ".staging-0123").is_dir()
    assert json.loads((staged.path / OWNER).read_text())["pid"] == os.getpid()
    staged.discard()
    assert not staged.path.exists()


@pytest.mark.slow  # a cold start of evaluate.py (15-60 s); run_cli is covered above in-process
def test_the_command_line_exits_2_without_a_traceback(tmp_path):
    corrupt = tmp_path / "last.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CONTRASTIVE")}
    completed = subprocess.run(
        [sys.executable, "evaluate.py", "--model.checkpoint", str(corrupt),
         "--output_dir", str(tmp_path), *QUIET],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr[-2000:]
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {corrupt}: ") and "Traceback" not in completed.stderr
