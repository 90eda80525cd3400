"""``train.py`` checkpoints: find the newest run's, load one as its module, and hand a
datamodule the network of the checkpoint it names for filtering (the quad grids' confidence
filter), so that data never imports a model module. Called by the entry points."""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any

from contrastive_saliency.errors import ConfigurationError
from lightning_modules.classifier import ClassifierModule
from lightning_modules.linear_probe import CHECKPOINT_CLASS_KEY, LinearProbeModule
from lightning_modules.torch_files import load_torch_file


def newest_checkpoint(outputs_dir: str | Path = "outputs") -> Path:
    """``last.ckpt`` of the most recently written run under ``outputs_dir`` (else its newest
    checkpoint). Raises a :class:`ConfigurationError` telling the user to train first."""
    candidates = sorted(
        Path(outputs_dir).glob("*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime
    )
    if not candidates:
        raise ConfigurationError(
            f"no checkpoint found under {Path(outputs_dir).resolve()}/*/checkpoints/: run "
            f"`uv run python train.py` first, or pass --model.checkpoint PATH"
        )
    newest_run = candidates[-1].parent
    last = newest_run / "last.ckpt"
    return last if last.is_file() else candidates[-1]


TRAIN_CHECKPOINT = (
    "a train.py checkpoint (outputs/<run>/checkpoints/last.ckpt: a dict with state_dict and "
    "hyper_parameters)"
)


def load_classifier(path: Path) -> ClassifierModule | LinearProbeModule:
    """A ``train.py`` checkpoint as its module: a :class:`LinearProbeModule` when the checkpoint
    names that class (``CHECKPOINT_CLASS_KEY``), else a :class:`ClassifierModule`. A file that
    is not such a checkpoint (empty, corrupt, a bare state dict, pickled objects) is a
    :class:`ConfigurationError` naming it."""
    module_class, overrides = ClassifierModule, {}
    if _checkpoint_class(path) == f"{LinearProbeModule.__module__}.{LinearProbeModule.__name__}":
        # The checkpoint holds the backbone's weights: do not fetch pretrained ones or read
        # the training machine's weights file again.
        module_class, overrides = LinearProbeModule, {"pretrained": False, "weights_path": None}
    try:
        # A fresh context: LightningCLI instantiates the enclosing module with its own
        # hyper-parameters in a context variable that save_hyperparameters() would pick up.
        classifier = contextvars.Context().run(
            module_class.load_from_checkpoint, path, map_location="cpu", **overrides
        )
    except (KeyError, RuntimeError, EOFError, OSError, TypeError, ValueError) as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ConfigurationError(
            f"cannot load checkpoint {path} as a {module_class.__name__}: "
            f"{type(error).__name__}: {first}; expected {TRAIN_CHECKPOINT}"
        ) from error
    classifier.eval()
    return classifier


def _checkpoint_class(path: Path) -> str | None:
    """The module class a checkpoint names (None: the default), read without loading its
    tensors (memory-mapped); a :class:`ConfigurationError` when the file is not a readable
    ``train.py`` checkpoint."""
    checkpoint = load_torch_file(path, TRAIN_CHECKPOINT, mmap=True)
    required = ("state_dict", "hyper_parameters")
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in required):
        held = (
            f"a dict with keys {', '.join(map(str, list(checkpoint)[:6])) or '(none)'}"
            if isinstance(checkpoint, dict)
            else f"a {type(checkpoint).__name__}"
        )
        raise ConfigurationError(
            f"{path}: a PyTorch file but not a train.py checkpoint (it holds {held}); expected "
            f"{TRAIN_CHECKPOINT}. Weights of a network by name go to --model.model_name NAME "
            f"--model.weights_path FILE"
        )
    return checkpoint.get(CHECKPOINT_CLASS_KEY)


def hand_filter_model(datamodule: Any) -> None:
    """Load the checkpoint a datamodule names as ``filter_checkpoint`` (the quad grids'
    confidence filter, Rao et al.) and hand its network to ``datamodule.set_filter_model``;
    nothing for a datamodule without one. ``train.py`` and ``evaluate.py`` call it before the
    datamodule's first split is built."""
    path = getattr(datamodule, "filter_checkpoint", None)
    if path is None:
        return
    datamodule.set_filter_model(load_classifier(Path(path)).model)
