"""Shared machinery of the file-based datamodules: splits, transforms, loaders, collation, errors.

A concrete datamodule implements :meth:`FileDataModule.build_dataset` (returning a
``Dataset`` whose items are dicts in the sample format of DESIGN.md: ``image``, ``label``,
``index`` and where available ``boxes`` ``[n, 4]``, ``mask`` ``[H, W]`` bool, ...) and the
``num_classes`` / ``class_names`` properties. File lists are built once per split and cached
(no per-sample file-system scans after setup).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from contrastive_saliency.errors import UserInputError
from datamodules.transforms import (
    DEFAULT_TRANSFORM,
    SampleTransform,
    TransformConfig,
    as_transform_config,
)

EVAL_SPLITS = ("val", "test")


class DatasetLayoutError(UserInputError, FileNotFoundError):
    """A dataset root, annotation file or image is missing or laid out differently than the
    loader expects; the message names the path and the expected structure."""


def require_path(path: Path, what: str, expected: str) -> Path:
    """``path`` if it exists, else a :class:`DatasetLayoutError` naming it and the layout."""
    if not path.exists():
        raise DatasetLayoutError(f"{what} not found at {str(path)!r}; expected {expected}")
    return path


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB; an unreadable file raises naming the path."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise DatasetLayoutError(f"image file {str(path)!r} is missing") from error
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetLayoutError(
            f"image file {str(path)!r} cannot be read as an image ({error}); replace or remove it"
        ) from error


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack sample dicts into a batch. ``boxes`` (a different count per image) become
    ``[B, n_max, 4]`` padded with empty ``(0, 0, 0, 0)`` boxes plus ``num_boxes`` ``[B]``;
    other tensors are stacked, strings and lists kept as lists."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if key == "boxes":
            counts = torch.tensor([v.shape[0] for v in values])
            padded = torch.zeros(len(values), max(int(counts.max()), 1), 4)
            for row, value in enumerate(values):
                padded[row, : value.shape[0]] = value
            batch["boxes"], batch["num_boxes"] = padded, counts
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, float, bool)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class SplitLoaders:
    """The train, val and test loaders of a datamodule with ``dataset(split)``, ``batch_size``
    and ``num_workers``: train shuffled, samples collated by :func:`collate_samples`. Put it
    before ``LightningDataModule`` in the bases; override :meth:`split_loader` to refuse a
    split."""

    def split_loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),  # type: ignore[attr-defined]
            batch_size=self.batch_size,  # type: ignore[attr-defined]
            shuffle=shuffle,
            num_workers=self.num_workers,  # type: ignore[attr-defined]
            persistent_workers=self.num_workers > 0,  # type: ignore[attr-defined]
            collate_fn=collate_samples,
        )

    def train_dataloader(self) -> DataLoader:
        return self.split_loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.split_loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.split_loader("test", shuffle=False)


class FileDataModule(SplitLoaders, L.LightningDataModule, ABC):
    """Base of the datamodules that read a dataset from ``root``.

    Args:
        root: dataset directory (users bring the data; nothing is downloaded unless a
            subclass says so).
        batch_size, num_workers: data loading.
        transform: the image transform (:class:`~datamodules.transforms.TransformConfig`:
            size, resize, mean/std, interpolation, training augmentation, or a model's own
            data config); ``--data.transform.image_size 128`` on the command line.
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 64,
        num_workers: int = 4,
        transform: TransformConfig | Mapping[str, Any] = DEFAULT_TRANSFORM,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        own_default = inspect.signature(type(self).__init__).parameters.get("transform")
        default = own_default.default if own_default is not None else DEFAULT_TRANSFORM
        self.transform_config = as_transform_config(transform, default).resolved()
        self._datasets: dict[str, Dataset] = {}

    def save_hyperparameters(self, *args: Any, ignore=None, frame=None, logger=True) -> None:
        """Lightning's ``save_hyperparameters``, with a :class:`TransformConfig` argument kept
        as the dict of its fields (what LightningCLI saves): checkpoints then hold plain values
        only, loadable with ``weights_only=True``."""
        frame = frame or inspect.currentframe().f_back  # the caller's __init__
        super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        transform = self.hparams.get("transform")
        if isinstance(transform, TransformConfig):
            plain = {**self.hparams, "transform": asdict(transform)}
            super().save_hyperparameters(plain, frame=frame, logger=logger)

    @property
    def train_augment(self) -> bool:
        """Whether the training split is randomly augmented (``transform.train_augment``)."""
        return self.transform_config.train_augment

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.transform_config.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.transform_config.std

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of classes of the dataset."""

    @property
    @abstractmethod
    def class_names(self) -> list[str]:
        """Class names in label order."""

    def transform(self, split: str) -> SampleTransform:
        return SampleTransform(self.transform_config, train=split == "train" and self.train_augment)

    @abstractmethod
    def build_dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (``train``, ``val`` or ``test``)."""

    def dataset(self, split: str) -> Dataset:
        """Cached :meth:`build_dataset`: file lists and annotations are read once per split."""
        if split not in ("train", *EVAL_SPLITS):
            raise ValueError(f"unknown split {split!r}; expected train, val or test")
        if split not in self._datasets:
            self._datasets[split] = self.build_dataset(split)
        return self._datasets[split]

    def unaugmented_dataset(self, split: str) -> Dataset:
        """``split`` with the evaluation transform: the train split is rebuilt (not cached)
        without its random augmentation, e.g. to compute a confusion matrix on train images."""
        if split != "train" or not self.train_augment:
            return self.dataset(split)
        augmented = self.transform_config
        self.transform_config = replace(augmented, train_augment=False)
        try:
            return self.build_dataset(split)
        finally:
            self.transform_config = augmented
