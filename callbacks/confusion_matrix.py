"""Confusion matrix of the full validation split, each sample counted exactly once."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import WandbLogger

from saliency.metrics.per_sample import PerSampleValues


def confusion_matrix(
    labels: torch.Tensor, predictions: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``M[t, p]`` = number of samples of true class ``t`` predicted as ``p`` (int64)."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


class ConfusionMatrixCallback(L.Callback):
    """After every validation epoch, write ``confusion_matrix.npy`` and ``.csv`` (raw counts,
    rows = true class, columns = predicted class) to ``output_dir`` (default: the trainer's
    ``default_root_dir``) and log a confusion-matrix plot to W&B.

    The files always describe the latest validation epoch, i.e. the weights of ``last.ckpt``;
    CASE reads them to pick contrast classes. Labels and predictions are collected with the
    sample ``index`` and de-duplicated, so padded duplicates of a ``DistributedSampler`` are not
    counted twice. The validation step must return a dict with ``preds``.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "confusion_matrix") -> None:
        self.output_dir = output_dir
        self.filename = filename
        self.matrix: np.ndarray | None = None
        self._predictions: PerSampleValues | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._predictions = PerSampleValues().to(pl_module.device)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not isinstance(outputs, dict) or "preds" not in outputs:
            raise RuntimeError(
                "ConfusionMatrixCallback needs validation_step to return {'preds': ...}"
            )
        rows = torch.stack([batch["label"], outputs["preds"]], dim=1)
        self._predictions.update(rows, batch["index"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._predictions is None:
            return
        _, rows = self._predictions.compute()  # collective under DDP: every rank calls it
        rows = rows.long().cpu()
        num_classes = int(pl_module.hparams.num_classes)
        self.matrix = confusion_matrix(rows[:, 0], rows[:, 1], num_classes).numpy()
        if trainer.is_global_zero:
            names = _class_names(trainer, num_classes)
            self._save(Path(self.output_dir or trainer.default_root_dir), names)
            self._log_wandb(trainer, rows, names)

    def _save(self, directory: Path, names: list[str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / f"{self.filename}.npy", self.matrix)
        frame = pd.DataFrame(self.matrix, index=names, columns=names)
        frame.index.name = "true\\predicted"
        frame.to_csv(directory / f"{self.filename}.csv")

    def _log_wandb(self, trainer: L.Trainer, rows: torch.Tensor, names: list[str]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                plot = wandb.plot.confusion_matrix(
                    y_true=rows[:, 0].tolist(), preds=rows[:, 1].tolist(), class_names=names
                )
                logger.experiment.log(
                    {"val/confusion_matrix": plot, "epoch": trainer.current_epoch}
                )


def _class_names(trainer: L.Trainer, num_classes: int) -> list[str]:
    names = getattr(trainer.datamodule, "class_names", None)
    if names is None or len(names) != num_classes:
        return [str(c) for c in range(num_classes)]
    return list(names)
