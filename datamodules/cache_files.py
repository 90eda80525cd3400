"""Files that cache a result keyed by what produced it: fingerprints of a model and of a
dataset split, and the one atomic file write of the project.

Used by the quad grids' confidence filter (:mod:`datamodules.confidence_filter`), the linear
probe's feature cache (:mod:`lightning_modules.feature_cache`) and the evaluation's published
results (:mod:`callbacks.run_outputs`). Fingerprints hash contents, never object identities or
paths, so the same model and data give the same key in every process and on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from datamodules.dataset_labels import dataset_labels


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the model's class and ``state_dict`` contents (names, dtypes, shapes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):  # e.g. a module's extra state
            digest.update(f"|{name}|{tensor!r}|".encode())
            continue
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_identity(
    dataset: Dataset, split: str | None = None, labels: Sequence[int] | None = None
) -> dict[str, Any]:
    """What identifies a base split in the cache key: class, split, length, a hash of the labels
    and a hash of the images of (up to) three probe samples (first, middle, last), which tells
    apart e.g. two shapes benchmarks with another ``data_seed`` or two roots of equal size.
    A dataset with random augmentation gives another probe hash on every call, so a result
    keyed on it is recomputed each time (never wrongly reused)."""
    n = len(dataset)  # type: ignore[arg-type]
    labels = dataset_labels(dataset) if labels is None else labels
    probes = hashlib.blake2b(digest_size=16)
    for index in sorted({0, n // 2, n - 1} if n else set()):
        image = torch.as_tensor(dataset[index]["image"]).detach().float().contiguous()
        probes.update(f"{index}|{tuple(image.shape)}|".encode())
        probes.update(image.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "split": split,
        "length": n,
        "labels": hashlib.blake2b(
            json.dumps(list(map(int, labels))).encode(), digest_size=16
        ).hexdigest(),
        "probes": probes.hexdigest(),
    }


def write_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Create or replace ``path`` so that a reader sees the old file or the whole new one:
    ``write`` fills a temporary binary file next to ``path`` (the parent is created), which is
    flushed to disk and renamed into place with ``os.replace``; on any error the temporary file
    is removed and ``path`` is left as it was. Text: ``lambda f: f.write(text.encode())``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
