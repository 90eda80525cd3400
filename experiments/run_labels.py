"""Legend labels for runs in cross-run figures: what model on what data a run directory holds.

Read from the ``config.yaml`` that ``evaluate.py`` saves in its run directory: the model by
name (``model.model_name``, e.g. ``torchvision:densenet201``; ``+ probe`` with a linear-probe
head), or for a checkpoint the training run's backbone and directory name (the checkpoint path
is also in ``hparams.yaml`` when the config left it to the newest one); then the datamodule
(``ShapesDataModule`` → ``Shapes``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def _checkpoint_label(checkpoint: str) -> str:
    path = Path(checkpoint)
    if path.parent.name != "checkpoints":
        return path.stem
    training_run = path.parent.parent
    model = _read_yaml(training_run / "config.yaml").get("model") or {}
    init = model.get("init_args") or {}
    backbone = init.get("backbone") or init.get("model_name")
    return f"{backbone} ({training_run.name})" if backbone else training_run.name


def model_description(run_dir: Path) -> str:
    """The model a run explained, e.g. ``torchvision:densenet201`` or
    ``small_cnn (train-...-seed3)``; the run directory's name if its config says nothing."""
    run_dir = Path(run_dir)
    model = _read_yaml(run_dir / "config.yaml").get("model") or {}
    if model.get("model_name"):
        return str(model["model_name"]) + (" + probe" if model.get("head_path") else "")
    checkpoint = model.get("checkpoint") or _read_yaml(run_dir / "hparams.yaml").get("checkpoint")
    return _checkpoint_label(str(checkpoint)) if checkpoint else run_dir.name


def data_description(run_dir: Path) -> str | None:
    """The run's datamodule without the ``DataModule`` suffix (``ImageNet``, ``CUB``), or None."""
    data = _read_yaml(Path(run_dir) / "config.yaml").get("data") or {}
    class_path = data.get("class_path") if isinstance(data, dict) else None
    if not class_path:
        return None
    return str(class_path).rsplit(".", 1)[-1].removesuffix("DataModule")


def run_label(run_dir: Path) -> str:
    """``"<model> on <data>"`` for a legend (see :func:`model_description`)."""
    data = data_description(run_dir)
    model = model_description(run_dir)
    return f"{model} on {data}" if data else model
