"""ImageNet-1k (ILSVRC2012) with optional localisation boxes and ImageNet-S masks.

On-disk formats read (paths relative to ``root``; ``train_dir``/``val_dir`` rename the two
image folders, e.g. ``ILSVRC/Data/CLS-LOC/val`` for the Kaggle copy):

* **Class folders**: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (``valprep.sh`` layout,
  file names kept: ``val/n01751748/ILSVRC2012_val_00000001.JPEG``).
* **Flat validation folder**: ``val/ILSVRC2012_val_00000001.JPEG ...`` plus a label file,
  either

  - ``LOC_val_solution.csv`` (Kaggle): header ``ImageId,PredictionString``; a row
    ``ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295`` holds
    groups of ``wnid x1 y1 x2 y2``; the first wnid is the label; or
  - ``ILSVRC2012_validation_ground_truth.txt`` (devkit): line ``i`` is the 1-based
    ``ILSVRC2012_ID`` of ``ILSVRC2012_val_{i:08d}.JPEG``. These ids follow the devkit's
    ``meta.mat`` synset order (id 1 = n02119789, kit fox), **not** the sorted-wnid class
    order, so the file needs ``ground_truth_synsets``: the devkit ``data/meta.mat``
    (``synsets`` struct with ``ILSVRC2012_ID``/``WNID``; read with scipy) or a text file whose
    line ``k`` starts with the wnid of id ``k``. Passing a sorted list here is accepted only
    for ground-truth files renumbered into sorted order; the official file (first id 490)
    with a sorted mapping is refused, since it would mislabel ~all images.

* **Classes**: index order = the order of ``LOC_synset_mapping.txt`` (``n01440764 tench,
  Tinca tinca`` per line; the standard file is sorted by wnid) when present (or the file
  given as ``synsets``), else the sorted wnids of the ``train`` class folders, else of the
  ``val`` class folders, else of the label file. Class names are the text after the wnid in
  the mapping file, else the wnids.

* **Boxes** (``boxes=True``, val/test only) from ``LOC_val_solution.csv``: all boxes of the
  image's own class. The ILSVRC box annotations are PASCAL VOC XML, whose coordinates are
  1-based *inclusive* pixel indices (the VOC/ILSVRC devkits measure a box as
  ``x2 - x1 + 1`` pixels wide), so ``(x1, y1, x2, y2)`` becomes the pixel-edge box
  ``(x1 - 1, y1 - 1, x2, y2)``, clamped to the image. If a file were 0-based instead, the
  error is at most one original pixel on the left/top edges.

* **ImageNet-S masks** (``imagenet_s_root``, val/test only):
  ``<imagenet_s_root>/ImageNetS{50,300,919}/validation-segmentation/<wnid>/<image stem>.png``
  (RGB PNG, id = R + 256·G, 0 = other/background, 1000 = ignore). ImageNet-S numbers its
  classes 1..N by the **sorted** wnids of its category list (``ImageNetS_categories_imN.txt``
  from the ImageNet-S repository, given as ``imagenet_s_categories`` or found next to the
  split folder; without it, the wnid folder names of ``validation-segmentation`` — which must
  then number exactly N). A mask's object class is the wnid of the folder it lies in (for
  S-919 five ImageNet classes are merged into others, e.g. n04356056 → n04355933; their
  images lie in the merged-into folder), and ``mask`` = pixels whose id is that class's id;
  ignore pixels are not object. Only images with a mask file are in the split; labels stay
  ImageNet-1k class indices.

The ``test`` split is the validation set (ImageNet's test labels are not public).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from datamodules.base import DatasetLayoutError, FileDataModule, require_path
from datamodules.file_lists import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    RecordDataset,
    image_files,
    subdirectories,
)
from datamodules.transforms import DEFAULT_TRANSFORM, TransformConfig

WNID = re.compile(r"^n\d{8}$")
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d+)$")
LOC_SYNSET_MAPPING = "LOC_synset_mapping.txt"
LOC_VAL_SOLUTION = "LOC_val_solution.csv"
GROUND_TRUTH_FILES = (
    "ILSVRC2012_validation_ground_truth.txt",
    "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
)
DEVKIT_META = "ILSVRC2012_devkit_t12/data/meta.mat"
OFFICIAL_GROUND_TRUTH_FIRST_ID = 490  # ILSVRC2012_val_00000001 (sea snake) in devkit ids
IMAGENET_S_IGNORE = 1000
IMAGENET_S_MERGED = {  # ImageNet-S-919: ImageNet wnid -> the S class it was merged into
    "n04356056": "n04355933",
    "n04493381": "n02808440",
    "n03642806": "n03832673",
    "n04008634": "n03773504",
    "n03887697": "n15075141",
}


def read_synset_mapping(path: Path) -> tuple[list[str], list[str]]:
    """``(wnids, names)`` from a ``LOC_synset_mapping.txt``-style file, in file order: one
    ``<wnid> <name text>`` per line (the name may be missing: the wnid is used)."""
    wnids: list[str] = []
    names: list[str] = []
    expected = "one '<wnid> <class name>' per line, e.g. 'n01440764 tench, Tinca tinca'"
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not WNID.match(wnid):
            raise DatasetLayoutError(
                f"line {number} of {str(path)!r} does not start with a wnid ({line!r}); expected {expected}"
            )
        wnids.append(wnid)
        names.append(name.strip() or wnid)
    if not wnids:
        raise DatasetLayoutError(f"{str(path)!r} lists no classes; expected {expected}")
    if len(set(wnids)) != len(wnids):
        raise DatasetLayoutError(f"{str(path)!r} lists a wnid twice; expected {expected}")
    return wnids, names


def read_loc_solution(path: Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """``ImageId -> [(wnid, [x1, y1, x2, y2] as in the file), ...]`` from
    ``LOC_val_solution.csv`` (header ``ImageId,PredictionString``; the string holds groups of
    ``wnid x1 y1 x2 y2``; coordinates are returned unconverted)."""
    expected = (
        "a CSV with header 'ImageId,PredictionString' and rows of an image id and groups of "
        "'wnid x1 y1 x2 y2', e.g. 'ILSVRC2012_val_00000001,n01751748 111 108 441 193'"
    )
    solution: dict[str, list[tuple[str, np.ndarray]]] = {}
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise DatasetLayoutError(f"{str(path)!r} has header {header!r}; expected {expected}")
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            tokens = row[1].split() if len(row) > 1 else []
            if len(row) != 2 or not tokens or len(tokens) % 5:
                raise DatasetLayoutError(
                    f"line {number} of {str(path)!r} is malformed ({row!r}); expected {expected}"
                )
            try:
                entries = [
                    (tokens[i], np.array([float(v) for v in tokens[i + 1 : i + 5]], np.float32))
                    for i in range(0, len(tokens), 5)
                ]
            except ValueError as error:
                raise DatasetLayoutError(
                    f"line {number} of {str(path)!r} has a non-numeric coordinate ({row!r}); "
                    f"expected {expected}"
                ) from error
            solution[row[0].strip()] = entries
    return solution


def loc_boxes_to_pixel_edges(boxes: np.ndarray) -> np.ndarray:
    """ILSVRC/VOC boxes (1-based inclusive pixel indices ``x1 y1 x2 y2``) to pixel-edge xyxy:
    ``(x1 - 1, y1 - 1, x2, y2)``; a box over pixel columns 1..10 (1-based) covers edges 0..10."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([boxes[:, :2] - 1.0, boxes[:, 2:]], axis=1)


def read_ground_truth(path: Path) -> list[int]:
    """The 1-based class ids of ``ILSVRC2012_validation_ground_truth.txt`` (one per line)."""
    try:
        return [int(line) for line in path.read_text().split()]
    except ValueError as error:
        raise DatasetLayoutError(
            f"{str(path)!r} is not a list of integers; expected one 1-based ILSVRC2012_ID per "
            "line, line i for ILSVRC2012_val_{i:08d}.JPEG"
        ) from error


def read_devkit_synsets(path: Path) -> list[str]:
    """Wnids in ILSVRC2012_ID order (element ``k - 1`` is the wnid of id ``k``): from the
    devkit's ``meta.mat`` (leaf synsets, ``num_children == 0``, sorted by their id field) or
    from a text file whose line ``k`` starts with the wnid of id ``k``."""
    expected = (
        "the devkit's data/meta.mat, or a text file whose line k starts with the wnid of "
        "ILSVRC2012_ID k"
    )
    if path.suffix.lower() == ".mat":
        from scipy.io import loadmat

        try:
            synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        except (KeyError, ValueError, OSError) as error:
            raise DatasetLayoutError(
                f"{str(path)!r} has no readable 'synsets' struct; expected {expected}"
            ) from error
        fields = synsets.dtype.names or ()
        id_field = next((f for f in fields if f.upper().endswith("_ID")), None)
        if id_field is None or "WNID" not in fields:
            raise DatasetLayoutError(
                f"the synsets of {str(path)!r} have fields {fields}; expected an "
                "ILSVRC2012_ID field and a WNID field"
            )
        rows = np.atleast_1d(synsets)
        if "num_children" in fields:
            rows = rows[np.asarray(rows["num_children"]).astype(int) == 0]
        pairs = sorted((int(row[id_field]), str(row["WNID"])) for row in rows)
        return [wnid for _, wnid in pairs]
    return read_wnid_list(path, expected)


def read_wnid_list(path: Path, expected: str = "one wnid per line") -> list[str]:
    """The first token of every non-empty line, each a wnid, in file order."""
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    bad = [w for w in wnids if not WNID.match(w)]
    if not wnids or bad:
        raise DatasetLayoutError(
            f"{str(path)!r} is not a wnid list ({bad[:3]}); expected {expected}"
        )
    return wnids


def read_imagenet_s_mask(path: Path, class_id: int) -> np.ndarray:
    """``[H, W]`` bool: the pixels of an ImageNet-S PNG (id = R + 256·G) equal to ``class_id``."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetLayoutError(
            f"mask file {str(path)!r} cannot be read ({error}); expected an RGB PNG with class "
            "id = R + 256·G"
        ) from error
    return (rgb[..., 0] + 256 * rgb[..., 1]) == class_id


class ImageNetDataModule(FileDataModule):
    """ImageNet-1k classification with optional boxes (val) and ImageNet-S masks (val).

    See the module docstring for every on-disk format and convention.

    Args:
        root: the ImageNet directory.
        train_dir, val_dir: image folders inside ``root`` (class folders; val may be flat).
        synsets: class list file (``LOC_synset_mapping.txt`` format) defining class order and
            names; default ``<root>/LOC_synset_mapping.txt`` when present.
        val_labels: label file of a flat val folder (``.csv`` = ``LOC_val_solution.csv``
            format, else the devkit ground-truth format); default: the first of
            ``LOC_val_solution.csv``, ``ILSVRC2012_validation_ground_truth.txt``,
            ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` found.
        ground_truth_synsets: ILSVRC2012_ID → wnid mapping for the devkit ground truth
            (``meta.mat`` or text); default ``<root>/ILSVRC2012_devkit_t12/data/meta.mat``.
        boxes: add ``boxes`` to val/test samples, from ``box_file`` (default
            ``<root>/LOC_val_solution.csv``).
        imagenet_s_root, imagenet_s_split, imagenet_s_categories: ImageNet-S masks (the
            directory holding ``ImageNetS{N}/``, the split N, and optionally the
            ``ImageNetS_categories_imN.txt`` file); val/test then hold only the images with a
            mask.

    ``synsets``, ``val_labels``, ``ground_truth_synsets`` and ``box_file`` may be relative to
    ``root``; the ImageNet-S paths are taken as given. Remaining arguments: see
    :class:`~datamodules.base.FileDataModule`.
    """

    def __init__(
        self,
        root: str | Path = "data/imagenet",
        train_dir: str = "train",
        val_dir: str = "val",
        synsets: str | None = None,
        val_labels: str | None = None,
        ground_truth_synsets: str | None = None,
        boxes: bool = False,
        box_file: str | None = None,
        imagenet_s_root: str | None = None,
        imagenet_s_split: Literal[50, 300, 919] = 50,
        imagenet_s_categories: str | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        transform: TransformConfig = DEFAULT_TRANSFORM,
    ) -> None:
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, transform=transform)
        self.save_hyperparameters()
        if imagenet_s_split not in (50, 300, 919):
            raise ValueError(f"imagenet_s_split must be 50, 300 or 919, got {imagenet_s_split}")
        self.train_dir = self.root / train_dir
        self.val_dir = self.root / val_dir
        self.synsets = self._file(synsets)
        self.val_labels = self._file(val_labels)
        self.ground_truth_synsets = self._file(ground_truth_synsets)
        self.with_boxes = boxes
        self.box_file = self._file(box_file) or self.root / LOC_VAL_SOLUTION
        self.imagenet_s_root = None if imagenet_s_root is None else Path(imagenet_s_root)
        self.imagenet_s_split = imagenet_s_split
        self.imagenet_s_categories = (
            None if imagenet_s_categories is None else Path(imagenet_s_categories)
        )

    def _file(self, value: str | None) -> Path | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def layout(self) -> str:
        """The expected structure, for error messages."""
        return (
            f"class folders {self.train_dir}/<wnid>/*.JPEG and {self.val_dir}/<wnid>/*.JPEG, or a "
            f"flat {self.val_dir}/ILSVRC2012_val_XXXXXXXX.JPEG with {self.root / LOC_VAL_SOLUTION} "
            f"or {self.root / GROUND_TRUTH_FILES[0]} (+ the devkit's meta.mat); optional "
            f"{self.root / LOC_SYNSET_MAPPING} (class order and names)"
        )

    # ----------------------------------------------------------------- classes
    @cached_property
    def _classes(self) -> tuple[list[str], list[str]]:
        mapping = self.synsets or self.root / LOC_SYNSET_MAPPING
        if self.synsets is not None or mapping.is_file():
            require_path(mapping, "ImageNet class list", f"{LOC_SYNSET_MAPPING}-style lines")
            return read_synset_mapping(mapping)
        require_path(self.root, "ImageNet root", self.layout)
        for directory in (self.train_dir, self.val_dir):
            if directory.is_dir():
                folders = self._wnid_folders(directory)
                if folders:
                    return folders, list(folders)
        wnids = sorted(set(self._flat_label_wnids().values()))
        return wnids, list(wnids)

    @property
    def wnids(self) -> list[str]:
        """The wnid of every class index."""
        return self._classes[0]

    @property
    def num_classes(self) -> int:
        return len(self._classes[0])

    @property
    def class_names(self) -> list[str]:
        return self._classes[1]

    @cached_property
    def _class_index(self) -> dict[str, int]:
        return {wnid: i for i, wnid in enumerate(self.wnids)}

    def _wnid_folders(self, directory: Path) -> list[str]:
        """Sorted class folders of ``directory``; any folder that is not a wnid is an error."""
        folders = subdirectories(directory)
        bad = [name for name in folders if not WNID.match(name)]
        if bad:
            raise DatasetLayoutError(
                f"{str(directory)!r} holds folders that are not wnids ({bad[:3]}); expected "
                f"{self.layout}"
            )
        return folders

    # ----------------------------------------------------------------- splits
    def split_source(self, split: str) -> str:
        """``ImageNet-1k/val`` (the val and test splits) or ``ImageNet-1k/train``
        (:mod:`datamodules.split_source`)."""
        return f"ImageNet-1k/{'train' if split == 'train' else 'val'}"

    def build_dataset(self, split: str) -> Dataset:
        if split == "test":
            return self.dataset("val")
        if split == "train":
            records = self._class_folder_records(self.train_dir)
            return RecordDataset(records, self.transform(split))
        records = self._val_records()
        mask_reader = None
        if self.imagenet_s_root is not None:
            records = self._attach_masks(records)
            mask_reader = read_imagenet_s_mask
        return RecordDataset(records, self.transform(split), self.with_boxes, mask_reader)

    def _class_folder_records(self, directory: Path) -> list[ImageRecord]:
        require_path(directory, "ImageNet image folder", self.layout)
        folders = self._wnid_folders(directory)
        if not folders:
            raise DatasetLayoutError(
                f"{str(directory)!r} has no class folders; expected {self.layout}"
            )
        records: list[ImageRecord] = []
        for wnid in folders:
            if wnid not in self._class_index:
                raise DatasetLayoutError(
                    f"class folder {str(directory / wnid)!r} is not in the class list "
                    f"({self.synsets or self.root / LOC_SYNSET_MAPPING}); expected {self.layout}"
                )
            label = self._class_index[wnid]
            records.extend(
                ImageRecord(path, label) for path in image_files(directory / wnid, IMAGE_EXTENSIONS)
            )
        if not records:
            raise DatasetLayoutError(f"no images under {str(directory)!r}; expected {self.layout}")
        return records

    def _val_records(self) -> list[ImageRecord]:
        require_path(self.val_dir, "ImageNet validation folder", self.layout)
        flat_files = image_files(self.val_dir, IMAGE_EXTENSIONS)
        if flat_files:
            labels = self._flat_label_wnids()
            records = []
            for path in flat_files:
                if path.stem not in labels:
                    raise DatasetLayoutError(
                        f"image {str(path)!r} has no label in {str(self._label_file())!r}; "
                        f"expected {self.layout}"
                    )
                wnid = labels[path.stem]
                if wnid not in self._class_index:
                    raise DatasetLayoutError(
                        f"the label {wnid} of {str(path)!r} is not in the class list; expected "
                        f"{self.layout}"
                    )
                records.append(ImageRecord(path, self._class_index[wnid]))
        else:
            records = self._class_folder_records(self.val_dir)
        if self.with_boxes:
            records = self._attach_boxes(records)
        return records

    def _label_file(self) -> Path:
        if self.val_labels is not None:
            return require_path(self.val_labels, "ImageNet validation label file", self.layout)
        for name in (LOC_VAL_SOLUTION, *GROUND_TRUTH_FILES):
            if (self.root / name).is_file():
                return self.root / name
        raise DatasetLayoutError(
            f"the flat validation folder {str(self.val_dir)!r} needs a label file, none found "
            f"(looked for {[str(self.root / n) for n in (LOC_VAL_SOLUTION, *GROUND_TRUTH_FILES)]}); "
            f"expected {self.layout}"
        )

    @cached_property
    def _flat_labels(self) -> dict[str, str]:
        """Image stem → wnid of the flat validation folder's label file."""
        path = self._label_file()
        if path.suffix.lower() == ".csv":
            return {image: entries[0][0] for image, entries in read_loc_solution(path).items()}
        ids = read_ground_truth(path)
        mapping_path = self.ground_truth_synsets or self.root / DEVKIT_META
        require_path(
            mapping_path,
            f"ILSVRC2012_ID → wnid mapping for {path.name}",
            "the devkit's ILSVRC2012_devkit_t12/data/meta.mat, or a text file whose line k "
            "starts with the wnid of ILSVRC2012_ID k (give it as ground_truth_synsets)",
        )
        id_wnids = read_devkit_synsets(mapping_path)
        if id_wnids == sorted(id_wnids) and ids[:1] == [OFFICIAL_GROUND_TRUTH_FIRST_ID]:
            raise DatasetLayoutError(
                f"{str(path)!r} looks like the official devkit ground truth (first id "
                f"{OFFICIAL_GROUND_TRUTH_FIRST_ID}) whose ids follow the devkit's meta.mat order, "
                f"but the mapping {str(mapping_path)!r} is in sorted-wnid order; give the devkit's "
                "meta.mat (or its id order as text) as ground_truth_synsets"
            )
        bad = [i for i in ids if not 1 <= i <= len(id_wnids)]
        if bad:
            raise DatasetLayoutError(
                f"{str(path)!r} has ids outside 1..{len(id_wnids)} of {str(mapping_path)!r} "
                f"(e.g. {bad[0]})"
            )
        return {f"ILSVRC2012_val_{i:08d}": id_wnids[k - 1] for i, k in enumerate(ids, start=1)}

    def _flat_label_wnids(self) -> dict[str, str]:
        require_path(self.root, "ImageNet root", self.layout)
        if not self.val_dir.is_dir():
            raise DatasetLayoutError(
                f"no class folders in {str(self.train_dir)!r} or {str(self.val_dir)!r}; "
                f"expected {self.layout}"
            )
        return self._flat_labels

    def _attach_boxes(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        path = require_path(
            self.box_file,
            "ImageNet box file",
            f"{LOC_VAL_SOLUTION} (ImageId,PredictionString with 'wnid x1 y1 x2 y2' groups)",
        )
        solution = read_loc_solution(path)
        attached = []
        for record in records:
            entries = solution.get(record.path.stem)
            if entries is None:
                raise DatasetLayoutError(
                    f"image {str(record.path)!r} has no row (ImageId {record.path.stem}) in "
                    f"{str(path)!r}; expected one row per validation image"
                )
            wnid = self.wnids[record.label]
            if entries[0][0] != wnid:
                raise DatasetLayoutError(
                    f"image {str(record.path)!r} is labelled {wnid} but {str(path)!r} labels it "
                    f"{entries[0][0]}"
                )
            raw = np.stack([box for entry_wnid, box in entries if entry_wnid == wnid])
            attached.append(ImageRecord(record.path, record.label, loc_boxes_to_pixel_edges(raw)))
        return attached

    # ----------------------------------------------------------------- ImageNet-S
    def _segmentation_dir(self) -> Path:
        assert self.imagenet_s_root is not None
        split = f"ImageNetS{self.imagenet_s_split}"
        base = self.imagenet_s_root
        if base.name != split:
            base = base / split
        return require_path(
            base / "validation-segmentation",
            f"ImageNet-S-{self.imagenet_s_split} validation masks",
            f"{base}/validation-segmentation/<wnid>/<image stem>.png (RGB PNG, id = R + 256·G)",
        )

    def _imagenet_s_class_ids(self, segmentation: Path, folders: list[str]) -> dict[str, int]:
        """S wnid → ImageNet-S class id (1-based rank among the sorted S wnids)."""
        n = self.imagenet_s_split
        name = f"ImageNetS_categories_im{n}.txt"
        candidates = (
            [self.imagenet_s_categories]
            if self.imagenet_s_categories is not None
            else [segmentation.parent / name, segmentation.parent.parent / name]
        )
        categories = next((p for p in candidates if p.is_file()), None)
        if self.imagenet_s_categories is not None and categories is None:
            require_path(
                self.imagenet_s_categories, "ImageNet-S category list", "one wnid per line"
            )
        if categories is not None:
            wnids = read_wnid_list(categories, f"one ImageNet-S-{n} wnid per line ({name})")
        elif len(folders) == n:
            wnids = folders
        else:
            raise DatasetLayoutError(
                f"{str(segmentation)!r} has {len(folders)} class folders, not {n}, and no "
                f"category list was found (looked for {[str(p) for p in candidates]}); give "
                f"{name} from the ImageNet-S repository as imagenet_s_categories"
            )
        if len(wnids) != n or len(set(wnids)) != n:
            raise DatasetLayoutError(
                f"the ImageNet-S-{n} category list {str(categories)!r} has {len(set(wnids))} "
                f"distinct wnids; expected {n}"
            )
        return {wnid: rank for rank, wnid in enumerate(sorted(wnids), start=1)}

    def _attach_masks(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        segmentation = self._segmentation_dir()
        folders = subdirectories(segmentation)
        class_ids = self._imagenet_s_class_ids(segmentation, folders)
        masks: dict[str, tuple[str, Path]] = {}
        for folder in folders:
            if folder not in class_ids:
                raise DatasetLayoutError(
                    f"mask folder {str(segmentation / folder)!r} is not an ImageNet-S-"
                    f"{self.imagenet_s_split} class; expected "
                    f"{segmentation}/<wnid>/<image stem>.png"
                )
            for path in image_files(segmentation / folder, (".png",)):
                masks[path.stem] = (folder, path)
        kept = []
        for record in records:
            found = masks.get(record.path.stem)
            if found is None:
                continue
            folder, mask_path = found
            wnid = self.wnids[record.label]
            if folder != wnid and IMAGENET_S_MERGED.get(wnid) != folder:
                raise DatasetLayoutError(
                    f"the mask {str(mask_path)!r} lies in class folder {folder} but its image "
                    f"{str(record.path)!r} is labelled {wnid}"
                )
            kept.append(
                ImageRecord(record.path, record.label, record.boxes, mask_path, class_ids[folder])
            )
        if not kept:
            raise DatasetLayoutError(
                f"no mask in {str(segmentation)!r} matches an image of {str(self.val_dir)!r} "
                "(masks are matched by file stem: <wnid>/ILSVRC2012_val_XXXXXXXX.png)"
            )
        return kept
