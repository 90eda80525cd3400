"""MS-COCO instances with masks, mapped to the classes of an ImageNet classifier (VAR protocol).

On-disk format (the official 2017 release; other years via ``year``)::

    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json
    <root>/train2017/<file_name>.jpg
    <root>/val2017/<file_name>.jpg

Each JSON holds ``images`` (``id``, ``file_name``, ``height``, ``width``), ``categories``
(``id``, ``name``) and ``annotations`` (``id``, ``image_id``, ``category_id``, ``iscrowd``,
``area``, ``bbox`` ``[x, y, w, h]``, ``segmentation``: a list of polygons, an uncompressed RLE
``{"size", "counts": [ints]}`` or a compressed RLE ``{"size", "counts": "string"}``). Masks are
decoded with ``pycocotools.mask`` (polygons are rasterised and merged, as ``COCO.annToMask``).

Splits: ``train`` = ``train2017``; ``val`` and ``test`` = ``val2017`` (the test set has no
public annotations; VAR evaluates on the whole validation set).

Object filter, applied once at construction, each annotation counted in exactly one bucket of
:class:`COCOFilterStats`, in this order:

1. ``crowd``: ``iscrowd == 1`` (a region over a group of objects) is skipped unless
   ``include_crowd=True``;
2. ``unmapped``: a category absent from the class mapping (e.g. ``person`` for ImageNet) is
   skipped and counted per category name;
3. ``no_segmentation``: an empty ``segmentation`` is skipped;
4. ``too_small``: ``area / (height × width) < min_area_fraction`` is skipped (``area`` is
   COCO's pixel area of the segmentation; VAR: 0.01 in the paper, 0.025 in its code);
5. ``kept``.

Class mapping: a JSON file (default: the shipped ``data/coco_to_imagenet.json``, COCO →
ImageNet-1k, see ``data/build_coco_to_imagenet.py``) of the form::

    {"num_classes": 1000, "class_names": [...],
     "categories": [{"coco_id": 18, "coco_name": "dog", "classes": [151, ..., 268]}, ...]}

The first class of a list is the object's representative ``label``; the list is its candidate
set ``label_set``.

Samples (``per_object=True``, the default: one sample per kept object, ordered by image id then
annotation order)::

    image [3,H,W], index, label (int), label_set [num_classes] bool, mask [H,W] bool,
    boxes [1,4] (COCO bbox as pixel-edge xyxy x, y, x+w, y+h), image_id, annotation_id,
    category_id

(``per_object=False``: one sample per image with at least one kept object)::

    image, index, label (the representative class of the largest kept object),
    label_set (union over objects), mask [H,W] bool (union of the objects), boxes [n,4],
    object_masks (list of n [H,W] bool tensors), object_labels (list of n ints),
    object_categories (list of n COCO ids), image_id

``object_masks``/``object_labels``/``object_categories`` are plain lists because their length
varies between images: :func:`~datamodules.base.collate_samples` keeps them as a list (one
list per image) while it pads ``boxes`` and stacks the tensors.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from datamodules.base import DatasetLayoutError, FileDataModule, load_rgb, require_path
from datamodules.transforms import DEFAULT_TRANSFORM, SampleTransform, TransformConfig

DEFAULT_MAPPING = Path(__file__).resolve().parent / "data" / "coco_to_imagenet.json"
MAPPING_EXPECTED = (
    'a JSON object {"num_classes": K, "class_names": [K names], "categories": '
    '[{"coco_id": int, "coco_name": str, "classes": [class indices in 0..K-1]}, ...]}'
)


def expected_layout(year: str) -> str:
    return (
        f"the COCO layout: <root>/annotations/instances_{{train,val}}{year}.json and images in "
        f"<root>/train{year}/ and <root>/val{year}/ (download from https://cocodataset.org)"
    )


@dataclass(frozen=True)
class ClassMapping:
    """COCO category id → classifier classes (representative first)."""

    num_classes: int
    class_names: list[str]
    classes: dict[int, tuple[int, ...]]
    coco_names: dict[int, str]


def load_class_mapping(path: Path) -> ClassMapping:
    """Read and validate a mapping JSON (format in the module docstring)."""
    require_path(path, "class mapping file", MAPPING_EXPECTED)
    try:
        data = json.loads(path.read_text())
        num_classes = int(data["num_classes"])
        names = [str(name) for name in data.get("class_names", range(num_classes))]
        classes: dict[int, tuple[int, ...]] = {}
        coco_names: dict[int, str] = {}
        for entry in data["categories"]:
            coco_id = int(entry["coco_id"])
            targets = tuple(int(c) for c in entry["classes"])
            if not targets or not all(0 <= c < num_classes for c in targets):
                raise ValueError(
                    f"category {coco_id}: classes {targets} not in 0..{num_classes - 1}"
                )
            classes[coco_id] = targets
            coco_names[coco_id] = str(entry.get("coco_name", coco_id))
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class_names for num_classes={num_classes}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise DatasetLayoutError(
            f"class mapping {str(path)!r} is malformed ({error!r}); expected {MAPPING_EXPECTED}"
        ) from error
    return ClassMapping(num_classes, names, classes, coco_names)


@dataclass(frozen=True)
class COCOObject:
    """A kept annotation: its mapped classes, COCO segmentation and pixel-edge xyxy box."""

    annotation_id: int
    category_id: int
    classes: tuple[int, ...]
    area: float
    box: tuple[float, float, float, float]
    segmentation: Any


@dataclass(frozen=True)
class COCOImage:
    """An image of the annotation file with its kept objects (annotation order)."""

    image_id: int
    file_name: str
    height: int
    width: int
    objects: tuple[COCOObject, ...]


@dataclass
class COCOFilterStats:
    """How the annotations of a split were filtered (each counted once, see module docstring)."""

    images: int = 0
    images_with_objects: int = 0
    annotations: int = 0
    kept: int = 0
    crowd: int = 0
    too_small: int = 0
    no_segmentation: int = 0
    unmapped: dict[str, int] = field(default_factory=dict)

    @property
    def unmapped_total(self) -> int:
        return sum(self.unmapped.values())


def read_coco_annotations(
    path: Path,
    mapping: ClassMapping,
    min_area_fraction: float,
    include_crowd: bool,
    layout: str,
) -> tuple[list[COCOImage], COCOFilterStats]:
    """Parse an ``instances_*.json`` once; the images (sorted by id) and the filter counts."""
    require_path(path, "COCO annotation file", layout)
    try:
        data = json.loads(path.read_text())
        images = {
            int(i["id"]): (str(i["file_name"]), int(i["height"]), int(i["width"]))
            for i in data["images"]
        }
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise DatasetLayoutError(
            f"COCO annotation file {str(path)!r} is malformed ({error!r}); expected a JSON object "
            "with 'images' [{id, file_name, height, width}], 'categories' [{id, name}] and "
            "'annotations' [{id, image_id, category_id, iscrowd, area, bbox, segmentation}]"
        ) from error
    for coco_id, name in categories.items():
        if coco_id in mapping.classes and mapping.coco_names[coco_id] != name:
            raise DatasetLayoutError(
                f"category {coco_id} is {name!r} in {str(path)!r} but "
                f"{mapping.coco_names[coco_id]!r} in the class mapping; the mapping was made for "
                "another category list"
            )
    stats = COCOFilterStats(images=len(images), annotations=len(annotations))
    unmapped: Counter[str] = Counter()
    objects: dict[int, list[COCOObject]] = {}
    for ann in annotations:
        try:
            ann_id, image_id = int(ann["id"]), int(ann["image_id"])
            category_id = int(ann["category_id"])
            _, height, width = images[image_id]
            if ann.get("iscrowd", 0) and not include_crowd:
                stats.crowd += 1
                continue
            if category_id not in mapping.classes:
                unmapped[categories.get(category_id, str(category_id))] += 1
                continue
            segmentation = ann.get("segmentation")
            if not segmentation:
                stats.no_segmentation += 1
                continue
            area = float(ann["area"])
            if area < min_area_fraction * height * width:
                stats.too_small += 1
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetLayoutError(
                f"annotation {ann.get('id') if isinstance(ann, dict) else ann!r} in {str(path)!r} "
                f"is malformed ({error!r}); expected {{id, image_id (an id of 'images'), "
                "category_id, iscrowd, area, bbox [x, y, w, h], segmentation}"
            ) from error
        stats.kept += 1
        objects.setdefault(image_id, []).append(
            COCOObject(
                ann_id,
                category_id,
                mapping.classes[category_id],
                area,
                (x, y, x + w, y + h),
                segmentation,
            )
        )
    stats.unmapped = dict(sorted(unmapped.items()))
    stats.images_with_objects = len(objects)
    records = [
        COCOImage(image_id, *images[image_id], tuple(objects.get(image_id, ())))
        for image_id in sorted(images)
    ]
    return records, stats


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an ``[H, W]`` uint8
    mask, with ``pycocotools.mask``."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons: rasterise each, then merge
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE (crowd regions)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:  # compressed RLE
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
    with warnings.catch_warnings():  # pycocotools' own numpy-2 copy= deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


class COCODataset(Dataset):
    """Per-object or per-image samples of a COCO split (format in the module docstring)."""

    def __init__(
        self,
        images_dir: Path,
        images: list[COCOImage],
        transform: SampleTransform,
        num_classes: int,
        per_object: bool = True,
        stats: COCOFilterStats | None = None,
    ) -> None:
        self.images_dir = images_dir
        self.images = [image for image in images if image.objects]
        self.transform = transform
        self.num_classes = num_classes
        self.per_object = per_object
        self.stats = stats if stats is not None else COCOFilterStats()
        if per_object:
            self.items = [
                (i, j) for i, image in enumerate(self.images) for j in range(len(image.objects))
            ]
        else:
            self.items = [(i, -1) for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.items)

    def _label_set(self, objects: tuple[COCOObject, ...]) -> torch.Tensor:
        label_set = torch.zeros(self.num_classes, dtype=torch.bool)
        for obj in objects:
            label_set[list(obj.classes)] = True
        return label_set

    def _load(self, record: COCOImage, objects: tuple[COCOObject, ...]):
        path = self.images_dir / record.file_name
        image = load_rgb(path)
        if image.size != (record.width, record.height):
            raise DatasetLayoutError(
                f"image {str(path)!r} is {image.size[0]}×{image.size[1]} but its annotation says "
                f"{record.width}×{record.height}; expected the image of the annotation file"
            )
        masks = np.stack(
            [decode_segmentation(o.segmentation, record.height, record.width) for o in objects]
        )
        boxes = torch.tensor([o.box for o in objects], dtype=torch.float32)
        return image, boxes, torch.from_numpy(masks).bool()

    def _transform_many(self, image, boxes: torch.Tensor, masks: torch.Tensor):
        """The sample transform applied jointly to the image, ``[n, 4]`` boxes and ``[n, H, W]``
        masks (one draw of the random geometry for all of them)."""
        canvas = (image.size[1], image.size[0])
        out_image, out_boxes, out_masks = self.transform.geometry(
            image,
            tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas),
            tv_tensors.Mask(masks),
        )
        out_boxes = v2.functional.clamp_bounding_boxes(out_boxes).as_subclass(torch.Tensor)
        out_image = self.transform.finish(out_image).as_subclass(torch.Tensor)
        return out_image, out_boxes, out_masks.as_subclass(torch.Tensor)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_index, object_index = self.items[index]
        record = self.images[image_index]
        if self.per_object:
            obj = record.objects[object_index]
            image, boxes, masks = self._load(record, (obj,))
            tensor, boxes, mask = self.transform(image, boxes, masks[0])
            return {
                "image": tensor,
                "index": index,
                "label": obj.classes[0],
                "label_set": self._label_set((obj,)),
                "mask": mask,
                "boxes": boxes,
                "image_id": record.image_id,
                "annotation_id": obj.annotation_id,
                "category_id": obj.category_id,
            }
        objects = record.objects
        image, boxes, masks = self._load(record, objects)
        tensor, boxes, masks = self._transform_many(image, boxes, masks)
        largest = max(range(len(objects)), key=lambda k: objects[k].area)
        return {
            "image": tensor,
            "index": index,
            "label": objects[largest].classes[0],
            "label_set": self._label_set(objects),
            "mask": masks.any(dim=0),
            "boxes": boxes,
            "object_masks": list(masks.unbind(0)),
            "object_labels": [o.classes[0] for o in objects],
            "object_categories": [o.category_id for o in objects],
            "image_id": record.image_id,
        }


class COCODataModule(FileDataModule):
    """COCO instances for localisation with object masks (module docstring: format, filter,
    mapping, sample keys).

    Args:
        root: folder holding ``annotations/`` and the image folders.
        min_area_fraction: keep objects whose area is at least this fraction of the image
            (VAR paper 0.01, VAR code 0.025).
        mapping: class mapping JSON; ``None`` = the shipped COCO → ImageNet-1k mapping.
        per_object: one sample per kept object (``True``) or per image (``False``).
        include_crowd: keep ``iscrowd`` regions as objects (default: skip and count them).
        year: the release, naming ``instances_{train,val}<year>.json`` and the image folders.
        batch_size, num_workers, transform: see :class:`FileDataModule`.

    ``num_classes``/``class_names`` are the classifier's (from the mapping);
    ``filter_stats(split)`` gives the :class:`COCOFilterStats` of a split.
    """

    def __init__(
        self,
        root: str | Path,
        min_area_fraction: float = 0.01,
        mapping: str | Path | None = None,
        per_object: bool = True,
        include_crowd: bool = False,
        year: str = "2017",
        batch_size: int = 64,
        num_workers: int = 4,
        transform: TransformConfig = DEFAULT_TRANSFORM,
    ) -> None:
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, transform=transform)
        if not 0.0 <= min_area_fraction <= 1.0:
            raise ValueError(f"min_area_fraction must be in [0, 1], got {min_area_fraction}")
        self.min_area_fraction = min_area_fraction
        self.mapping_path = Path(mapping).expanduser() if mapping is not None else DEFAULT_MAPPING
        self.mapping = load_class_mapping(self.mapping_path)
        self.per_object = per_object
        self.include_crowd = include_crowd
        self.year = str(year)
        self._parsed: dict[str, tuple[list[COCOImage], COCOFilterStats]] = {}

    @property
    def num_classes(self) -> int:
        return self.mapping.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.mapping.class_names

    def split_folder(self, split: str) -> str:
        """``train<year>`` for ``train``, ``val<year>`` for ``val`` and ``test``."""
        return f"{'train' if split == 'train' else 'val'}{self.year}"

    def split_source(self, split: str) -> str:
        """``COCO/val2017`` (val and test) or ``COCO/train2017`` (:mod:`datamodules.split_source`)."""
        return f"COCO/{self.split_folder(split)}"

    def build_dataset(self, split: str) -> COCODataset:
        layout = expected_layout(self.year)
        require_path(self.root, "COCO root", layout)
        folder = self.split_folder(split)
        if folder not in self._parsed:  # val and test share val<year>: parse it once
            self._parsed[folder] = read_coco_annotations(
                self.root / "annotations" / f"instances_{folder}.json",
                self.mapping,
                self.min_area_fraction,
                self.include_crowd,
                layout,
            )
        images, stats = self._parsed[folder]
        images_dir = require_path(self.root / folder, "COCO image folder", layout)
        return COCODataset(
            images_dir, images, self.transform(split), self.num_classes, self.per_object, stats
        )

    def filter_stats(self, split: str) -> COCOFilterStats:
        """Counts of kept and skipped annotations of ``split`` (builds the dataset if needed)."""
        return self.dataset(split).stats  # type: ignore[attr-defined]
