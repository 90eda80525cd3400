"""File lists built once per split, and the map-style dataset that reads them.

Helpers shared by the folder-based datamodules (ImageNet, ImageFolder): image-extension
filtering, class-folder scans, seeded stratified hold-out splits, and :class:`RecordDataset`,
whose items are dicts in the sample format of DESIGN.md. All file-system scans happen while
the record list is built; ``__getitem__`` only opens the files a record names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.base import DatasetLayoutError, load_rgb
from datamodules.transforms import SampleTransform

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def has_extension(name: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    """Whether a file name ends with one of ``extensions`` (case-insensitive)."""
    lowered = name.lower()
    return any(lowered.endswith(ext.lower()) for ext in extensions)


def subdirectories(directory: Path) -> list[str]:
    """Sorted names of the non-hidden sub-directories of ``directory``."""
    with os.scandir(directory) as entries:
        return sorted(
            entry.name
            for entry in entries
            if entry.is_dir(follow_symlinks=True) and not entry.name.startswith(".")
        )


def image_files(
    directory: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, recursive: bool = False
) -> list[Path]:
    """Sorted image files directly in ``directory`` (or below it with ``recursive``)."""
    if not recursive:
        with os.scandir(directory) as entries:
            return sorted(
                Path(entry.path)
                for entry in entries
                if entry.is_file(follow_symlinks=True) and has_extension(entry.name, extensions)
            )
    found: list[Path] = []
    for folder, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder) / f for f in files if has_extension(f, extensions))
    return sorted(found)


def stratified_holdout(
    labels: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded split of positions into ``(kept, held_out)``, stratified by label.

    Each class gives ``round(n_c * fraction)`` of its ``n_c`` items to the held-out part but
    keeps at least one (a class with a single item stays entirely in ``kept``). The draw uses a
    ``torch.Generator`` seeded with ``seed`` and visits classes in increasing label order, so
    the split depends only on (labels, fraction, seed). Both lists are sorted positions.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must lie strictly in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels_array = np.asarray(labels)
    held_out: list[int] = []
    for label in np.unique(labels_array):
        positions = np.flatnonzero(labels_array == label)
        count = min(round(len(positions) * fraction), len(positions) - 1)
        if count <= 0:
            continue
        order = torch.randperm(len(positions), generator=generator)[:count].numpy()
        held_out.extend(int(p) for p in positions[order])
    held = set(held_out)
    kept = [i for i in range(len(labels_array)) if i not in held]
    return kept, sorted(held_out)


@dataclass(frozen=True)
class ImageRecord:
    """One sample on disk: the image, its label and, where the dataset has them, boxes
    (``[n, 4]`` float32 xyxy pixel-edge coordinates in the original image, not yet clamped) and
    the mask file with the value that marks the sample's object in it."""

    path: Path
    label: int
    boxes: np.ndarray | None = None
    mask_path: Path | None = None
    mask_value: int | None = None


MaskReader = Callable[[Path, int], np.ndarray]


def transform_sample(
    transform: SampleTransform,
    image: Image.Image,
    boxes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``transform(image, boxes, mask)``, also when both ``boxes`` and ``mask`` are None.

    ``SampleTransform`` unpacks the output of its ``v2.Compose``, which returns a bare tensor
    (not a 1-tuple) for a single input, so an image alone would be split into its channels;
    an empty ``[0, 4]`` box tensor keeps the call in the multi-input form and is dropped.
    """
    if boxes is None and mask is None:
        image_t, _, _ = transform(image, torch.zeros(0, 4), None)
        return image_t, None, None
    return transform(image, boxes, mask)


class RecordDataset(Dataset):
    """Map-style dataset over a fixed list of :class:`ImageRecord`.

    Items: ``image`` ``[3, H, W]`` (normalised), ``label`` (int), ``index`` (position in this
    list), ``boxes`` ``[n, 4]`` when ``with_boxes``, ``mask`` ``[H, W]`` bool when
    ``mask_reader`` is given (``mask_reader(mask_path, mask_value)`` returns an ``[H, W]``
    bool array at the image's original size). Boxes are clamped to the image before the
    transform; boxes and masks then follow its resize and crop.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: SampleTransform,
        with_boxes: bool = False,
        mask_reader: MaskReader | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.with_boxes = with_boxes
        self.mask_reader = mask_reader

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = load_rgb(record.path)
        width, height = image.size
        boxes = None
        if self.with_boxes:
            raw = record.boxes if record.boxes is not None else np.zeros((0, 4), np.float32)
            boxes = torch.as_tensor(raw, dtype=torch.float32).reshape(-1, 4).clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        mask = None
        if self.mask_reader is not None:
            if record.mask_path is None or record.mask_value is None:
                raise DatasetLayoutError(f"image {str(record.path)!r} has no mask file")
            mask_array = self.mask_reader(record.mask_path, record.mask_value)
            if mask_array.shape != (height, width):
                raise DatasetLayoutError(
                    f"mask {str(record.mask_path)!r} has shape {mask_array.shape} (H, W) but "
                    f"its image {str(record.path)!r} is {(height, width)}; expected masks at "
                    "the image's original resolution"
                )
            mask = torch.from_numpy(np.ascontiguousarray(mask_array, dtype=bool))
        image_t, boxes_t, mask_t = transform_sample(self.transform, image, boxes, mask)
        sample: dict[str, Any] = {"image": image_t, "label": record.label, "index": index}
        if boxes_t is not None:
            sample["boxes"] = boxes_t
        if mask_t is not None:
            sample["mask"] = mask_t.bool()
        return sample
