"""CUB-200-2011 (Caltech-UCSD Birds): 200 bird species, boxes, optional masks, class attributes.

On-disk format (the official ``CUB_200_2011.tgz``; ``root`` is either the extracted
``CUB_200_2011/`` folder or the folder that contains it)::

    CUB_200_2011/
        images.txt                  "<image_id> <relative path>"  e.g. "1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
        image_class_labels.txt      "<image_id> <class_id>"       class ids 1..200
        train_test_split.txt        "<image_id> <is_training_image>"  1 = train, 0 = test
        bounding_boxes.txt          "<image_id> <x> <y> <width> <height>"  floats, pixels
        classes.txt                 "<class_id> <class folder>"   e.g. "1 001.Black_footed_Albatross"
        images/<class folder>/<name>.jpg
        attributes/class_attribute_labels_continuous.txt   200 lines × 312 floats in 0..100
        attributes/attributes.txt   (some copies) "<attribute_id> <name>"
    attributes.txt                  (the official archive puts the attribute names next to
                                     CUB_200_2011/, not inside it)

Segmentations (the separate ``segmentations.tgz``) live in ``<segmentations_root>/<class
folder>/<name>.png``: grey-level PNGs of the image's size whose value is the fraction of
annotators (× 255) who marked the pixel as bird.

Conventions:

* labels are the class ids minus one (``0..199``); ``class_names`` are the folder names without
  the ``"001."`` prefix and with ``_`` → space (``"Black footed Albatross"``);
  ``class_dirnames`` keeps the raw folder names.
* ``boxes`` ``[1, 4]`` are pixel-edge xyxy: ``x1 = x, y1 = y, x2 = x + width,
  y2 = y + height`` (CUB's ``x, y`` is the top-left corner, ``width/height`` the extent), then
  they follow the transform.
* splits: ``train`` = ``is_training_image == 1`` (5,994 images), ``test`` = 0 (5,794);
  ``val`` is a seeded per-class fraction ``val_fraction`` (default 0.1, 3 images per class) of
  the official training images, which are then removed from ``train`` — so a confusion
  matrix of ``val`` (CASE's contrast classes) never comes from the test images it explains;
  ``val_fraction=0`` makes ``val`` the test split (the common practice for accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules._annotation_files import holdout_split, read_rows
from datamodules.base import DatasetLayoutError, FileDataModule, load_rgb, require_path
from datamodules.transforms import DEFAULT_TRANSFORM, SampleTransform, TransformConfig

ANNOTATION_FILES = (
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "classes.txt",
)
EXPECTED_LAYOUT = (
    "the CUB-200-2011 layout: <root>/CUB_200_2011/ (or <root> itself) holding images.txt, "
    "image_class_labels.txt, train_test_split.txt, bounding_boxes.txt, classes.txt and "
    "images/<class folder>/<name>.jpg (extract CUB_200_2011.tgz from "
    "https://www.vision.caltech.edu/datasets/cub_200_2011/)"
)
ATTRIBUTES_FILE = "attributes/class_attribute_labels_continuous.txt"
NUM_ATTRIBUTES = 312


@dataclass(frozen=True)
class CUBRecord:
    """One image: CUB id, path relative to ``images/``, label (0-based), pixel-edge xyxy box."""

    image_id: int
    relpath: str
    label: int
    box: tuple[float, float, float, float]
    is_train: bool


def resolve_cub_dir(root: Path) -> Path:
    """``root/CUB_200_2011`` if it holds ``images.txt``, else ``root`` if it does; otherwise a
    :class:`DatasetLayoutError` naming ``root`` and the expected layout."""
    require_path(root, "CUB-200-2011 root", EXPECTED_LAYOUT)
    for candidate in (root / "CUB_200_2011", root):
        if (candidate / "images.txt").is_file():
            return candidate
    raise DatasetLayoutError(
        f"no images.txt in {str(root)!r} or {str(root / 'CUB_200_2011')!r}; expected "
        f"{EXPECTED_LAYOUT}"
    )


def read_class_dirnames(cub_dir: Path) -> list[str]:
    """The class folder names of ``classes.txt`` in class-id order (ids must be 1..K)."""
    rows = read_rows(
        cub_dir / "classes.txt",
        (int, str),
        "<class_id> <class folder>",
        last_column_takes_rest=True,
    )
    ids = [row[0] for row in rows]
    if ids != list(range(1, len(rows) + 1)):
        raise DatasetLayoutError(
            f"{str(cub_dir / 'classes.txt')!r} must list class ids 1..K in order; got {ids[:10]}…"
        )
    return [row[1] for row in rows]


def display_name(dirname: str) -> str:
    """``"001.Black_footed_Albatross"`` → ``"Black footed Albatross"``."""
    prefix, dot, rest = dirname.partition(".")
    name = rest if dot and prefix.isdigit() else dirname
    return name.replace("_", " ")


def read_cub_records(cub_dir: Path, num_classes: int) -> list[CUBRecord]:
    """All images of ``images.txt`` in file order, joined with labels, split flags and boxes."""
    paths = dict(read_rows(cub_dir / "images.txt", (int, str), "<image_id> <relative path>", True))
    labels = dict(
        read_rows(cub_dir / "image_class_labels.txt", (int, int), "<image_id> <class_id>")
    )
    is_train = dict(
        read_rows(cub_dir / "train_test_split.txt", (int, int), "<image_id> <is_training_image>")
    )
    boxes = {
        row[0]: row[1:]
        for row in read_rows(
            cub_dir / "bounding_boxes.txt",
            (int, float, float, float, float),
            "<image_id> <x> <y> <width> <height>",
        )
    }
    records = []
    for image_id, relpath in paths.items():
        for table, name in (
            (labels, "image_class_labels.txt"),
            (is_train, "train_test_split.txt"),
            (boxes, "bounding_boxes.txt"),
        ):
            if image_id not in table:
                raise DatasetLayoutError(
                    f"image id {image_id} of images.txt has no line in "
                    f"{str(cub_dir / name)!r}; expected one line per image id"
                )
        label = labels[image_id] - 1
        if not 0 <= label < num_classes:
            raise DatasetLayoutError(
                f"image id {image_id} has class {labels[image_id]} in "
                f"{str(cub_dir / 'image_class_labels.txt')!r}; expected 1..{num_classes} "
                "(the ids of classes.txt)"
            )
        x, y, w, h = boxes[image_id]
        records.append(
            CUBRecord(image_id, relpath, label, (x, y, x + w, y + h), is_train[image_id] == 1)
        )
    return records


class CUBDataset(Dataset):
    """Samples ``{"image", "label", "index", "image_id", "boxes" [1,4], "mask" [H,W] bool?}``.

    ``mask`` is present when ``segmentation_dir`` is given (``<segmentation_dir>/<relative
    path with .png>``; pixel = bird where the PNG value ≥ ``mask_threshold × 255``)."""

    def __init__(
        self,
        images_dir: Path,
        records: list[CUBRecord],
        transform: SampleTransform,
        segmentation_dir: Path | None = None,
        mask_threshold: float = 0.5,
    ) -> None:
        self.images_dir = images_dir
        self.records = records
        self.transform = transform
        self.segmentation_dir = segmentation_dir
        self.mask_threshold = mask_threshold

    def __len__(self) -> int:
        return len(self.records)

    def _load_mask(self, relpath: str, size: tuple[int, int]) -> torch.Tensor:
        assert self.segmentation_dir is not None
        path = (self.segmentation_dir / relpath).with_suffix(".png")
        image = load_rgb(path).convert("L")
        if image.size != size:
            raise DatasetLayoutError(
                f"segmentation {str(path)!r} is {image.size[0]}×{image.size[1]} but its image is "
                f"{size[0]}×{size[1]}; expected a PNG of the image's size"
            )
        values = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return values.reshape(size[1], size[0]) >= self.mask_threshold * 255

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image: Image.Image = load_rgb(self.images_dir / record.relpath)
        mask = None
        if self.segmentation_dir is not None:
            mask = self._load_mask(record.relpath, image.size)
        tensor, boxes, mask = self.transform(image, torch.tensor([record.box]), mask)
        sample: dict[str, Any] = {
            "image": tensor,
            "label": record.label,
            "index": index,
            "image_id": record.image_id,
            "boxes": boxes,
        }
        if mask is not None:
            sample["mask"] = mask
        return sample


class CUBDataModule(FileDataModule):
    """CUB-200-2011 (see the module docstring for the on-disk format and conventions).

    Args:
        root: the ``CUB_200_2011`` folder or its parent.
        segmentations_root: folder of the CUB segmentation PNGs (``segmentations/`` of
            ``segmentations.tgz``); when given, samples carry ``mask``. A relative path is
            taken relative to ``root``.
        mask_threshold: a pixel is bird where the segmentation value ≥ ``threshold × 255``.
        val_fraction: in (0, 1) (default 0.1) → ``val`` is a seeded per-class fraction of the
            training images (removed from ``train``); 0 → ``val`` is the official test split.
        split_seed: seed of that holdout.
        batch_size, num_workers, transform: see :class:`FileDataModule`.

    Besides ``num_classes`` / ``class_names`` it exposes ``class_dirnames``,
    ``class_attributes`` (``[200, 312]`` float, 0–100) and ``attribute_names``.
    """

    def __init__(
        self,
        root: str | Path,
        segmentations_root: str | Path | None = None,
        mask_threshold: float = 0.5,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 4,
        transform: TransformConfig = DEFAULT_TRANSFORM,
    ) -> None:
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, transform=transform)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 <= mask_threshold <= 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1], got {mask_threshold}")
        self.segmentations_root = None
        if segmentations_root is not None:
            path = Path(segmentations_root).expanduser()
            self.segmentations_root = path if path.is_absolute() else self.root / path
        self.mask_threshold = mask_threshold
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self._class_dirnames: list[str] | None = None
        self._records: list[CUBRecord] | None = None
        self._class_attributes: torch.Tensor | None = None
        self._attribute_names: list[str] | None = None

    @property
    def cub_dir(self) -> Path:
        return resolve_cub_dir(self.root)

    @property
    def class_dirnames(self) -> list[str]:
        """Raw class folder names (``"001.Black_footed_Albatross"``) in label order."""
        if self._class_dirnames is None:
            self._class_dirnames = read_class_dirnames(self.cub_dir)
        return self._class_dirnames

    @property
    def class_names(self) -> list[str]:
        return [display_name(name) for name in self.class_dirnames]

    @property
    def num_classes(self) -> int:
        return len(self.class_dirnames)

    @property
    def class_attributes(self) -> torch.Tensor:
        """``[num_classes, 312]`` float32: per class, the percentage (0–100) of its images in
        which annotators marked each attribute
        (``attributes/class_attribute_labels_continuous.txt``)."""
        if self._class_attributes is None:
            path = self.cub_dir / ATTRIBUTES_FILE
            expected = (
                f"{self.num_classes} lines of {NUM_ATTRIBUTES} space-separated floats (0-100), "
                "one line per class in class-id order"
            )
            rows = read_rows(path, [float] * NUM_ATTRIBUTES, f"{NUM_ATTRIBUTES} floats")
            if len(rows) != self.num_classes:
                raise DatasetLayoutError(
                    f"{str(path)!r} has {len(rows)} lines; expected {expected}"
                )
            self._class_attributes = torch.tensor(rows, dtype=torch.float32)
        return self._class_attributes

    @property
    def attribute_names(self) -> list[str]:
        """The 312 attribute names (``"has_bill_shape::curved_(up_or_down)"``) from
        ``attributes.txt`` next to ``CUB_200_2011/`` (official archive),
        ``CUB_200_2011/attributes/attributes.txt`` or ``CUB_200_2011/attributes.txt``."""
        if self._attribute_names is None:
            cub_dir = self.cub_dir
            candidates = [
                cub_dir / "attributes" / "attributes.txt",
                cub_dir / "attributes.txt",
                cub_dir.parent / "attributes.txt",
            ]
            found = next((path for path in candidates if path.is_file()), None)
            if found is None:
                raise DatasetLayoutError(
                    "attribute names not found; expected 'attributes.txt' (lines "
                    "'<attribute_id> <name>') at one of "
                    + ", ".join(repr(str(path)) for path in candidates)
                )
            rows = read_rows(found, (int, str), "<attribute_id> <name>", True)
            self._attribute_names = [name for _, name in rows]
        return self._attribute_names

    def records(self) -> list[CUBRecord]:
        """All images, parsed once."""
        if self._records is None:
            self._records = read_cub_records(self.cub_dir, self.num_classes)
        return self._records

    def split_records(self, split: str) -> list[CUBRecord]:
        """The records of ``split`` in ``images.txt`` order (see the module docstring)."""
        records = self.records()
        if split == "test" or (split == "val" and self.val_fraction == 0.0):
            return [r for r in records if not r.is_train]
        train = [r for r in records if r.is_train]
        held_out = holdout_split([r.label for r in train], self.val_fraction, self.split_seed)
        return [r for r, out in zip(train, held_out, strict=True) if out == (split == "val")]

    def split_source(self, split: str) -> str:
        """``CUB-200-2011/test`` or ``…/train`` (:mod:`datamodules.split_source`)."""
        held_out = split == "val" and self.val_fraction > 0
        return f"CUB-200-2011/{'train' if split == 'train' or held_out else 'test'}"

    def build_dataset(self, split: str) -> CUBDataset:
        records = self.split_records(split)
        images_dir = require_path(self.cub_dir / "images", "CUB image folder", EXPECTED_LAYOUT)
        segmentation_dir = None
        if self.segmentations_root is not None:
            segmentation_dir = require_path(
                self.segmentations_root,
                "CUB segmentation folder",
                "<segmentations_root>/<class folder>/<name>.png (extract segmentations.tgz of "
                "CUB-200-2011)",
            )
        return CUBDataset(
            images_dir, records, self.transform(split), segmentation_dir, self.mask_threshold
        )
