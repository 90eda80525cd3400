"""SaliencyEvaluationModule: a trained classifier, loaded from a checkpoint, to be explained."""

from __future__ import annotations

import contextvars
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lightning_modules.classifier import ClassifierModule
from saliency.errors import ConfigurationError


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


class SaliencyEvaluationModule(L.LightningModule):
    """Holds the classifier to explain; ``test_step`` returns its logits for the callbacks.

    Args:
        checkpoint: a ``train.py`` checkpoint; default: the newest under ``outputs_dir``.
        num_classes: if given, must equal the checkpoint's (a guard against the wrong file).
        outputs_dir: where to look for the newest checkpoint.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        num_classes: int | None = None,
        outputs_dir: str = "outputs",
    ) -> None:
        super().__init__()
        path = Path(checkpoint) if checkpoint is not None else newest_checkpoint(outputs_dir)
        if not path.is_file():
            raise ConfigurationError(
                f"checkpoint not found: {path}; run `uv run python train.py` first or pass an "
                f"existing file to --model.checkpoint"
            )
        self.checkpoint_path = path
        self.classifier = load_classifier(path)
        if num_classes is not None and num_classes != self.classifier.num_classes:
            raise ConfigurationError(
                f"--model.num_classes={num_classes} does not match checkpoint {path}, which has "
                f"{self.classifier.num_classes} classes"
            )
        self.save_hyperparameters({"checkpoint": str(path), "num_classes": self.num_classes})

    @property
    def network(self) -> nn.Module:
        """The plain network (images → logits) that saliency methods explain."""
        return self.classifier.model

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"logits": self(batch["image"])}

    def on_test_start(self) -> None:
        data_classes = getattr(self.trainer.datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ConfigurationError(
                f"the data has {data_classes} classes but checkpoint {self.checkpoint_path} "
                f"predicts {self.num_classes}: evaluate on the dataset the model was trained on"
            )


def load_classifier(path: Path) -> ClassifierModule:
    try:
        # A fresh context: LightningCLI instantiates the enclosing module with its own
        # hyper-parameters in a context variable that save_hyperparameters() would pick up.
        classifier = contextvars.Context().run(
            ClassifierModule.load_from_checkpoint, path, map_location="cpu"
        )
    except (KeyError, RuntimeError, EOFError, OSError) as error:
        raise ConfigurationError(
            f"cannot load checkpoint {path} as a ClassifierModule: "
            f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        ) from error
    classifier.eval()
    return classifier
