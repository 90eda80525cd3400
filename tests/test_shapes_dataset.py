"""The embedded benchmark: determinism, sample format, mask/box/part consistency."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules import ShapesDataModule
from datamodules.shapes_dataset import MARK_POSITIONS, ShapesConfig, ShapesDataset


def _equal_samples(a: dict, b: dict) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a)


def test_sample_is_a_pure_function_of_seed_split_index():
    first = ShapesDataset("train", 50)
    second = ShapesDataset("train", 50)  # a fresh instance, as in another worker or rank
    for index in (0, 7, 49):
        assert _equal_samples(first[index], second[index])
    assert not torch.equal(first[3]["image"], ShapesDataset("val", 50)[3]["image"])
    other_seed = ShapesDataset("train", 50, ShapesConfig(seed=1))
    assert not torch.equal(first[3]["image"], other_seed[3]["image"])
    # Access order does not matter (no shared generator state).
    assert _equal_samples(ShapesDataset("train", 50)[7], first[7])


def test_sample_format_and_defaults():
    data = ShapesDataModule()
    assert data.num_classes == 10 and len(data.class_names) == 10
    assert data.sizes == {"train": 5000, "val": 1000, "test": 1000}
    sample = data.dataset("test")[12]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == sample["part_mask"].shape == (64, 64)
    assert sample["mask"].dtype == sample["part_mask"].dtype == torch.bool
    assert sample["boxes"].shape == (1, 4)
    assert int(sample["index"]) == 12 and int(sample["label"]) == 12 % 10
    pixels = sample["image"] * data.dataset("test").std + data.dataset("test").mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_splits_are_balanced_and_siblings_share_a_shape():
    config = ShapesConfig()
    labels = [ShapesDataset("val", 1000, config).label_of(i) for i in range(1000)]
    assert torch.bincount(torch.tensor(labels)).tolist() == [100] * 10
    assert config.siblings(4) == [5] and config.siblings(5) == [4]
    assert config.class_names[4].split("-")[0] == config.class_names[5].split("-")[0]


@pytest.mark.parametrize("num_marks", [2, 4])
def test_mask_box_and_mark_are_consistent(num_marks):
    config = ShapesConfig(num_marks=num_marks)
    dataset = ShapesDataset("train", 80, config)
    for index in range(0, 80, 3):
        sample = dataset[index]
        mask, part = sample["mask"], sample["part_mask"]
        ys, xs = torch.nonzero(mask, as_tuple=True)
        x1, y1, x2, y2 = sample["boxes"][0].tolist()
        assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert part.any(), "every object carries its mark"
        assert not (part & ~mask).any(), "the mark lies on the object"
        # The mark sits on the class's side of the object centre (rotation is at most 20°).
        mark_x, mark_y = MARK_POSITIONS[config.class_names[int(sample["label"])].split("-")[1]]
        part_ys, part_xs = torch.nonzero(part, as_tuple=True)
        offset = (
            part_xs.float().mean() - xs.float().mean(),
            part_ys.float().mean() - ys.float().mean(),
        )
        direction = math.atan2(offset[1], offset[0]) - math.atan2(mark_y, mark_x)
        assert math.cos(direction) > math.cos(math.radians(60)), (index, offset)


def test_bad_configuration_is_rejected_with_the_allowed_range():
    with pytest.raises(ValueError, match=r"num_shapes=9 .* 1\.\.6"):
        ShapesConfig(num_shapes=9)
    with pytest.raises(IndexError, match="out of range"):
        ShapesDataset("test", 5)[5]
