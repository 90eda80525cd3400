"""Shared fixtures: tiny training runs on the embedded benchmark (no network, CPU only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

TINY_SIZES = ["--data.train_size", "96", "--data.val_size", "30", "--data.test_size", "7"]
TINY_DATA = [*TINY_SIZES, "--data.batch_size", "16", "--data.num_workers", "0"]


def tiny_train_args(output_dir: Path, run_name: str, seed: int, *extra: str) -> list[str]:
    """Arguments of a train.py run that takes seconds: one epoch on 96 images."""
    return [
        "--seed", str(seed),
        "--run_name", run_name,
        "--output_dir", str(output_dir),
        "--wandb.mode", "disabled",
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *TINY_DATA,
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """Run directory of a tiny train.py run (seed 5)."""
    import train

    output_dir = tmp_path_factory.mktemp("outputs")
    train.main(tiny_train_args(output_dir, "tiny-seed5", 5))
    return output_dir / "tiny-seed5"


def pytest_collection_modifyitems(config, items) -> None:
    """Skip tests marked ``gpu`` when CUDA is not available (CI never has a GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny tensors run fastest on one thread, above all on a shared 2-core machine.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def deterministic_algorithms_off():
    """``train.py`` runs in-process with ``trainer.deterministic: true`` (configs/train.yaml), and
    Lightning leaves ``torch.use_deterministic_algorithms(True)`` set for the whole process; a
    later test calling an op without a deterministic kernel (Captum's DeepLIFT max-unpool) would
    then fail depending on test order. Every test ends with PyTorch's default restored."""
    import torch

    yield
    torch.use_deterministic_algorithms(False)
