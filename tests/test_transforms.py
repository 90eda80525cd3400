"""The evaluation transform: image alone, boxes and masks following resize + centre crop."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from datamodules.transforms import SampleTransform, TransformConfig


def _image_with_square() -> tuple[Image.Image, torch.Tensor]:
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[10:50, 80:120] = (255, 0, 0)  # rows 10..49, columns 80..119
    return Image.fromarray(pixels), torch.tensor([[80.0, 10.0, 120.0, 50.0]])


def test_image_alone_gives_a_normalised_tensor():
    image, _ = _image_with_square()
    config = TransformConfig(40, 50, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out, boxes, mask = SampleTransform(config)(image)
    assert out.shape == (3, 40, 40) and boxes is None and mask is None
    assert out.min() >= -1 and out.max() <= 1


def test_boxes_and_mask_planes_follow_resize_and_crop():
    image, box = _image_with_square()
    planes = torch.zeros(2, 100, 200, dtype=torch.bool)
    planes[0, 10:50, 80:120] = True
    planes[1, 0:20, 0:40] = True  # leaves the crop (columns 30..69 of the 50×100 resize)
    config = TransformConfig(40, 50, mean=(0, 0, 0), std=(1, 1, 1))
    out, boxes, masks = SampleTransform(config)(image, box, planes)
    # Resize by 1/2 (100×200 → 50×100), crop rows 5..44 and columns 30..69.
    torch.testing.assert_close(boxes, torch.tensor([[10.0, 0.0, 30.0, 20.0]]))
    assert masks.shape == (2, 40, 40)
    # Antialiasing blurs the square's edge by a pixel; the mask must sit on the red content.
    assert out[0][masks[0]].min() >= 0.5 and out[0][~masks[0]].max() <= 0.5
    assert masks[0].nonzero().min(0).values.tolist() == [0, 10]
    assert masks[0].nonzero().max(0).values.tolist() == [19, 29]
    assert not masks[1].any()


def test_transform_from_a_timm_model_uses_its_pretrained_data_config():
    import math

    import timm

    from datamodules.transforms import config_from_model

    config = config_from_model("vit_tiny_patch16_224")
    expected = timm.create_model("vit_tiny_patch16_224", pretrained=False).pretrained_cfg
    assert config.image_size == expected["input_size"][-1] == 224
    assert config.resize_size == math.floor(224 / expected["crop_pct"])
    assert config.mean == tuple(expected["mean"]) and config.std == tuple(expected["std"])
    assert config.interpolation == expected["interpolation"]


def test_mean_and_std_are_three_floats_and_bad_values_name_the_field():
    import pytest

    from contrastive_saliency.errors import ConfigurationError

    config = TransformConfig(mean=[0, 0, 0], std=[1, 1, 1])
    assert config.mean == (0.0, 0.0, 0.0) and config.std == (1.0, 1.0, 1.0)
    with pytest.raises(ConfigurationError, match=r"transform\.mean needs one value per RGB"):
        TransformConfig(mean=(0.5, 0.5))
    with pytest.raises(ConfigurationError, match=r"transform\.resize_size 100 is smaller"):
        TransformConfig(image_size=128, resize_size=100)


def test_a_mapping_completes_the_datamodules_own_default_transform(tmp_path):
    """A Python caller's dict (or a checkpoint's saved hyper-parameters) sets some fields; the
    others keep the datamodule's own default (CIFAR-100 its statistics), unknown ones are
    refused by name."""
    import pytest

    from contrastive_saliency.errors import ConfigurationError
    from datamodules.cifar100 import CIFAR100_TRANSFORM, CIFAR100DataModule
    from datamodules.transforms import as_transform_config

    datamodule = CIFAR100DataModule(tmp_path, transform={"image_size": 48})
    assert datamodule.transform_config.image_size == 48
    assert datamodule.transform_config.mean == CIFAR100_TRANSFORM.mean
    assert as_transform_config({"train_augment": False}) == TransformConfig(train_augment=False)
    with pytest.raises(ConfigurationError, match=r"unknown field\(s\) \['image_sise'\]"):
        as_transform_config({"image_sise": 48})
    with pytest.raises(ConfigurationError, match="mapping of its fields, got int"):
        as_transform_config(48)
