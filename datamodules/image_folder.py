"""Any classification set stored as class folders (e.g. the Alzheimer MRI set used by ClusCAM).

On-disk format::

    <root>/<train_dir>/<class name>/**/*.{jpg,jpeg,png,bmp,tif,tiff,webp}
    <root>/<val_dir>/<class name>/...      (optional: or val_fraction of train)
    <root>/<test_dir>/<class name>/...     (optional)

Classes are the sorted folder names of the train folder (of the val, then test folder when
there is no train folder); every split must use a subset of them. Images are found
recursively inside each class folder, by extension (case-insensitive), sorted by path;
grayscale, palette and RGBA images are converted to RGB.

Splits: ``train`` = the train folder; ``val`` = the ``val_dir`` folder, or, with
``0 < val_fraction < 1``, a seeded stratified hold-out of the train folder (each class gives
``round(n_c · val_fraction)`` images, keeping at least one for training; ``train`` then holds
the rest); ``test`` = the ``test_dir`` folder. The Alzheimer MRI set (``train/``, ``test/``)
works with ``val_dir: test`` or ``val_fraction: 0.1``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from torch.utils.data import Dataset

from datamodules.base import DatasetLayoutError, FileDataModule, require_path
from datamodules.file_lists import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    RecordDataset,
    image_files,
    stratified_holdout,
    subdirectories,
)
from datamodules.transforms import DEFAULT_TRANSFORM, TransformConfig


class ImageFolderDataModule(FileDataModule):
    """Class-folder classification dataset (format in the module docstring).

    Args:
        root: dataset directory.
        train_dir, val_dir, test_dir: split folders inside ``root`` (``None``: no such folder).
        val_fraction: if in (0, 1), ``val`` is this seeded, stratified share of ``train_dir``
            (and ``val_dir`` is ignored); 0 reads ``val_dir``.
        split_seed: seed of that hold-out (independent of the training seed).
        extensions: image file extensions to include.
        Remaining arguments: see :class:`~datamodules.base.FileDataModule`.
    """

    def __init__(
        self,
        root: str | Path = "data/image_folder",
        train_dir: str | None = "train",
        val_dir: str | None = "val",
        test_dir: str | None = "test",
        val_fraction: float = 0.0,
        split_seed: int = 0,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        batch_size: int = 64,
        num_workers: int = 4,
        transform: TransformConfig = DEFAULT_TRANSFORM,
    ) -> None:
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, transform=transform)
        self.save_hyperparameters()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        self.split_dirs: dict[str, Path | None] = {
            "train": None if train_dir is None else self.root / train_dir,
            "val": None if val_dir is None else self.root / val_dir,
            "test": None if test_dir is None else self.root / test_dir,
        }
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.extensions = tuple(extensions)

    @property
    def layout(self) -> str:
        """The expected structure, for error messages."""
        folders = [str(d) for d in self.split_dirs.values() if d is not None]
        exts = ",".join(e.lstrip(".") for e in self.extensions)
        return f"class folders <split>/<class name>/*.{{{exts}}} for the splits {folders}"

    @cached_property
    def class_names(self) -> list[str]:
        require_path(self.root, "dataset root", self.layout)
        for directory in self.split_dirs.values():
            if directory is not None and directory.is_dir():
                names = subdirectories(directory)
                if not names:
                    raise DatasetLayoutError(
                        f"{str(directory)!r} has no class folders; expected {self.layout}"
                    )
                return names
        raise DatasetLayoutError(
            f"no split folder found under {str(self.root)!r}; expected {self.layout}"
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _records(self, directory: Path | None, split: str) -> list[ImageRecord]:
        if directory is None:
            hint = " or set val_fraction" if split == "val" else ""
            raise DatasetLayoutError(
                f"the {split} split has no folder ({split}_dir is None{hint}); expected {self.layout}"
            )
        require_path(
            directory,
            f"{split} folder",
            self.layout + ("; or set val_fraction" if split == "val" else ""),
        )
        index = {name: i for i, name in enumerate(self.class_names)}
        stray = image_files(directory, self.extensions)
        if stray:
            raise DatasetLayoutError(
                f"{str(directory)!r} holds images outside class folders (e.g. "
                f"{str(stray[0])!r}); expected {self.layout}"
            )
        records: list[ImageRecord] = []
        for name in subdirectories(directory):
            if name not in index:
                raise DatasetLayoutError(
                    f"class folder {str(directory / name)!r} is not one of the classes "
                    f"{self.class_names}; expected {self.layout}"
                )
            found = image_files(directory / name, self.extensions, recursive=True)
            records.extend(ImageRecord(path, index[name]) for path in found)
        if not records:
            raise DatasetLayoutError(f"no images under {str(directory)!r}; expected {self.layout}")
        return records

    @cached_property
    def _train_split(self) -> tuple[list[ImageRecord], list[ImageRecord]]:
        """``(train, val)`` records; ``val`` is empty unless ``val_fraction`` > 0."""
        records = self._records(self.split_dirs["train"], "train")
        if self.val_fraction == 0:
            return records, []
        kept, held = stratified_holdout(
            [r.label for r in records], self.val_fraction, self.split_seed
        )
        return [records[i] for i in kept], [records[i] for i in held]

    def split_source(self, split: str) -> str:
        """``ImageFolder <root name>/<folder>``: the folder ``split`` reads (the train folder
        for a ``val_fraction`` hold-out), so ``val_dir: test`` gives val the test's source
        (:mod:`datamodules.split_source`)."""
        held_out = split == "val" and self.val_fraction > 0
        directory = self.split_dirs["train" if held_out else split]
        folder = "<none>" if directory is None else directory.relative_to(self.root).as_posix()
        return f"ImageFolder {self.root.resolve().name}/{folder}"

    def build_dataset(self, split: str) -> Dataset:
        if split == "train":
            records = self._train_split[0]
        elif split == "val" and self.val_fraction > 0:
            records = self._train_split[1]
            if not records:
                raise DatasetLayoutError(
                    f"val_fraction={self.val_fraction} holds out no image of "
                    f"{str(self.split_dirs['train'])!r}; raise it or add a val folder"
                )
        else:
            records = self._records(self.split_dirs[split], split)
        return RecordDataset(records, self.transform(split))
