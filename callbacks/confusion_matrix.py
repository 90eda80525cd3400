"""Confusion matrix of the full validation split, each sample counted exactly once, and where
it came from.

CASE takes its contrast classes from a confusion matrix "computed on a held-out validation set"
(Sec. III-C). Next to ``confusion_matrix.npy`` the callback writes ``confusion_matrix.json``:
its provenance — ``source``, the data the matrix was computed on
(:mod:`datamodules.split_source`, e.g. ``"CIFAR-100/train"`` for a held-out part of train),
``split`` (``val`` or a train hold-out), the number of samples and a SHA-256 of their sorted
indices. :func:`check_held_out` compares that source with the split an evaluation explains and
refuses a matrix computed on the same data, before any map is computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.metrics.per_sample import PerSampleValues
from datamodules.split_source import split_source
from lightning_modules.wandb_runs import wandb_runs

log = logging.getLogger(__name__)


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

    ``<filename>.json`` records the provenance (module docstring): ``source`` defaults to the
    datamodule's source of its ``val`` split; pass ``source`` and ``split`` when validating on
    other data (``evaluate.py``'s train hold-out).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        filename: str = "confusion_matrix",
        source: str | None = None,
        split: str = "val",
    ) -> None:
        self.output_dir = output_dir
        self.filename = filename
        self.source = source
        self.split = split
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
        indices, rows = self._predictions.compute()  # collective under DDP: every rank calls it
        rows = rows.long().cpu()
        num_classes = int(pl_module.hparams.num_classes)
        self.matrix = confusion_matrix(rows[:, 0], rows[:, 1], num_classes).numpy()
        if trainer.is_global_zero:
            names = _class_names(trainer, num_classes)
            source = self.source or split_source(trainer.datamodule, "val")
            provenance = matrix_provenance(source, self.split, indices.cpu())
            self._save(Path(self.output_dir or trainer.default_root_dir), names, provenance)
            self._log_wandb(trainer, rows, names)

    def _save(self, directory: Path, names: list[str], provenance: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / f"{self.filename}.npy", self.matrix)
        frame = pd.DataFrame(self.matrix, index=names, columns=names)
        frame.index.name = "true\\predicted"
        frame.to_csv(directory / f"{self.filename}.csv")
        (directory / f"{self.filename}.json").write_text(json.dumps(provenance, indent=2) + "\n")

    def _log_wandb(self, trainer: L.Trainer, rows: torch.Tensor, names: list[str]) -> None:
        for run in wandb_runs(trainer):
            import wandb

            plot = wandb.plot.confusion_matrix(
                y_true=rows[:, 0].tolist(), preds=rows[:, 1].tolist(), class_names=names
            )
            run.log({"val/confusion_matrix": plot, "epoch": trainer.current_epoch})


def _class_names(trainer: L.Trainer, num_classes: int) -> list[str]:
    names = getattr(trainer.datamodule, "class_names", None)
    if names is None or len(names) != num_classes:
        return [str(c) for c in range(num_classes)]
    return list(names)


def matrix_provenance(source: str | None, split: str, indices: torch.Tensor) -> dict[str, Any]:
    """What ``confusion_matrix.json`` holds: the data ``source`` (None: undeclared), the
    ``split`` description, the sample count and a SHA-256 of the sorted sample indices."""
    ordered = np.sort(indices.numpy().astype(np.int64))
    return {
        "source": source,
        "split": split,
        "samples": int(ordered.size),
        "indices_sha256": hashlib.sha256(ordered.tobytes()).hexdigest(),
    }


def read_provenance(matrix_path: str | Path) -> dict[str, Any] | None:
    """The provenance written next to a matrix file (``<stem>.json``), else None."""
    path = Path(matrix_path).with_suffix(".json")
    if not path.is_file():
        return None
    try:
        provenance = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigurationError(
            f"the confusion-matrix provenance file {path} cannot be read ({error}); delete it "
            f"to skip the held-out check, or recompute the matrix"
        ) from error
    return provenance if isinstance(provenance, dict) else None


def check_held_out(matrix_source: str | None, explained_source: str | None, origin: str) -> None:
    """Refuse a confusion matrix computed on the data an evaluation explains.

    ``matrix_source`` / ``explained_source``: :mod:`datamodules.split_source` sources (None:
    unknown; then a warning says nothing could be checked). ``origin`` names the matrix in the
    message (a file, ``validate``, ``holdout``). Raises a :class:`ConfigurationError` saying what
    to use instead.
    """
    if matrix_source is None or explained_source is None:
        log.warning(
            "cannot check that CASE's confusion matrix (%s) comes from data disjoint from the "
            "explained split: %s declares no data source",
            origin, "the matrix" if matrix_source is None else "the datamodule",
        )  # fmt: skip
        return
    if matrix_source != explained_source:
        return
    raise ConfigurationError(
        f"the confusion matrix ({origin}) would come from {matrix_source!r}, the data this "
        f"evaluation explains (its test split); CASE takes contrast classes from held-out data "
        f"(Sec. III-C). Use evaluation.confusion_matrix: holdout (a seeded per-class hold-out "
        f"of the train split), or a matrix validated on held-out data (train with "
        f"val_fraction > 0, the default of the CIFAR-100, CUB and Stanford Cars datamodules)"
    )
