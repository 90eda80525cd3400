"""Stanford Cars: 196 car models (make, model, year), one box per image.

On-disk format (the original devkit release, as torchvision's ``StanfordCars`` also expects;
``root`` is that folder or a folder holding it as ``stanford_cars/``)::

    devkit/cars_meta.mat             class_names: 1×196 cell of strings
    devkit/cars_train_annos.mat      annotations: 1×8144 struct, fields bbox_x1, bbox_y1,
                                     bbox_x2, bbox_y2, class, fname
    cars_test_annos_withlabels.mat   annotations: 1×8041 struct, the same fields
                                     (also accepted inside devkit/)
    cars_train/<fname>.jpg           (also cars_train/cars_train/, the Kaggle mirror's nesting)
    cars_test/<fname>.jpg

The ``.mat`` files are read with ``scipy.io.loadmat``; the reader accepts a 1×N or N×1
struct array whose fields are 1×1 arrays (what ``loadmat`` returns for the real files) as well
as already squeezed fields, and a cell array of names in any orientation.

Conventions:

* labels are ``class - 1`` (``0..195``), ``class_names`` the strings of ``cars_meta.mat``.
* the devkit boxes are 1-based inclusive pixel indices; ``boxes`` ``[1, 4]`` are 0-based
  pixel-edge xyxy: ``x1' = x1 − 1, y1' = y1 − 1, x2' = x2, y2' = y2`` (a box over 1-based
  columns 1..10 covers 0-based columns 0..9, i.e. edges ``[0, 10]``), then follow the transform.
* splits: ``train`` = ``cars_train_annos.mat``, ``test`` = ``cars_test_annos_withlabels.mat``;
  ``val`` is a seeded per-class fraction ``val_fraction`` (default 0.1, about 4 images per
  class) of train, removed from ``train`` — so a confusion matrix of ``val`` (CASE's contrast
  classes) never comes from the test images it explains; ``val_fraction=0`` makes ``val`` the
  test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from datamodules._annotation_files import holdout_split, load_mat, mat_records, mat_value
from datamodules.base import DatasetLayoutError, FileDataModule, load_rgb, require_path
from datamodules.transforms import DEFAULT_TRANSFORM, SampleTransform, TransformConfig

EXPECTED_LAYOUT = (
    "the Stanford Cars devkit layout: <root>/devkit/cars_meta.mat, "
    "<root>/devkit/cars_train_annos.mat, <root>/cars_test_annos_withlabels.mat, "
    "<root>/cars_train/*.jpg, <root>/cars_test/*.jpg (or the same under <root>/stanford_cars/)"
)
ANNOTATION_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
ANNOTATIONS_EXPECTED = (
    "a .mat file with a variable 'annotations': a 1×N struct array with fields "
    + ", ".join(ANNOTATION_FIELDS)
)


@dataclass(frozen=True)
class CarsRecord:
    """One image: file name, label (0-based), pixel-edge xyxy box."""

    fname: str
    label: int
    box: tuple[float, float, float, float]


def resolve_cars_dir(root: Path) -> Path:
    """``root`` if it holds ``devkit/``, else ``root/stanford_cars`` if that does."""
    require_path(root, "Stanford Cars root", EXPECTED_LAYOUT)
    for candidate in (root, root / "stanford_cars"):
        if (candidate / "devkit").is_dir():
            return candidate
    raise DatasetLayoutError(
        f"no devkit/ folder in {str(root)!r} or {str(root / 'stanford_cars')!r}; expected "
        f"{EXPECTED_LAYOUT}"
    )


def read_class_names(meta_path: Path) -> list[str]:
    """The ``class_names`` cell array of ``cars_meta.mat``."""
    expected = "a .mat file with a variable 'class_names': a 1×196 cell array of strings"
    contents = load_mat(meta_path, expected)
    if "class_names" not in contents:
        raise DatasetLayoutError(
            f"{str(meta_path)!r} has no variable 'class_names'; expected {expected}"
        )
    try:
        return [str(mat_value(name)) for name in contents["class_names"].ravel()]
    except (ValueError, AttributeError) as error:
        raise DatasetLayoutError(f"{str(meta_path)!r}: {error}; expected {expected}") from error


def read_annotations(path: Path, num_classes: int) -> list[CarsRecord]:
    """The ``annotations`` struct array of a devkit ``.mat`` file, boxes made pixel-edge."""
    contents = load_mat(path, ANNOTATIONS_EXPECTED)
    if "annotations" not in contents:
        raise DatasetLayoutError(
            f"{str(path)!r} has no variable 'annotations' (found "
            f"{sorted(k for k in contents if not k.startswith('__'))}); expected "
            f"{ANNOTATIONS_EXPECTED}"
        )
    try:
        rows = mat_records(contents["annotations"], ANNOTATION_FIELDS)
    except KeyError as error:
        raise DatasetLayoutError(
            f"{str(path)!r}: the annotations have no field {error}; expected {ANNOTATIONS_EXPECTED}"
        ) from error
    except (ValueError, TypeError, IndexError) as error:
        raise DatasetLayoutError(
            f"{str(path)!r}: {error}; expected {ANNOTATIONS_EXPECTED}"
        ) from error
    records = []
    for row in rows:
        label = int(row["class"]) - 1
        if not 0 <= label < num_classes:
            raise DatasetLayoutError(
                f"{str(path)!r}: image {row['fname']!r} has class {row['class']}; expected "
                f"1..{num_classes} (the classes of cars_meta.mat)"
            )
        box = (
            float(row["bbox_x1"]) - 1.0,
            float(row["bbox_y1"]) - 1.0,
            float(row["bbox_x2"]),
            float(row["bbox_y2"]),
        )
        records.append(CarsRecord(str(row["fname"]), label, box))
    return records


class StanfordCarsDataset(Dataset):
    """Samples ``{"image", "label", "index", "boxes" [1, 4]}``."""

    def __init__(
        self, images_dir: Path, records: list[CarsRecord], transform: SampleTransform
    ) -> None:
        self.images_dir = images_dir
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = load_rgb(self.images_dir / record.fname)
        tensor, boxes, _ = self.transform(image, torch.tensor([record.box]))
        return {"image": tensor, "label": record.label, "index": index, "boxes": boxes}


class StanfordCarsDataModule(FileDataModule):
    """Stanford Cars (see the module docstring for the on-disk format and conventions).

    Args:
        root: the folder holding ``devkit/``, ``cars_train/``, ``cars_test/`` (or its parent
            holding it as ``stanford_cars/``).
        val_fraction: in (0, 1) (default 0.1) → ``val`` is a seeded per-class fraction of the
            training images (removed from ``train``); 0 → ``val`` is the test split.
        split_seed: seed of that holdout.
        batch_size, num_workers, transform: see :class:`FileDataModule`.
    """

    def __init__(
        self,
        root: str | Path,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 4,
        transform: TransformConfig = DEFAULT_TRANSFORM,
    ) -> None:
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, transform=transform)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self._class_names: list[str] | None = None
        self._annotations: dict[str, list[CarsRecord]] = {}

    @property
    def cars_dir(self) -> Path:
        return resolve_cars_dir(self.root)

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = read_class_names(self.cars_dir / "devkit" / "cars_meta.mat")
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _annotation_path(self, official_split: str) -> Path:
        base = self.cars_dir
        if official_split == "train":
            return require_path(
                base / "devkit" / "cars_train_annos.mat", "training annotations", EXPECTED_LAYOUT
            )
        for candidate in (
            base / "cars_test_annos_withlabels.mat",
            base / "devkit" / "cars_test_annos_withlabels.mat",
        ):
            if candidate.is_file():
                return candidate
        raise DatasetLayoutError(
            f"test annotations not found at {str(base / 'cars_test_annos_withlabels.mat')!r} "
            f"(nor in devkit/); expected {EXPECTED_LAYOUT}. The labelled test annotations are "
            "distributed separately from the devkit (cars_test_annos_withlabels.mat)"
        )

    def _images_dir(self, official_split: str) -> Path:
        folder = require_path(
            self.cars_dir / f"cars_{official_split}", "Stanford Cars image folder", EXPECTED_LAYOUT
        )
        nested = folder / f"cars_{official_split}"
        return nested if nested.is_dir() else folder

    def annotations(self, official_split: str) -> list[CarsRecord]:
        """The records of ``train`` or ``test`` in file order, parsed once."""
        if official_split not in self._annotations:
            path = self._annotation_path(official_split)
            self._annotations[official_split] = read_annotations(path, self.num_classes)
        return self._annotations[official_split]

    def split_source(self, split: str) -> str:
        """``Stanford Cars/test`` or ``…/train`` (:mod:`datamodules.split_source`)."""
        held_out = split == "val" and self.val_fraction > 0
        return f"Stanford Cars/{'train' if split == 'train' or held_out else 'test'}"

    def build_dataset(self, split: str) -> StanfordCarsDataset:
        if split == "test" or (split == "val" and self.val_fraction == 0.0):
            records, official = self.annotations("test"), "test"
        else:
            train = self.annotations("train")
            held_out = holdout_split([r.label for r in train], self.val_fraction, self.split_seed)
            records = [r for r, out in zip(train, held_out, strict=True) if out == (split == "val")]
            official = "train"
        return StanfordCarsDataset(self._images_dir(official), records, self.transform(split))
