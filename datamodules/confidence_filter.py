"""The confidence filter of quad grids (Rao et al. 2022): the images of a split that a model
classifies correctly with softmax probability ≥ 0.99, with a file cache keyed by the model's
weights, the threshold and the split (:mod:`datamodules.cache_files`).

The filter model is handed in (any ``nn.Module`` images → logits): the datamodule never loads
a checkpoint itself; the entry points do (:mod:`lightning_modules.checkpoints`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from contrastive_saliency.checks import check_batch_size
from datamodules.base import collate_samples
from datamodules.cache_files import dataset_identity, model_fingerprint, write_atomically

CACHE_FORMAT = 1
"""Version of the confidence-filter cache files; a file of another version is recomputed."""

RAO_CONFIDENCE = 0.99
"""Rao et al. (2022): a grid image must be classified correctly with softmax ≥ 0.99."""


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def _compute_confident(
    model: nn.Module,
    dataset: Dataset,
    threshold: float,
    batch_size: int,
    device: torch.device,
    num_workers: int,
) -> list[int]:
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_samples,
    )
    kept: list[int] = []
    position = 0
    for batch in loader:
        images = batch["image"].to(device)
        labels = torch.as_tensor(batch["label"]).to(device).long()
        probabilities = model(images).float().softmax(dim=1)
        p_label = probabilities.gather(1, labels[:, None])[:, 0]
        confident = (probabilities.argmax(dim=1) == labels) & (p_label >= threshold)
        kept.extend(position + int(k) for k in torch.nonzero(confident).flatten().tolist())
        position += images.shape[0]
    return kept


def confident_indices(
    model: nn.Module,
    dataset: Dataset,
    threshold: float = RAO_CONFIDENCE,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    split: str | None = None,
    num_workers: int = 0,
    labels: Sequence[int] | None = None,
) -> list[int]:
    """Indices of ``dataset`` that ``model`` classifies correctly with softmax probability of the
    true class ``≥ threshold`` (Rao et al. 2022: 0.99), in increasing order.

    The model sees the base images as the dataset yields them (normalised, at the base
    resolution), in batches of ``batch_size`` on ``device`` (default: the model's device); it
    is put in eval mode and moved to ``device`` only for the call (both restored after).

    With ``cache_dir`` the result is stored in ``<cache_dir>/confident-<key>.json``, the key a
    hash of the model's ``state_dict`` contents, the threshold and :func:`dataset_identity`
    (``split`` included). The file holds those fields and the index list, is written atomically
    (temporary file + ``os.replace``) and is trusted only when every field matches; a missing,
    unreadable or mismatched file is recomputed and rewritten. ``labels`` (default:
    :func:`~datamodules.dataset_labels.dataset_labels`) only enter the key; the filter reads
    each batch's ``label``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"confidence threshold must be a softmax probability in [0, 1], got {threshold}; "
            f"Rao et al. use {RAO_CONFIDENCE}"
        )
    check_batch_size(batch_size, "confidence filter")
    record: dict[str, Any] | None = None
    path: Path | None = None
    if cache_dir is not None:
        record = {
            "format": CACHE_FORMAT,
            "model": model_fingerprint(model),
            "threshold": float(threshold),
            "dataset": dataset_identity(dataset, split, labels),
        }
        key = hashlib.blake2b(json.dumps(record, sort_keys=True).encode(), digest_size=12)
        path = Path(cache_dir).expanduser() / f"confident-{key.hexdigest()}.json"
        cached = _read_cache(path, record, len(dataset))  # type: ignore[arg-type]
        if cached is not None:
            return cached

    target = torch.device(device) if device is not None else model_device(model)
    original_device, was_training = model_device(model), model.training
    model.eval().to(target)
    try:
        kept = _compute_confident(model, dataset, threshold, batch_size, target, num_workers)
    finally:
        model.to(original_device).train(was_training)

    if path is not None and record is not None:
        content = json.dumps({**record, "indices": kept}).encode()
        write_atomically(path, lambda file: file.write(content))
    return kept


def _read_cache(path: Path, record: dict[str, Any], length: int) -> list[int] | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or any(stored.get(k) != v for k, v in record.items()):
        return None
    indices = stored.get("indices")
    if not isinstance(indices, list) or not all(
        isinstance(i, int) and 0 <= i < length for i in indices
    ):
        return None
    return indices
