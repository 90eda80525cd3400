"""LightningDataModule for the embedded fine-grained shapes benchmark (no files, no download)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from datamodules.shapes_dataset import SPLITS, ShapesConfig, ShapesDataset


class ShapesDataModule(L.LightningDataModule):
    """Train/val/test splits of :class:`ShapesDataset`, generated on the fly.

    Args:
        image_size: side of the square images in pixels.
        num_shapes, num_marks: classes = shapes × mark positions (siblings differ only by the mark).
        train_size, val_size, test_size: samples per split.
        data_seed: seed of the benchmark itself, independent of the training ``--seed``, so
            runs with different training seeds see the same data.
        clutter: background rectangles per image; noise_std: pixel noise.
        mark_contrast: how far the mark's colour is from the object's, as a fraction of the way
            to the complementary colour (1: the complement; the default 0.12 is faint, so the
            mark is the hard, fine-grained evidence).
        label_mode: ``fine`` (class = shape × mark) or ``shape`` (the coarse task: class =
            shape, same images).
        batch_size, num_workers: data loading.
    """

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    def __init__(
        self,
        image_size: int = 64,
        num_shapes: int = 5,
        num_marks: int = 2,
        train_size: int = 5000,
        val_size: int = 1000,
        test_size: int = 1000,
        data_seed: int = 0,
        clutter: int = 4,
        noise_std: float = 0.04,
        mark_contrast: float = 0.12,
        label_mode: str = "fine",
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = ShapesConfig(
            image_size=image_size,
            num_shapes=num_shapes,
            num_marks=num_marks,
            seed=data_seed,
            clutter=clutter,
            noise_std=noise_std,
            mark_contrast=mark_contrast,
            label_mode=label_mode,
        )
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.batch_size = batch_size
        self.num_workers = num_workers

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.config.class_names

    @property
    def sibling_classes(self) -> list[list[int]] | None:
        """``sibling_classes[c]``: the classes with the shape of ``c`` and another mark (read by
        the evaluation's top-2 = sibling share); ``None`` when labels are shapes."""
        if self.config.label_mode == "shape":
            return None
        return [self.config.siblings(c) for c in range(self.num_classes)]

    def split_source(self, split: str) -> str:
        """Splits are generated from ``(config, split name)``: distinct for distinct names
        (:mod:`datamodules.split_source`)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return f"shapes({self.config})/{split}"

    def dataset(self, split: str) -> ShapesDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return ShapesDataset(split, self.sizes[split], self.config, self.mean, self.std)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
