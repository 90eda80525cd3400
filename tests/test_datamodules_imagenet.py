"""ImageNet datamodule on miniature copies fabricated in the real on-disk formats: class
folders, the flat validation folder with LOC_val_solution.csv or the devkit ground truth,
boxes after resize/crop, ImageNet-S masks (R + 256·G ids) and layout errors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import DatasetLayoutError
from datamodules.imagenet import (
    ImageNetDataModule,
    loc_boxes_to_pixel_edges,
    read_imagenet_s_mask,
)
from datamodules.transforms import TransformConfig

WNIDS = ["n00000001", "n00000002", "n00000003"]  # sorted = class order
NAMES = ["tench, Tinca tinca", "goldfish", "great white shark"]
SIZE = (40, 30)  # W, H
SQUARE = (10, 6, 26, 20)  # x1, y1, x2, y2 pixel edges of the painted square (even: JPEG-safe)
BACKGROUND, RED = (20, 40, 200), (230, 20, 20)


def write_image(path: Path, shade: int, square: bool = False) -> None:
    """A 40×30 image: blue background, a distinct shade stripe, optionally a red square."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
    pixels[:] = BACKGROUND
    pixels[26:, :, 1] = shade  # bottom stripe: distinct content per image
    if square:
        x1, y1, x2, y2 = SQUARE
        pixels[y1:y2, x1:x2] = RED
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, subsampling=0)


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}"


# val image i (1-based) has class VAL_CLASS[i - 1]; two per class
VAL_CLASS = [2, 0, 1, 0, 2, 1]


def make_imagenet(
    root: Path, flat_val: bool, mapping: bool = True, wnids: list[str] = WNIDS
) -> Path:
    for c, wnid in enumerate(wnids):
        for k in range(2):
            write_image(root / "train" / wnid / f"{wnid}_{k}.JPEG", 10 * c + k)
    for i, c in enumerate(VAL_CLASS, start=1):
        folder = root / "val" if flat_val else root / "val" / wnids[c]
        write_image(folder / f"{val_name(i)}.JPEG", 100 + i, square=True)
    if mapping:
        lines = [f"{w} {n}" for w, n in zip(wnids, NAMES, strict=True)]
        (root / "LOC_synset_mapping.txt").write_text("\n".join(lines) + "\n")
    return root


def write_solution(root: Path, wnids: list[str] = WNIDS) -> None:
    """LOC_val_solution.csv in shuffled row order; image 1 gets two boxes."""
    rows = []
    for i, c in enumerate(VAL_CLASS, start=1):
        w = wnids[c]
        boxes = f"{w} 12 6 20 15 {w} 1 1 10 30" if i == 1 else f"{w} 11 7 26 20"
        rows.append(f"{val_name(i)},{boxes}")
    random.Random(0).shuffle(rows)
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))


def module(root: Path, **kwargs) -> ImageNetDataModule:
    settings = {"transform": TransformConfig(24, 30), "num_workers": 0, "batch_size": 4}
    settings.update(kwargs)
    return ImageNetDataModule(root=str(root), **settings)


def denormalise(image: torch.Tensor, dm: ImageNetDataModule) -> torch.Tensor:
    mean = torch.tensor(dm.mean).view(3, 1, 1)
    std = torch.tensor(dm.std).view(3, 1, 1)
    return image * std + mean


# ----------------------------------------------------------------------------- classes, labels
def test_class_folders_counts_labels_names_and_indices(tmp_path):
    dm = module(make_imagenet(tmp_path, flat_val=False))
    assert dm.num_classes == 3 and dm.wnids == WNIDS and dm.class_names == NAMES
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(train) == 6 and len(val) == 6
    assert [r.label for r in train.records] == [0, 0, 1, 1, 2, 2]
    by_name = {r.path.stem: r.label for r in val.records}
    assert by_name == {val_name(i): c for i, c in enumerate(VAL_CLASS, start=1)}
    for position in range(len(val)):
        sample = val[position]
        assert sample["index"] == position
        assert sample["label"] == val.records[position].label
        assert sample["image"].shape == (3, 24, 24) and "boxes" not in sample
    assert dm.dataset("test") is val  # ImageNet evaluates on val


def test_without_mapping_file_classes_are_the_sorted_wnid_folders(tmp_path):
    dm = module(make_imagenet(tmp_path, flat_val=False, mapping=False))
    assert dm.wnids == WNIDS and dm.class_names == WNIDS


def test_flat_val_with_loc_solution(tmp_path):
    root = make_imagenet(tmp_path, flat_val=True)
    write_solution(root)
    val = module(root).dataset("val")
    assert [r.path.stem for r in val.records] == [val_name(i) for i in range(1, 7)]
    assert [val[i]["label"] for i in range(6)] == VAL_CLASS


def test_flat_val_with_devkit_ground_truth_and_text_mapping(tmp_path):
    root = make_imagenet(tmp_path, flat_val=True)
    devkit_order = ["n00000003", "n00000001", "n00000002"]  # ILSVRC2012_ID 1, 2, 3
    ids = [devkit_order.index(WNIDS[c]) + 1 for c in VAL_CLASS]
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, ids)) + "\n")
    (root / "devkit_ids.txt").write_text("\n".join(devkit_order) + "\n")
    dm = module(root, ground_truth_synsets="devkit_ids.txt")
    assert [r.label for r in dm.dataset("val").records] == VAL_CLASS


def test_flat_val_with_devkit_ground_truth_and_meta_mat(tmp_path):
    from scipy.io import savemat

    root = make_imagenet(tmp_path, flat_val=True)
    # ids 1..3 are the leaves (in devkit order n3, n1, n2); id 4 is an inner node
    entries = [(2, "n00000001", 0), (4, "n09999999", 3), (1, "n00000003", 0), (3, "n00000002", 0)]
    synsets = np.zeros(
        len(entries), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")]
    )
    for row, (ilsvrc_id, wnid, children) in enumerate(entries):
        synsets[row] = (ilsvrc_id, wnid, children)
    meta = root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    meta.parent.mkdir(parents=True)
    savemat(str(meta), {"synsets": synsets})
    devkit_order = ["n00000003", "n00000001", "n00000002"]
    ids = [devkit_order.index(WNIDS[c]) + 1 for c in VAL_CLASS]
    (meta.parent / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, ids)))
    assert [r.label for r in module(root).dataset("val").records] == VAL_CLASS


def test_official_ground_truth_with_a_sorted_mapping_is_refused(tmp_path):
    root = make_imagenet(tmp_path, flat_val=True)
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("490\n1\n2\n3\n1\n2\n")
    fake = [f"n{i:08d}" for i in range(1, 1001)]  # sorted, like LOC_synset_mapping order
    (root / "sorted.txt").write_text("\n".join(fake))
    with pytest.raises(DatasetLayoutError, match=r"meta\.mat"):
        module(root, ground_truth_synsets="sorted.txt").dataset("val")


# ----------------------------------------------------------------------------- boxes
def test_loc_box_conversion_is_one_based_inclusive_to_pixel_edges():
    converted = loc_boxes_to_pixel_edges(np.array([[1, 1, 10, 10], [12, 6, 20, 15]]))
    np.testing.assert_array_equal(converted, [[0, 0, 10, 10], [11, 5, 20, 15]])


@pytest.mark.parametrize("flat_val", [True, False])
def test_boxes_follow_the_centre_crop(tmp_path, flat_val):
    root = make_imagenet(tmp_path, flat_val=flat_val)
    write_solution(root)
    val = module(root, boxes=True).dataset("val")  # 40×30: resize 30 = identity, crop 24
    position = next(i for i, r in enumerate(val.records) if r.path.stem == val_name(1))
    # edges (11, 5, 20, 15) and (0, 0, 10, 30); crop offset (8, 3); clamp to 24
    expected = torch.tensor([[3.0, 2.0, 12.0, 12.0], [0.0, 0.0, 2.0, 24.0]])
    torch.testing.assert_close(val[position]["boxes"], expected)
    other = next(i for i, r in enumerate(val.records) if r.path.stem == val_name(2))
    torch.testing.assert_close(val[other]["boxes"], torch.tensor([[2.0, 3.0, 18.0, 17.0]]))


def test_boxes_follow_resize_then_crop(tmp_path):
    root = make_imagenet(tmp_path, flat_val=True)
    write_solution(root)
    val = module(root, boxes=True, transform=TransformConfig(40, 60)).dataset("val")
    # ×2 → 80×60, crop 40 at (20, 10): (11, 5, 20, 15) → (22, 10, 40, 30) → (2, 0, 20, 20)
    torch.testing.assert_close(val[0]["boxes"][0], torch.tensor([2.0, 0.0, 20.0, 20.0]))
    batch = next(iter(module(root, boxes=True, batch_size=6).val_dataloader()))
    assert batch["boxes"].shape == (6, 2, 4) and batch["num_boxes"].tolist() == [2, 1, 1, 1, 1, 1]
    assert batch["index"].tolist() == list(range(6))


def test_boxes_painted_square_lands_inside_its_box(tmp_path):
    """Image 2's box is the red square (1-based inclusive 11..26 × 7..20 = edges SQUARE)."""
    root = make_imagenet(tmp_path, flat_val=True)
    write_solution(root)
    dm = module(root, boxes=True, transform=TransformConfig(40, 60))
    sample = dm.dataset("val")[1]
    x1, y1, x2, y2 = sample["boxes"][0].round().int().tolist()
    rgb = denormalise(sample["image"], dm)
    red = rgb[0] > rgb[2]
    assert red[y1:y2, x1:x2].all() and red.sum() == (x2 - x1) * (y2 - y1)


# ----------------------------------------------------------------------------- ImageNet-S
def encode_ids(ids: np.ndarray) -> Image.Image:
    rgb = np.zeros((*ids.shape, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = ids % 256, ids // 256
    return Image.fromarray(rgb)


def make_imagenet_s(s_root: Path, split: int, categories: list[str], masked: dict[int, str]):
    """Masks for val images ``masked`` (image number → folder wnid); the object is SQUARE with
    the id of that folder's class, plus a patch of another class and an ignore patch."""
    ranks = {w: r for r, w in enumerate(sorted(categories), start=1)}
    segmentation = s_root / f"ImageNetS{split}" / "validation-segmentation"
    for wnid in categories:
        (segmentation / wnid).mkdir(parents=True, exist_ok=True)
    for number, folder in masked.items():
        ids = np.zeros((SIZE[1], SIZE[0]), np.int64)
        x1, y1, x2, y2 = SQUARE
        ids[y1:y2, x1:x2] = ranks[folder]
        ids[0:4, 0:4] = ranks[categories[-1]] if categories[-1] != folder else ranks[categories[0]]
        ids[26:, 30:] = 1000  # ignore
        encode_ids(ids).save(segmentation / folder / f"{val_name(number)}.png")
    return segmentation


S_WNIDS = ["n10000001", "n10000002", "n10000003"]


def s919_categories() -> list[str]:
    """919 wnids, shuffled on disk; 617 fillers sort before the three real classes, so their
    ids (618..620) use the G channel."""
    fillers = [f"n0{i:07d}" for i in range(617)] + [f"n5{i:07d}" for i in range(299)]
    categories = fillers + S_WNIDS
    random.Random(1).shuffle(categories)
    return categories


def make_s_root(tmp_path: Path, flat_val: bool) -> tuple[Path, Path, dict[int, str]]:
    """ImageNet whose wnids are S_WNIDS, and ImageNet-S-919 masks for val images 1, 2, 5."""
    root = make_imagenet(tmp_path / "imagenet", flat_val=flat_val, wnids=S_WNIDS)
    write_solution(root, S_WNIDS)
    masked = {i: S_WNIDS[VAL_CLASS[i - 1]] for i in (1, 2, 5)}
    categories = s919_categories()
    s_root = tmp_path / "imagenet-s"
    make_imagenet_s(s_root, 919, categories, masked)
    (s_root / "cats.txt").write_text("\n".join(categories) + "\n")
    return root, s_root, masked


def test_imagenet_s_mask_id_decoding(tmp_path):
    ids = np.array([[0, 300, 1000], [300, 44, 919]])
    encode_ids(ids).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_imagenet_s_mask(tmp_path / "m.png", 300), ids == 300)


@pytest.mark.parametrize("flat_val", [True, False])
def test_imagenet_s_masks_restrict_the_split_and_align_with_the_square(tmp_path, flat_val):
    root, s_root, masked = make_s_root(tmp_path, flat_val)
    dm = module(
        root,
        imagenet_s_root=str(s_root),
        imagenet_s_split=919,
        imagenet_s_categories=str(s_root / "cats.txt"),
        boxes=True,
        transform=TransformConfig(40, 60),
    )
    val = dm.dataset("val")
    assert sorted(r.path.stem for r in val.records) == sorted(val_name(i) for i in masked)
    assert len(dm.dataset("train")) == 6  # masks only restrict the evaluation split
    sorted_categories = sorted((s_root / "cats.txt").read_text().split())
    for position in range(len(val)):
        record = val.records[position]
        wnid = dm.wnids[record.label]
        assert record.mask_value == sorted_categories.index(wnid) + 1 > 256  # G ≠ 0
        sample = val[position]
        assert sample["index"] == position and sample["mask"].dtype == torch.bool
        assert sample["mask"].shape == (40, 40)
        rgb = denormalise(sample["image"], dm)
        red = rgb[0] > rgb[2]
        assert torch.equal(sample["mask"], red)  # ×2 resize: exact, other/ignore ids excluded
        assert sample["mask"].sum() == 32 * 28  # the 16×14 square, ×2, inside the crop
    batch = next(iter(dm.val_dataloader()))
    assert batch["mask"].shape == (3, 40, 40) and "boxes" in batch


def test_imagenet_s_ids_from_folder_names_when_no_category_list(tmp_path):
    root = make_imagenet(tmp_path / "imagenet", flat_val=False)
    categories = [f"n0{i:07d}" for i in range(1, 51)]  # includes WNIDS (n00000001..3)
    masked = {1: WNIDS[VAL_CLASS[0]], 3: WNIDS[VAL_CLASS[2]]}
    make_imagenet_s(tmp_path / "s", 50, categories, masked)
    dm = module(root, imagenet_s_root=str(tmp_path / "s"), imagenet_s_split=50)
    val = dm.dataset("val")
    assert len(val) == 2
    assert {r.mask_value for r in val.records} == {VAL_CLASS[0] + 1, VAL_CLASS[2] + 1}
    assert val[0]["mask"].any()


def test_imagenet_s_without_category_list_and_wrong_folder_count_is_refused(tmp_path):
    root = make_imagenet(tmp_path / "imagenet", flat_val=False)
    make_imagenet_s(tmp_path / "s", 50, WNIDS, {1: WNIDS[VAL_CLASS[0]]})  # 3 folders, not 50
    with pytest.raises(DatasetLayoutError, match=r"ImageNetS_categories_im50\.txt"):
        module(root, imagenet_s_root=str(tmp_path / "s")).dataset("val")


# ----------------------------------------------------------------------------- errors
def assert_layout_error(error: pytest.ExceptionInfo, path: Path, *fragments: str) -> None:
    message = str(error.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError) as error:
        _ = module(missing).num_classes
    assert_layout_error(error, missing, "<wnid>/*.JPEG", "LOC_val_solution.csv")


def test_flat_val_without_label_file(tmp_path):
    root = make_imagenet(tmp_path, flat_val=True)
    with pytest.raises(DatasetLayoutError) as error:
        module(root).dataset("val")
    assert_layout_error(error, root / "LOC_val_solution.csv", "needs a label file", "<wnid>")


def test_ground_truth_without_id_mapping(tmp_path):
    root = make_imagenet(tmp_path, flat_val=True)
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n3\n1\n2\n3\n")
    with pytest.raises(DatasetLayoutError) as error:
        module(root).dataset("val")
    assert_layout_error(error, root / "ILSVRC2012_devkit_t12/data/meta.mat", "ILSVRC2012_ID")


def test_missing_box_file(tmp_path):
    root = make_imagenet(tmp_path, flat_val=False)
    with pytest.raises(DatasetLayoutError) as error:
        module(root, boxes=True).dataset("val")
    assert_layout_error(error, root / "LOC_val_solution.csv", "ImageId,PredictionString")


def test_missing_imagenet_s_masks(tmp_path):
    root = make_imagenet(tmp_path, flat_val=False)
    with pytest.raises(DatasetLayoutError) as error:
        module(root, imagenet_s_root=str(tmp_path / "s")).dataset("val")
    assert_layout_error(error, tmp_path / "s" / "ImageNetS50", "validation-segmentation/<wnid>")


def test_wrong_layout_non_wnid_folders(tmp_path):
    root = make_imagenet(tmp_path, flat_val=False)
    write_image(root / "val" / "images" / "x.JPEG", 1)
    with pytest.raises(DatasetLayoutError) as error:
        module(root).dataset("val")
    assert_layout_error(error, root / "val", "not wnids", "<wnid>/*.JPEG")


def test_malformed_solution_file(tmp_path):
    root = make_imagenet(tmp_path, flat_val=True)
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nx,n00000001 1 2 3\n")
    with pytest.raises(DatasetLayoutError) as error:
        module(root).dataset("val")
    assert_layout_error(error, root / "LOC_val_solution.csv", "wnid x1 y1 x2 y2", "line 2")


def test_corrupt_image(tmp_path):
    root = make_imagenet(tmp_path, flat_val=False)
    bad = root / "val" / WNIDS[0] / f"{val_name(99)}.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    val = module(root).dataset("val")
    position = [r.path for r in val.records].index(bad)
    with pytest.raises(DatasetLayoutError) as error:
        val[position]
    assert_layout_error(error, bad, "cannot be read as an image")
