"""On-disk cache of a frozen backbone's pooled features ``φ(x)`` per dataset split.

A linear probe trains only ``logits = W φ(x) + b`` on a frozen ``φ`` (Finer-CAM Sec. 4.1 and
App. B.3), so for a deterministic split ``φ(x)`` is computed once, stored as an ``[N, D]``
tensor and the head trained on it: a step on a batch of stored features is the same step as
one through the backbone on the same images.

Files: ``<cache_dir>/<backbone>-<split>-<digest>.pt`` holding ``{"key", "features" [N, D],
"labels" [N], "indices" [N]}`` and a ``.json`` sidecar with the key for people. ``digest``
hashes the key (:func:`feature_cache_key`): the backbone's identity (name, constructor
arguments, pooling, a hash of its weights, precision), the datamodule's class and settings, and
:func:`~datamodules.cache_files.dataset_identity` of the split (dataset class, split, length, a
hash of the labels and of probe images, i.e. of the transform's output). Files are written
atomically (temporary file + ``os.replace``); a file whose stored key differs is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from contrastive_saliency.errors import ConfigurationError
from datamodules.cache_files import dataset_identity, write_atomically

CACHE_FORMAT = 1
"""Version of the cache files; part of the key, so files of another version are not read."""
LOADER_SETTINGS = frozenset({"batch_size", "num_workers"})
"""Datamodule settings that do not change the samples, left out of the key."""
DATAMODULE_ATTRIBUTES = ("root", "mean", "std", "transform_config", "train_augment")
"""Datamodule attributes that define the samples besides its saved hyper-parameters."""


@dataclass(frozen=True)
class CachedFeatures:
    """One split's features ``[N, D]``, labels ``[N]`` and sample ``index`` values ``[N]``, in
    the dataset's order."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __post_init__(self) -> None:
        rows = self.features.shape[0] if self.features.ndim == 2 else None
        if rows is None or self.labels.shape != (rows,) or self.indices.shape != (rows,):
            raise ValueError(
                f"cached features must be [N, D] with labels and indices [N]; got features "
                f"{tuple(self.features.shape)}, labels {tuple(self.labels.shape)}, indices "
                f"{tuple(self.indices.shape)}"
            )

    def __len__(self) -> int:
        return self.features.shape[0]


class FeatureDataset(Dataset):
    """Samples ``{"features" [D], "label", "index"}`` of :class:`CachedFeatures`; a batch of
    indices is gathered with one indexing operation per tensor (``__getitems__``)."""

    def __init__(self, cached: CachedFeatures) -> None:
        self.cached = cached

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "features": self.cached.features[index],
            "label": self.cached.labels[index],
            "index": self.cached.indices[index],
        }

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return {
            "features": self.cached.features[rows],
            "label": self.cached.labels[rows],
            "index": self.cached.indices[rows],
        }


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collate function of :class:`FeatureDataset` loaders: the batch is gathered already."""
    return batch


def feature_loader(cached: CachedFeatures, batch_size: int, shuffle: bool) -> DataLoader:
    """Batches ``{"features" [B, D], "label" [B], "index" [B]}`` over the cached split, drawn
    like a map-style image loader (same sampler, so the same order under the same seed)."""
    return DataLoader(
        FeatureDataset(cached), batch_size=batch_size, shuffle=shuffle, collate_fn=keep_batch
    )


def image_batch(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate only what feature extraction needs: ``image`` ``[B, C, H, W]``, ``label`` and
    ``index`` ``[B]`` (other keys, e.g. boxes of varying count, are dropped)."""
    missing = [key for key in ("image", "label", "index") if key not in samples[0]]
    if missing:
        raise ConfigurationError(
            f"feature caching needs samples with 'image', 'label' and 'index'; they lack "
            f"{missing} (keys: {sorted(samples[0])})"
        )
    return {
        "image": torch.stack([torch.as_tensor(s["image"]) for s in samples]),
        "label": torch.as_tensor([int(s["label"]) for s in samples], dtype=torch.long),
        "index": torch.as_tensor([int(s["index"]) for s in samples], dtype=torch.long),
    }


def split_dataset(datamodule: Any, split: str) -> Dataset:
    """``datamodule.dataset(split)``, the unshuffled samples of ``split``."""
    getter = getattr(datamodule, "dataset", None)
    if not callable(getter):
        raise ConfigurationError(
            f"feature caching reads the splits through datamodule.dataset(split), which "
            f"{type(datamodule).__name__} does not have; set --model.init_args.feature_cache "
            f"false to run the backbone on every batch"
        )
    return getter(split)


def require_deterministic(datamodule: Any, dataset: Dataset, split: str) -> None:
    """Refuse a split whose samples change between loads. The datamodule's explicit
    ``train_augment`` flag decides for ``train``; every split's first sample is also loaded
    twice and must be identical (catches random transforms of datamodules without the flag)."""
    if split == "train" and getattr(datamodule, "train_augment", False):
        raise ConfigurationError(
            f"feature_cache=true stores one feature vector per image, but "
            f"{type(datamodule).__name__} augments the training images (train_augment=true): "
            f"set --data.transform.train_augment false, or --model.init_args.feature_cache "
            f"false to run the backbone on freshly augmented images every step"
        )
    if len(dataset) == 0:  # type: ignore[arg-type]
        return
    first, second = dataset[0]["image"], dataset[0]["image"]
    if not torch.equal(torch.as_tensor(first), torch.as_tensor(second)):
        raise ConfigurationError(
            f"sample 0 of the {split} split of {type(datamodule).__name__} differs between two "
            f"loads (a random transform), so its features cannot be cached: make the transform "
            f"deterministic or set --model.init_args.feature_cache false"
        )


def data_identity(datamodule: Any, dataset: Dataset, split: str) -> dict[str, Any]:
    """What identifies the samples of ``split``: the datamodule's class, its settings (saved
    hyper-parameters without loader-only ones, plus root, mean/std, transform config and
    augmentation flag where it has them), :func:`dataset_identity` of the split and, for
    datasets with a ``records`` file list, a hash of it. Any setting change gives a new key."""
    settings = {
        name: value
        for name, value in dict(getattr(datamodule, "hparams", {})).items()
        if name not in LOADER_SETTINGS
    }
    for name in DATAMODULE_ATTRIBUTES:
        if hasattr(datamodule, name):
            settings[name] = getattr(datamodule, name)
    identity = {
        "datamodule": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        "settings": settings,
        "dataset": dataset_identity(dataset, split),
    }
    records = getattr(dataset, "records", None)
    if records is not None:  # file lists: a renamed, added or removed file changes the key
        identity["records"] = hashlib.blake2b(repr(records).encode(), digest_size=16).hexdigest()
    return identity


def feature_cache_key(backbone: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The full cache key as plain JSON values (tuples → lists, paths and dataclasses → str),
    so the copy stored in a file compares equal to a freshly built one."""
    key = {"format": CACHE_FORMAT, "backbone": backbone, "data": data}
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def cache_path(cache_dir: str | Path, key: dict[str, Any], label: str) -> Path:
    """``<cache_dir>/<label>-<hash of key>.pt``, ``label`` made file-name safe."""
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=10)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")
    return Path(cache_dir).expanduser() / f"{safe}-{digest.hexdigest()}.pt"


def load_features(path: Path, key: dict[str, Any]) -> CachedFeatures | None:
    """The features stored at ``path`` for ``key``; None if there is no file. A file that
    cannot be read or holds another key is an error naming the file (delete it to recompute)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        cached = CachedFeatures(stored["features"], stored["labels"], stored["indices"])
    except (RuntimeError, EOFError, OSError, KeyError, TypeError, ValueError) as error:
        raise ConfigurationError(
            f"feature cache file {path} cannot be read ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}); delete it to recompute"
        ) from error
    if stored.get("key") != key:
        raise ConfigurationError(
            f"feature cache file {path} holds features of another key than its name says "
            f"(edited or colliding file); delete it to recompute"
        )
    expected_rows = key["data"]["dataset"]["length"]
    if len(cached) != expected_rows:
        raise ConfigurationError(
            f"feature cache file {path} has {len(cached)} rows for a split of "
            f"{expected_rows} samples; delete it to recompute"
        )
    return cached


def save_features(path: Path, key: dict[str, Any], cached: CachedFeatures) -> None:
    """Write ``cached`` under ``key`` to ``path`` and the key to ``path.with_suffix('.json')``,
    each atomically (a reader sees the whole file or none)."""
    payload = {
        "key": key,
        "features": cached.features.contiguous(),
        "labels": cached.labels,
        "indices": cached.indices,
    }
    write_atomically(path, lambda file: torch.save(payload, file))
    summary = {
        "key": key,
        "rows": len(cached),
        "dim": cached.features.shape[1],
        "dtype": str(cached.features.dtype),
    }
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    write_atomically(path.with_suffix(".json"), lambda file: file.write(text.encode()))


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
) -> CachedFeatures:
    """``φ(x)`` of every sample of ``dataset`` in order: batched, without gradients, with the
    backbone in eval mode (restored afterwards) inside ``forward_context`` (e.g. the trainer's
    autocast). The loader has its own generator, so the global RNG is left untouched and a run
    that computes the cache draws the same shuffles as one that loads it."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=image_batch,
        generator=torch.Generator(),
    )
    was_training = backbone.training
    backbone.eval()
    features, labels, indices = [], [], []
    try:
        for batch in loader:
            with forward_context():
                output = backbone(batch["image"].to(device, non_blocking=True))
            if output.ndim != 2:
                raise ConfigurationError(
                    f"the backbone must return pooled features [B, D], got "
                    f"{tuple(output.shape)}: check the pooling"
                )
            features.append(output.detach().to("cpu"))
            labels.append(batch["label"])
            indices.append(batch["index"])
    finally:
        backbone.train(was_training)
    if not features:
        raise ConfigurationError("the split is empty: there are no features to cache")
    return CachedFeatures(torch.cat(features), torch.cat(labels), torch.cat(indices))


def cached_split_features(
    path: Path,
    key: dict[str, Any],
    compute: Callable[[], CachedFeatures],
    compute_here: bool = True,
    barrier: Callable[[], None] | None = None,
) -> CachedFeatures:
    """The features of ``key``: read from ``path``, else computed by ``compute`` and saved.

    Distributed use: only the process with ``compute_here`` (local rank 0 of each node)
    computes; ``barrier`` — called exactly once by every process — makes the others wait
    until the file exists, then they read it."""
    cached = load_features(path, key)
    if cached is None and compute_here:
        cached = compute()
        save_features(path, key, cached)
    if barrier is not None:
        barrier()
    if cached is None:
        cached = load_features(path, key)
    if cached is None:
        raise ConfigurationError(
            f"feature cache file {path} was not written by the computing process: the "
            f"processes disagree on the cache key (e.g. a randomly initialised backbone without "
            f"a common seed: pass --seed) or cache_dir is not shared by the processes of a node"
        )
    return cached


def loader_batch_size(datamodule: Any) -> int:
    """The datamodule's ``batch_size``, used for extraction and for the feature batches."""
    batch_size = getattr(datamodule, "batch_size", None)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(
            f"feature caching batches like the datamodule's loaders, but "
            f"{type(datamodule).__name__}.batch_size is {batch_size!r}; expected a positive int"
        )
    return batch_size
