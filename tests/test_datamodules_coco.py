"""COCO instances reader on a miniature copy fabricated in the real format, and the shipped
COCO → ImageNet-1k mapping.

Images are 48×36 (W×H); the transform resizes the shorter side 36 → 30 (scale 5/6, width 40)
and centre-crops 24 (offsets: left 8, top 3). Fabricated annotation file (val2017):

* image 1: a dog (polygon, 24×24 = 33 % of the image, red) and a person (unmapped);
* image 2: a cat (compressed RLE, 24×18, blue), a bird (polygon 5×5 = 1.45 %: kept at 1 %,
  dropped at 2.5 %) and a crowd of dogs (uncompressed RLE, ``iscrowd=1``);
* image 3: a giraffe (unmapped) and a dog without segmentation, so no kept object.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from datamodules import COCODataModule
from datamodules.base import DatasetLayoutError, collate_samples
from datamodules.coco import DEFAULT_MAPPING
from datamodules.transforms import TransformConfig

# pycocotools' decode triggers numpy 2's copy= deprecation notice (not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

WIDTH, HEIGHT = 48, 36
GREY, RED, BLUE = (128, 128, 128), (220, 20, 20), (20, 20, 220)
SETTINGS = {"transform": TransformConfig(24, 30, train_augment=False), "num_workers": 0}
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 16, "name": "bird", "supercategory": "animal"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 25, "name": "giraffe", "supercategory": "animal"},
]
DOG_POLYGON = [12.0, 6.0, 36.0, 6.0, 36.0, 30.0, 12.0, 30.0]  # pixel-edge rectangle
BIRD_POLYGON = [30.0, 2.0, 35.0, 2.0, 35.0, 7.0, 30.0, 7.0]


def _polygon_annotation(ann_id: int, image_id: int, category: int, polygon: list[float]) -> dict:
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], HEIGHT, WIDTH))
    xs, ys = polygon[0::2], polygon[1::2]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "iscrowd": 0,
        "area": float(mask_utils.area(rle)),
        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
        "segmentation": [polygon],
    }


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths, starting with a run of zeros (the COCO crowd format)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": [HEIGHT, WIDTH], "counts": counts}


def _save(path: Path, masks_and_colours: list[tuple[np.ndarray, tuple[int, int, int]]]) -> None:
    pixels = np.full((HEIGHT, WIDTH, 3), GREY, dtype=np.uint8)
    for mask, colour in masks_and_colours:
        pixels[mask.astype(bool)] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG", quality=95)


def make_coco(root: Path) -> Path:
    decode = mask_utils.decode
    dog = decode(mask_utils.merge(mask_utils.frPyObjects([DOG_POLYGON], HEIGHT, WIDTH)))
    cat = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    cat[0:18, 0:24] = 1
    cat_rle = mask_utils.encode(np.asfortranarray(cat))
    crowd = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    crowd[20:34, 26:46] = 1
    person = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    person[0:10, 0:8] = 1

    images_dir = root / "val2017"
    _save(images_dir / "000000000001.jpg", [(dog, RED)])
    _save(images_dir / "000000000002.jpg", [(cat, BLUE)])
    _save(images_dir / "000000000003.jpg", [])
    annotations = [
        _polygon_annotation(101, 1, 18, DOG_POLYGON),
        {
            "id": 102,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "area": 80.0,
            "bbox": [0.0, 0.0, 8.0, 10.0],
            "segmentation": [[0.0, 0.0, 8.0, 0.0, 8.0, 10.0, 0.0, 10.0]],
        },
        {
            "id": 201,
            "image_id": 2,
            "category_id": 17,
            "iscrowd": 0,
            "area": float(mask_utils.area(cat_rle)),
            "bbox": [0.0, 0.0, 24.0, 18.0],
            "segmentation": {"size": [HEIGHT, WIDTH], "counts": cat_rle["counts"].decode()},
        },
        _polygon_annotation(202, 2, 16, BIRD_POLYGON),
        {
            "id": 203,
            "image_id": 2,
            "category_id": 18,
            "iscrowd": 1,
            "area": float(crowd.sum()),
            "bbox": [26.0, 20.0, 20.0, 14.0],
            "segmentation": _uncompressed_rle(crowd),
        },
        {
            "id": 301,
            "image_id": 3,
            "category_id": 25,
            "iscrowd": 0,
            "area": 300.0,
            "bbox": [0.0, 0.0, 20.0, 15.0],
            "segmentation": [[0.0, 0.0, 20.0, 0.0, 20.0, 15.0, 0.0, 15.0]],
        },
        {
            "id": 302,
            "image_id": 3,
            "category_id": 18,
            "iscrowd": 0,
            "area": 300.0,
            "bbox": [0.0, 0.0, 20.0, 15.0],
            "segmentation": [],
        },
    ]
    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "height": HEIGHT, "width": WIDTH} for i in (3, 1, 2)
    ]
    document = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(document))
    return root


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return make_coco(tmp_path / "coco")


def _pixels(image: torch.Tensor, mean, std) -> torch.Tensor:
    return image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)


def _interior(mask: torch.Tensor) -> torch.Tensor:
    inner = mask.clone()
    for dim in (0, 1):
        for shift in (1, -1):
            inner &= torch.roll(mask, shift, dim)
    return inner


def test_shipped_mapping_matches_torchvision_names():
    from torchvision.models import ResNet50_Weights

    names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    data = json.loads(DEFAULT_MAPPING.read_text())
    assert data["num_classes"] == 1000 and data["class_names"] == names
    by_name = {entry["coco_name"]: entry for entry in data["categories"]}
    assert by_name["dog"]["classes"] == list(range(151, 269))
    assert by_name["cat"]["classes"] == [281, 282, 283, 284, 285]
    assert "person" not in by_name and {"coco_id": 1, "coco_name": "person"} in data["unmapped"]
    assert len(data["categories"]) + len(data["unmapped"]) == 80
    used: list[int] = []
    for entry in data["categories"]:
        assert entry["class_names"] == [names[i] for i in entry["classes"]]
        used += entry["classes"]
    assert len(used) == len(set(used))  # no ImageNet class serves two COCO categories


def test_per_object_samples_filter_and_counts(coco_root: Path):
    data = COCODataModule(coco_root, min_area_fraction=0.01, **SETTINGS)
    assert data.num_classes == 1000 and data.class_names[151] == "Chihuahua"
    dataset = data.dataset("test")
    assert data.dataset("val") is not dataset and len(data.dataset("val")) == 3
    stats = data.filter_stats("test")
    assert (stats.images, stats.annotations, stats.kept) == (3, 7, 3)
    assert stats.crowd == 1 and stats.no_segmentation == 1 and stats.too_small == 0
    assert stats.unmapped == {"giraffe": 1, "person": 1} and stats.unmapped_total == 2
    assert stats.images_with_objects == 2
    assert len(dataset) == 3
    samples = [dataset[i] for i in range(3)]
    assert [s["index"] for s in samples] == [0, 1, 2]
    assert [s["annotation_id"] for s in samples] == [101, 201, 202]
    assert [s["image_id"] for s in samples] == [1, 2, 2]
    assert [s["category_id"] for s in samples] == [18, 17, 16]
    assert [s["label"] for s in samples] == [151, 281, 7]
    assert samples[0]["label_set"].nonzero().flatten().tolist() == list(range(151, 269))
    assert samples[1]["label_set"].sum() == 5

    dog = samples[0]
    # Dog: pixel-edge (12, 6, 36, 30) → ×5/6 → (10, 5, 30, 25) → crop offset (8, 3).
    assert dog["boxes"].tolist() == [[2.0, 2.0, 22.0, 22.0]]
    expected = torch.zeros(24, 24, dtype=torch.bool)
    expected[2:22, 2:22] = True
    assert dog["mask"].dtype == torch.bool and torch.equal(dog["mask"], expected)
    pixels = _pixels(dog["image"], data.mean, data.std)
    red = (pixels[0] > 0.7) & (pixels[1] < 0.25) & (pixels[2] < 0.25)
    assert red[_interior(dog["mask"])].all() and not red[~dog["mask"]].any()

    cat = samples[1]
    # Cat: (0, 0, 24, 18) → (0, 0, 20, 15) → (-8, -3, 12, 12) → clamped (0, 0, 12, 12).
    assert cat["boxes"].tolist() == [[0.0, 0.0, 12.0, 12.0]]
    pixels = _pixels(cat["image"], data.mean, data.std)
    blue = (pixels[2] > 0.7) & (pixels[0] < 0.25) & (pixels[1] < 0.25)
    inner = _interior(cat["mask"])
    assert inner.sum() > 50 and blue[inner].all()
    assert not blue[~cat["mask"]].any()

    batch = collate_samples(samples)
    assert batch["mask"].shape == (3, 24, 24) and batch["label_set"].shape == (3, 1000)
    assert batch["label"].tolist() == [151, 281, 7] and batch["boxes"].shape == (3, 1, 4)

    strict = COCODataModule(coco_root, min_area_fraction=0.025, **SETTINGS)
    stats = strict.filter_stats("val")
    assert (stats.kept, stats.too_small, stats.images_with_objects) == (2, 1, 2)
    assert len(strict.dataset("val")) == 2
    crowd = COCODataModule(coco_root, include_crowd=True, **SETTINGS)
    assert crowd.filter_stats("val").crowd == 0 and len(crowd.dataset("val")) == 4
    crowd_sample = crowd.dataset("val")[3]  # uncompressed RLE decodes onto its box
    assert crowd_sample["annotation_id"] == 203 and crowd_sample["label"] == 151
    # (26, 20, 46, 34) → (21.67, 16.67, 38.33, 28.33) → (13.67, 13.67, 30.33, 25.33) → clamp 24.
    assert crowd_sample["boxes"][0].tolist() == pytest.approx(
        [26 * 5 / 6 - 8, 20 * 5 / 6 - 3, 24, 24]
    )
    rows, cols = crowd_sample["mask"].nonzero().unbind(1)
    assert rows.min() == 14 and cols.min() == 14 and rows.max() == 23 and cols.max() == 23


def test_per_image_samples_and_custom_mapping(coco_root: Path, tmp_path: Path):
    mapping = {
        "num_classes": 3,
        "class_names": ["canine", "feline", "avian"],
        "categories": [
            {"coco_id": 18, "coco_name": "dog", "classes": [0]},
            {"coco_id": 17, "coco_name": "cat", "classes": [1]},
            {"coco_id": 16, "coco_name": "bird", "classes": [2, 1]},
        ],
    }
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(mapping))
    data = COCODataModule(coco_root, mapping=str(path), per_object=False, **SETTINGS)
    assert data.num_classes == 3 and data.class_names == ["canine", "feline", "avian"]
    dataset = data.dataset("test")
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert first["index"] == 0 and second["index"] == 1
    assert first["image_id"] == 1 and second["image_id"] == 2
    assert first["label"] == 0 and second["label"] == 1  # the largest object: the cat
    assert second["label_set"].tolist() == [False, True, True]
    assert second["object_labels"] == [1, 2] and second["object_categories"] == [17, 16]
    assert len(second["object_masks"]) == 2 and second["boxes"].shape == (2, 4)
    # Bird (30, 2, 35, 7) → (25, 1.67, 29.17, 5.83) → (17, -1.33, 21.17, 2.83) → clamped.
    assert second["boxes"][1].tolist() == pytest.approx([17.0, 0.0, 35 * 5 / 6 - 8, 7 * 5 / 6 - 3])
    assert torch.equal(second["mask"], second["object_masks"][0] | second["object_masks"][1])
    cat_alone = COCODataModule(coco_root, mapping=str(path), **SETTINGS).dataset("test")[1]
    assert torch.equal(second["object_masks"][0], cat_alone["mask"])
    assert torch.equal(second["image"], cat_alone["image"])

    batch = next(iter(data.test_dataloader()))
    assert batch["boxes"].shape == (2, 2, 4) and batch["num_boxes"].tolist() == [1, 2]
    assert batch["mask"].shape == (2, 24, 24) and batch["label"].tolist() == [0, 1]
    assert isinstance(batch["object_masks"], list) and len(batch["object_masks"][1]) == 2
    assert batch["object_labels"] == [[0], [1, 2]]

    mapping["categories"][0]["coco_name"] = "wolf"
    path.write_text(json.dumps(mapping))
    with pytest.raises(DatasetLayoutError, match=r"category 18 is 'dog'.*'wolf'"):
        COCODataModule(coco_root, mapping=str(path), **SETTINGS).dataset("test")
    path.write_text(json.dumps({"num_classes": 3, "categories": [{"coco_id": 1}]}))
    with pytest.raises(DatasetLayoutError, match=r"mapping\.json.*malformed.*coco_id"):
        COCODataModule(coco_root, mapping=str(path), **SETTINGS)


def test_coco_errors_name_the_path_and_layout(coco_root: Path):
    with pytest.raises(DatasetLayoutError, match=r"nowhere.*instances_\{train,val\}2017\.json"):
        COCODataModule(coco_root / "nowhere", **SETTINGS).dataset("test")
    with pytest.raises(DatasetLayoutError, match=r"not found at .*instances_train2017\.json"):
        COCODataModule(coco_root, **SETTINGS).dataset("train")
    annotations = coco_root / "annotations" / "instances_val2017.json"
    document = json.loads(annotations.read_text())
    annotations.write_text(json.dumps({"annotations": document["annotations"]}))
    with pytest.raises(DatasetLayoutError, match=r"instances_val2017\.json.*malformed.*'images'"):
        COCODataModule(coco_root, **SETTINGS).dataset("test")
    annotations.write_text(json.dumps(document))
    (coco_root / "val2017" / "000000000002.jpg").write_bytes(b"not a jpeg")
    dataset = COCODataModule(coco_root, **SETTINGS).dataset("test")
    with pytest.raises(DatasetLayoutError, match=r"000000000002\.jpg.*cannot be read"):
        dataset[1]
    Image.new("RGB", (40, 30)).save(coco_root / "val2017" / "000000000001.jpg")
    with pytest.raises(DatasetLayoutError, match=r"000000000001\.jpg.*40×30.*48×36"):
        dataset[0]
    (coco_root / "val2017").rename(coco_root / "images")
    with pytest.raises(DatasetLayoutError, match=r"image folder.*val2017"):
        COCODataModule(coco_root, **SETTINGS).dataset("test")
