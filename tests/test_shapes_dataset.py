"""The embedded benchmark: determinism, sample format, mask/box/part consistency."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from datamodules import ShapesDataModule
from datamodules.shapes_dataset import MARK_POSITIONS, SHAPES, ShapesConfig, ShapesDataset


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
    with pytest.raises(ValueError, match=r"mark_contrast=0\.0 .* \(0, 1\]"):
        ShapesConfig(mark_contrast=0.0)
    with pytest.raises(ValueError, match=r"label_mode 'coarse'.*fine, shape"):
        ShapesConfig(label_mode="coarse")


def test_the_mark_is_faint_and_is_the_only_difference_between_siblings():
    """The default mark's colour lies mark_contrast of the way from the object's colour to its
    complement; with mark_contrast 1 the same sample shows the complement."""
    faint = ShapesConfig(noise_std=0.0, clutter=0)
    strong = ShapesConfig(noise_std=0.0, clutter=0, mark_contrast=1.0)
    assert faint.mark_contrast == pytest.approx(0.12)
    a, b = ShapesDataset("test", 20, faint), ShapesDataset("test", 20, strong)
    for index in (0, 3, 11):
        pixels, mask, part = a.render(index)
        strong_pixels, strong_mask, strong_part = b.render(index)
        assert torch.equal(mask, strong_mask) and torch.equal(part, strong_part)
        body = pixels[:, mask & ~part].mean(1)
        mark, complement = pixels[:, part].mean(1), strong_pixels[:, part].mean(1)
        torch.testing.assert_close(mark, torch.lerp(body, complement, 0.12), atol=1e-5, rtol=0)
        assert torch.equal(pixels[:, ~part], strong_pixels[:, ~part])


def test_shape_label_mode_labels_the_same_images_by_shape():
    """The coarse task: num_shapes balanced classes named by shape, no siblings, and exactly the
    images of the fine task (labels are the fine class // num_marks)."""
    fine = ShapesDataModule(val_size=60)
    coarse = ShapesDataModule(val_size=60, label_mode="shape")
    assert coarse.num_classes == 5 and coarse.class_names == list(SHAPES[:5])
    assert coarse.sibling_classes is None
    assert fine.sibling_classes == [[1], [0], [3], [2], [5], [4], [7], [6], [9], [8]]
    assert coarse.split_source("val") != fine.split_source("val")
    fine_val, coarse_val = fine.dataset("val"), coarse.dataset("val")
    labels = [coarse_val.label_of(i) for i in range(60)]
    assert torch.bincount(torch.tensor(labels)).tolist() == [12] * 5
    for index in (0, 7, 13, 59):
        a, b = fine_val[index], coarse_val[index]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["part_mask"], b["part_mask"])
        assert int(b["label"]) == int(a["label"]) // 2 == labels[index]


def test_sibling_share_counts_correct_samples_whose_top2_is_the_sibling():
    """The statistic the class-sensitivity report prints: among correctly classified samples
    only, the share whose top-2 prediction is the sibling (same shape, other mark)."""
    from callbacks.evaluation.tables import describe_sibling_share, sibling_share

    siblings = ShapesDataModule().sibling_classes
    samples = pd.DataFrame(
        {
            "label": [4, 4, 5, 0, 9, 3, 3],
            "top1": [4, 4, 5, 0, 9, 2, 3],  # index 5 is wrong: not counted, whatever its top-2
            "top2": [5, 2, 4, 3, 8, 3, 0],
        }
    )
    checks = sibling_share(samples, siblings)
    assert checks == {"top2_sibling_share": 3 / 6, "top2_sibling_count": 3, "correct_samples": 6}
    assert describe_sibling_share(checks) == "0.500 (3 of 6)"
    assert sibling_share(samples, ShapesDataModule(label_mode="shape").sibling_classes) == {}
    none_correct = sibling_share(samples.assign(top1=samples["label"] + 1), siblings)
    assert none_correct["top2_sibling_share"] is None and none_correct["correct_samples"] == 0
