"""A seeded per-class sample of a datamodule's train split (``evaluation.confusion_matrix:
holdout``: CASE's confusion matrix for a pretrained model whose validation split is the one it
explains, e.g. ImageNet)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from contrastive_saliency.errors import ConfigurationError
from datamodules.dataset_labels import dataset_labels

__all__ = ["per_class_sample", "train_holdout"]


def per_class_sample(labels: Sequence[int], per_class: int, seed: int) -> list[int]:
    """Sorted positions: ``min(per_class, n_c)`` of each class's ``n_c`` positions, chosen by
    one ``torch.Generator`` seeded with ``seed`` (a random key per position; the smallest keys
    of each class win). Depends only on ``(labels, per_class, seed)``: the same on every rank."""
    labels_array = np.asarray(labels, dtype=np.int64)
    keys = torch.rand(len(labels_array), generator=torch.Generator().manual_seed(seed)).numpy()
    order = np.lexsort((keys, labels_array))  # by class, then by key
    ordered = labels_array[order]
    rank = np.arange(len(order)) - np.searchsorted(ordered, ordered, side="left")
    return sorted(int(p) for p in order[rank < per_class])


def train_holdout(datamodule: Any, per_class: int, seed: int) -> Subset:
    """:func:`per_class_sample` of the train split, with the evaluation transform (no random
    augmentation; :meth:`~datamodules.base.FileDataModule.unaugmented_dataset`). Items keep their
    train-split ``index``, so a DDP pass counts each once."""
    getter = getattr(datamodule, "unaugmented_dataset", None) or getattr(
        datamodule, "dataset", None
    )
    if not callable(getter):
        raise ConfigurationError(
            f"evaluation.confusion_matrix: holdout samples the train split through "
            f"datamodule.dataset('train'), which {type(datamodule).__name__} does not have; "
            f"pass a confusion matrix file (evaluation.confusion_matrix PATH) instead"
        )
    dataset: Dataset = getter("train")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ConfigurationError(
            f"evaluation.confusion_matrix: holdout samples the train split, but the train split "
            f"of {type(datamodule).__name__} is empty; give it train images or pass a confusion "
            f"matrix file (evaluation.confusion_matrix PATH)"
        )
    return Subset(dataset, per_class_sample(dataset_labels(dataset), per_class, seed))
