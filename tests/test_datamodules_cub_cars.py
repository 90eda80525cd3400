"""CUB-200-2011 and Stanford Cars readers on miniature copies fabricated in the real formats.

Images are 48×36 (W×H). The transform used throughout resizes the shorter side 36 → 30
(scale 5/6, width 40) and centre-crops 24 (offsets: left 8, top 3), so a pixel-edge box
(12, 6, 36, 30) becomes (10, 5, 30, 25) → (2, 2, 22, 22), and a mask over rows 6..29 and
columns 12..35 becomes rows/columns 2..21 of the crop (nearest resize samples ⌊1.2·i⌋).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from datamodules import CUBDataModule, StanfordCarsDataModule
from datamodules._annotation_files import mat_records
from datamodules.base import DatasetLayoutError
from datamodules.transforms import TransformConfig

WIDTH, HEIGHT = 48, 36
GREY, RED = (128, 128, 128), (220, 20, 20)
BIRD_BOX = (12, 6, 36, 30)  # pixel-edge xyxy of the painted object
SETTINGS = {"transform": TransformConfig(24, 30, train_augment=False), "num_workers": 0}
EXPECTED_BOX = [2.0, 2.0, 22.0, 22.0]
EXPECTED_MASK = torch.zeros(24, 24, dtype=torch.bool)
EXPECTED_MASK[2:22, 2:22] = True


def _paint(path: Path, box: tuple[int, int, int, int] = BIRD_BOX, fmt: str = "JPEG") -> None:
    pixels = np.full((HEIGHT, WIDTH, 3), GREY, dtype=np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = RED
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt, quality=95)


def _pixels(image: torch.Tensor, mean, std) -> torch.Tensor:
    return image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)


def _assert_mask_on_colour(sample: dict, mean, std) -> None:
    """Mask pixels (one pixel in from the border, away from resampling blur) are red, and the
    pixels well outside it are grey."""
    pixels = _pixels(sample["image"], mean, std)
    mask = sample["mask"]
    inner = mask.clone()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
    inner &= torch.roll(mask, 1, 1) & torch.roll(mask, -1, 1)
    red = (pixels[0] > 0.7) & (pixels[1] < 0.25) & (pixels[2] < 0.25)
    assert inner.sum() > 100 and red[inner].all()
    outside = ~mask
    for shift in ((1, 0), (-1, 0), (1, 1), (-1, 1)):
        outside &= ~torch.roll(mask, shift[0], shift[1])
    assert not red[outside].any()


# --------------------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = ["001.Red_Bird", "002.Blue_Bird", "003.Green_Bird"]
# Per class 4 images: two official train (is_train 1) and two test. Image 2 (a test image of
# class 0) has a box near the corner that the centre crop cuts.
CORNER_BOX = (0.0, 0.0, 24.0, 18.0)


def make_cub(parent: Path, segmentations: bool = True, classes: list[str] = CUB_CLASSES) -> Path:
    """A CUB_200_2011/ folder under ``parent`` (+ attributes.txt next to it, as officially),
    four images per class of ``classes``."""
    cub = parent / "CUB_200_2011"
    images, labels, split, boxes = [], [], [], []
    for image_id in range(1, 4 * len(classes) + 1):
        class_id = (image_id - 1) // 4 + 1
        relpath = f"{classes[class_id - 1]}/{classes[class_id - 1][4:]}_{image_id:04d}.jpg"
        _paint(cub / "images" / relpath)
        if segmentations:
            seg = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
            seg[6:30, 12:36] = 255
            seg[30:36, 20:28] = 100  # below the 0.5 agreement threshold: not bird
            path = parent / "segmentations" / Path(relpath).with_suffix(".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(seg, mode="L").save(path)
        box = CORNER_BOX if image_id == 2 else (12.0, 6.0, 24.0, 24.0)  # x y w h
        images.append(f"{image_id} {relpath}")
        labels.append(f"{image_id} {class_id}")
        split.append(f"{image_id} {int(image_id % 4 in (1, 3))}")
        boxes.append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
    (cub / "images.txt").write_text("\n".join(images) + "\n")
    (cub / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (cub / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (cub / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (cub / "classes.txt").write_text(
        "\n".join(f"{i} {name}" for i, name in enumerate(classes, start=1)) + "\n"
    )
    (cub / "attributes").mkdir()
    attributes = np.arange(len(classes) * 312, dtype=np.float64).reshape(len(classes), 312) % 101
    (cub / "attributes" / "class_attribute_labels_continuous.txt").write_text(
        "\n".join(" ".join(f"{v:.6f}" for v in row) for row in attributes) + "\n"
    )
    (parent / "attributes.txt").write_text(
        "\n".join(f"{i} has_part_{i}::colour_{i % 7}" for i in range(1, 313)) + "\n"
    )
    return cub


@pytest.fixture
def cub_parent(tmp_path: Path) -> Path:
    make_cub(tmp_path)
    return tmp_path


def test_cub_splits_labels_names_and_attributes(cub_parent: Path):
    # By default val is a hold-out of train (CASE's confusion matrix must not see the test set)
    default = CUBDataModule(cub_parent, **SETTINGS)
    assert default.val_fraction == 0.1 and default.split_source("val") == "CUB-200-2011/train"
    data = CUBDataModule(cub_parent, val_fraction=0.0, **SETTINGS)
    assert data.split_source("val") == data.split_source("test") == "CUB-200-2011/test"
    assert data.num_classes == 3
    assert data.class_names == ["Red Bird", "Blue Bird", "Green Bird"]
    assert data.class_dirnames == CUB_CLASSES
    train, test, val = data.dataset("train"), data.dataset("test"), data.dataset("val")
    assert len(train) == len(test) == 6 and val is not test and len(val) == 6
    assert [r.image_id for r in train.records] == [1, 3, 5, 7, 9, 11]
    assert [r.image_id for r in test.records] == [2, 4, 6, 8, 10, 12]
    assert [r.label for r in test.records] == [0, 0, 1, 1, 2, 2]
    for index in range(len(test)):
        sample = test[index]
        assert sample["index"] == index and sample["label"] == test.records[index].label
        assert sample["image_id"] == test.records[index].image_id
        assert sample["image"].shape == (3, 24, 24)
    assert data.class_attributes.shape == (3, 312)
    assert data.class_attributes[1, 5].item() == pytest.approx((312 + 5) % 101)
    assert data.attribute_names[0] == "has_part_1::colour_1" and len(data.attribute_names) == 312
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)


def test_cub_boxes_and_masks_follow_resize_and_crop(cub_parent: Path):
    data = CUBDataModule(cub_parent / "CUB_200_2011", "../segmentations", **SETTINGS)
    test = data.dataset("test")
    sample = test[1]  # image 4, box (12, 6) + (24, 24)
    assert sample["boxes"].tolist() == [EXPECTED_BOX]
    assert sample["mask"].dtype == torch.bool and torch.equal(sample["mask"], EXPECTED_MASK)
    _assert_mask_on_colour(sample, data.mean, data.std)
    # Image 2: (0, 0, 24, 18) → scaled (0, 0, 20, 15) → shifted (-8, -3, 12, 12) → clamped.
    assert test[0]["boxes"].tolist() == [[0.0, 0.0, 12.0, 12.0]]
    batch = next(iter(data.test_dataloader()))
    assert batch["image"].shape == (6, 3, 24, 24) and batch["boxes"].shape == (6, 1, 4)
    assert batch["mask"].shape == (6, 24, 24) and batch["index"].tolist() == list(range(6))
    assert batch["label"].tolist() == [0, 0, 1, 1, 2, 2]


def test_cub_seeded_validation_holdout(cub_parent: Path):
    data = CUBDataModule(cub_parent, val_fraction=0.5, split_seed=3, **SETTINGS)
    train_ids = [r.image_id for r in data.dataset("train").records]
    val = data.dataset("val").records
    assert len(train_ids) == len(val) == 3 and sorted(r.label for r in val) == [0, 1, 2]
    assert sorted(train_ids + [r.image_id for r in val]) == [1, 3, 5, 7, 9, 11]
    again = CUBDataModule(cub_parent, val_fraction=0.5, split_seed=3, **SETTINGS)
    assert [r.image_id for r in again.dataset("val").records] == [r.image_id for r in val]
    assert len(data.dataset("test")) == 6


def test_cub_attribute_names_inside_the_folder(tmp_path: Path):
    cub = make_cub(tmp_path, segmentations=False)
    (tmp_path / "attributes.txt").rename(cub / "attributes" / "attributes.txt")
    data = CUBDataModule(cub, **SETTINGS)
    assert len(data.attribute_names) == 312
    assert "mask" not in data.dataset("test")[0]
    (cub / "attributes" / "attributes.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"attributes.txt"):
        _ = CUBDataModule(cub, **SETTINGS).attribute_names


def test_cub_errors_name_the_path_and_layout(cub_parent: Path, tmp_path_factory):
    missing = cub_parent / "nowhere"
    with pytest.raises(DatasetLayoutError, match=r"nowhere.*images.txt"):
        CUBDataModule(missing, **SETTINGS).dataset("test")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DatasetLayoutError, match=r"no images.txt.*CUB_200_2011"):
        CUBDataModule(empty, **SETTINGS).dataset("test")
    cub = cub_parent / "CUB_200_2011"
    boxes = (cub / "bounding_boxes.txt").read_text()
    (cub / "bounding_boxes.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"bounding_boxes\.txt.*<x> <y> <width>"):
        CUBDataModule(cub_parent, **SETTINGS).dataset("test")
    (cub / "bounding_boxes.txt").write_text(boxes.replace("3 12.0", "3 twelve"))
    with pytest.raises(DatasetLayoutError, match=r"line 3 of .*bounding_boxes\.txt"):
        CUBDataModule(cub_parent, **SETTINGS).dataset("test")
    (cub / "bounding_boxes.txt").write_text(boxes)
    (cub / "images" / CUB_CLASSES[0] / "Red_Bird_0002.jpg").write_bytes(b"not a jpeg")
    test = CUBDataModule(cub_parent, **SETTINGS).dataset("test")
    with pytest.raises(DatasetLayoutError, match=r"Red_Bird_0002.jpg.*cannot be read"):
        test[0]
    with pytest.raises(DatasetLayoutError, match=r"segmentation folder.*nope"):
        CUBDataModule(cub_parent, "nope", **SETTINGS).dataset("test")


# --------------------------------------------------------------------------- Stanford Cars

CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TTS Coupe 2012"]
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
# 1-based inclusive pixel indices of the painted region (0-based columns 12..35, rows 6..29).
CAR_BOX_1BASED = (13, 7, 36, 30)


def _write_annotations(path: Path, rows: list[tuple[int, int, int, int, int, str]]) -> None:
    """A 1×N struct array like the devkit's: numeric fields 1×1 uint8/uint16, fname a string."""
    annotations = np.zeros((1, len(rows)), dtype=[(name, object) for name in FIELDS])
    for k, (x1, y1, x2, y2, cls, fname) in enumerate(rows):
        annotations[0, k] = (
            np.array([[x1]], dtype=np.uint16),
            np.array([[y1]], dtype=np.uint16),
            np.array([[x2]], dtype=np.uint16),
            np.array([[y2]], dtype=np.uint16),
            np.array([[cls]], dtype=np.uint8),
            np.array([fname]),
        )
    scipy.io.savemat(path, {"annotations": annotations})


def make_cars(root: Path) -> Path:
    (root / "devkit").mkdir(parents=True)
    names = np.empty((1, len(CAR_CLASSES)), dtype=object)
    for k, name in enumerate(CAR_CLASSES):
        names[0, k] = name
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, annotation_path in (
        ("train", root / "devkit" / "cars_train_annos.mat"),
        ("test", root / "cars_test_annos_withlabels.mat"),
    ):
        rows = []
        for k in range(6):
            fname = f"{k + 1:05d}.jpg"
            _paint(root / f"cars_{split}" / fname)
            box = CAR_BOX_1BASED if k != 5 else (1, 1, 10, 10)
            rows.append((*box, k // 2 + 1 if split == "train" else 3 - k // 2, fname))
        _write_annotations(annotation_path, rows)
    return root


@pytest.fixture
def cars_root(tmp_path: Path) -> Path:
    return make_cars(tmp_path / "stanford_cars")


def test_mat_nesting_matches_the_devkit_and_both_squeeze_styles_parse(cars_root: Path):
    path = cars_root / "devkit" / "cars_train_annos.mat"
    raw = scipy.io.loadmat(path)["annotations"]
    assert raw.shape == (1, 6) and raw[0, 0]["bbox_x1"].shape == (1, 1)
    assert raw[0, 0]["fname"].tolist() == ["00001.jpg"]
    squeezed = scipy.io.loadmat(path, squeeze_me=True)["annotations"]
    objects = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)["annotations"]
    expected = mat_records(raw, FIELDS)
    assert expected[0] == dict(zip(FIELDS, (*CAR_BOX_1BASED, 1, "00001.jpg"), strict=True))
    assert mat_records(squeezed, FIELDS) == expected == mat_records(objects, FIELDS)


def test_cars_splits_labels_names_and_boxes(cars_root: Path):
    default = StanfordCarsDataModule(cars_root.parent, **SETTINGS)  # finds stanford_cars/
    assert default.val_fraction == 0.1 and default.split_source("val") == "Stanford Cars/train"
    data = StanfordCarsDataModule(cars_root.parent, val_fraction=0.0, **SETTINGS)
    assert data.num_classes == 3 and data.class_names == CAR_CLASSES
    train, test = data.dataset("train"), data.dataset("test")
    assert len(train) == len(test) == 6 and len(data.dataset("val")) == 6
    assert [r.label for r in train.records] == [0, 0, 1, 1, 2, 2]
    assert [r.label for r in test.records] == [2, 2, 1, 1, 0, 0]
    # 1-based inclusive (13, 7, 36, 30) → pixel-edge (12, 6, 36, 30).
    assert train.records[0].box == (12.0, 6.0, 36.0, 30.0)
    assert train.records[5].box == (0.0, 0.0, 10.0, 10.0)
    for index in range(6):
        sample = test[index]
        assert sample["index"] == index and sample["label"] == test.records[index].label
    sample = train[0]
    assert sample["boxes"].tolist() == [EXPECTED_BOX]
    # The box interior is the painted colour after the transform.
    pixels = _pixels(sample["image"], data.mean, data.std)
    assert (pixels[0, 3:21, 3:21] > 0.7).all() and (pixels[1, 3:21, 3:21] < 0.25).all()
    # (0, 0, 10, 10) → (0, 0, 8.33, 8.33) → shifted by (-8, -3) → clamped (0, 0, 0.33, 5.33).
    assert train[5]["boxes"][0].tolist() == pytest.approx(
        [0.0, 0.0, 10 * 5 / 6 - 8, 10 * 5 / 6 - 3]
    )
    batch = next(iter(data.train_dataloader()))
    assert batch["boxes"].shape == (6, 1, 4) and batch["image"].shape == (6, 3, 24, 24)

    holdout = StanfordCarsDataModule(cars_root, val_fraction=0.5, **SETTINGS)
    assert len(holdout.dataset("train")) == len(holdout.dataset("val")) == 3
    assert sorted(r.label for r in holdout.dataset("val").records) == [0, 1, 2]


def test_cars_errors_name_the_path_and_layout(cars_root: Path):
    with pytest.raises(DatasetLayoutError, match=r"nowhere.*devkit"):
        _ = StanfordCarsDataModule(cars_root / "nowhere", **SETTINGS).class_names
    (cars_root / "cars_test_annos_withlabels.mat").rename(cars_root / "elsewhere.mat")
    with pytest.raises(DatasetLayoutError, match=r"cars_test_annos_withlabels.mat"):
        StanfordCarsDataModule(cars_root, **SETTINGS).dataset("test")
    scipy.io.savemat(cars_root / "cars_test_annos_withlabels.mat", {"annos": np.zeros((1, 2))})
    with pytest.raises(DatasetLayoutError, match=r"no variable 'annotations'.*bbox_x1"):
        StanfordCarsDataModule(cars_root, **SETTINGS).dataset("test")
    (cars_root / "cars_test_annos_withlabels.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetLayoutError, match=r"cannot be read as a MATLAB"):
        StanfordCarsDataModule(cars_root, **SETTINGS).dataset("test")
    shutil.copy(
        cars_root / "elsewhere.mat", cars_root / "devkit" / "cars_test_annos_withlabels.mat"
    )
    (cars_root / "cars_test_annos_withlabels.mat").unlink()
    test = StanfordCarsDataModule(cars_root, **SETTINGS).dataset("test")  # found in devkit/
    assert len(test) == 6
    (cars_root / "cars_test" / "00001.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DatasetLayoutError, match=r"00001.jpg"):
        test[0]
    shutil.rmtree(cars_root / "cars_train")
    with pytest.raises(DatasetLayoutError, match=r"cars_train"):
        StanfordCarsDataModule(cars_root, **SETTINGS).dataset("train")
