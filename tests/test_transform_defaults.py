"""The file-based datamodules take one ``transform`` (:class:`TransformConfig`), and the
transforms they build by default and from ``configs/data/`` are the ones they built when each
copied the seven transform parameters into its signature (issue 18): the torchvision pipelines
below are written out as they were, and the evaluation output of a fixed image equals
torchvision's functional pipeline with those values.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from datamodules import (
    CIFAR100DataModule,
    COCODataModule,
    CUBDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    StanfordCarsDataModule,
)
from datamodules.transforms import TransformConfig, config_from_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "data"
IMAGENET_STATS = "mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]"
CIFAR_STATS = "mean=[0.5071, 0.4865, 0.4409], std=[0.2673, 0.2564, 0.2762]"
BILINEAR = "interpolation=InterpolationMode.BILINEAR, antialias=True"


def _train(size: int) -> list[str]:
    return [
        "ToImage()",
        f"RandomResizedCrop(size=({size}, {size}), scale=(0.08, 1.0), "
        f"ratio=(0.75, 1.3333333333333333), {BILINEAR})",
        "RandomHorizontalFlip(p=0.5)",
    ]


IMAGENET = {
    "train": _train(224),
    "eval": ["ToImage()", f"Resize(size=[256], {BILINEAR})", "CenterCrop(size=(224, 224))"],
    "finish": ["ToDtype(scale=True)", f"Normalize({IMAGENET_STATS}, inplace=False)"],
    "values": dict(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}
CIFAR = {
    "train": _train(32),
    "eval": ["ToImage()", f"Resize(size=[32, 32], {BILINEAR})"],
    "finish": ["ToDtype(scale=True)", f"Normalize({CIFAR_STATS}, inplace=False)"],
    "values": dict(
        resize=[32, 32], crop=None, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)
    ),
}
DEFAULTS = {
    CUBDataModule: IMAGENET,
    StanfordCarsDataModule: IMAGENET,
    COCODataModule: IMAGENET,
    ImageNetDataModule: IMAGENET,
    ImageFolderDataModule: IMAGENET,
    CIFAR100DataModule: CIFAR,
}
# configs/data/<file>: (expected pipelines, train_augment)
DATA_CONFIGS = {
    "cub.yaml": (IMAGENET, True),
    "stanford_cars.yaml": (IMAGENET, True),
    "coco.yaml": (IMAGENET, False),
    "imagenet.yaml": (IMAGENET, True),
    "image_folder.yaml": (IMAGENET, True),
    "cifar100.yaml": (CIFAR, True),
}


def _fixed_image() -> Image.Image:
    rows, columns = np.mgrid[0:200, 0:300]
    pixels = np.stack(
        [(7 * columns + 3 * rows) % 256, (2 * columns + 5 * rows) % 256, (columns * rows) % 256],
        axis=-1,
    )
    return Image.fromarray(pixels.astype(np.uint8))


def _reference_eval(image: Image.Image, values: dict) -> torch.Tensor:
    """torchvision's functional evaluation pipeline with the expected values."""
    tensor = F.resize(
        F.to_image(image), values["resize"], InterpolationMode.BILINEAR, antialias=True
    )
    if values["crop"] is not None:
        tensor = F.center_crop(tensor, values["crop"])
    tensor = F.to_dtype(tensor, torch.float32, scale=True)
    return F.normalize(tensor, list(values["mean"]), list(values["std"])).as_subclass(torch.Tensor)


def _pipelines(datamodule, split: str) -> tuple[list[str], list[str]]:
    transform = datamodule.transform(split)
    return (
        [repr(step) for step in transform.geometry.transforms],
        [repr(step) for step in transform.finish.transforms],
    )


def _check(datamodule, expected: dict, train_augment: bool) -> None:
    train_geometry = expected["train"] if train_augment else expected["eval"]
    assert _pipelines(datamodule, "train") == (train_geometry, expected["finish"])
    for split in ("val", "test"):
        assert _pipelines(datamodule, split) == (expected["eval"], expected["finish"])
    image = _fixed_image()
    output, _, _ = datamodule.transform("val")(image)
    torch.testing.assert_close(output, _reference_eval(image, expected["values"]), rtol=0, atol=0)


@pytest.mark.parametrize("datamodule", list(DEFAULTS), ids=lambda cls: cls.__name__)
def test_each_datamodule_builds_its_former_default_transform(datamodule):
    data = datamodule(root="/nowhere")  # constructors read no file
    _check(data, DEFAULTS[datamodule], train_augment=True)
    assert data.train_augment is True


def _datamodule_from(config: dict) -> L.LightningDataModule:
    """The datamodule a ``configs/data`` file (or a dict of that form) builds, as
    LightningCLI parses it."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    return parser.instantiate(parser.parse_object({"data": config})).data


@pytest.mark.parametrize("name", list(DATA_CONFIGS))
def test_each_data_config_builds_its_former_transform(name):
    expected, train_augment = DATA_CONFIGS[name]
    data = _datamodule_from(yaml.safe_load((CONFIGS / name).read_text()))
    _check(data, expected, train_augment)
    assert data.train_augment is train_augment


def test_one_field_changes_only_that_field_and_keeps_the_datamodules_defaults():
    cifar = _datamodule_from(
        {
            "class_path": "datamodules.CIFAR100DataModule",
            "init_args": {"transform": {"image_size": 64}},
        }
    )
    assert cifar.transform_config == TransformConfig(
        64, None, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    )
    folder = _datamodule_from(
        {
            "class_path": "datamodules.ImageFolderDataModule",
            "init_args": {"transform": {"resize_size": 300, "train_augment": False}},
        }
    )
    assert folder.transform_config == TransformConfig(224, 300, train_augment=False)


def test_from_model_replaces_size_crop_and_statistics_and_keeps_the_augmentation_flag():
    transform = TransformConfig(
        image_size=32, from_model="vit_tiny_patch16_224", train_augment=False
    )
    data = ImageFolderDataModule(transform=transform)
    model = config_from_model("vit_tiny_patch16_224")
    assert data.transform_config == replace(
        model, train_augment=False, from_model="vit_tiny_patch16_224"
    )
    assert data.transform_config.image_size == 224 and data.train_augment is False


def test_the_saved_transform_is_a_plain_dict_loadable_without_pickled_classes(tmp_path):
    data = CIFAR100DataModule(root="/nowhere", transform=TransformConfig(48, None))
    saved = data.hparams["transform"]
    assert saved == data.hparams_initial["transform"]
    assert saved == {
        "image_size": 48,
        "resize_size": None,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bilinear",
        "train_augment": True,
        "from_model": None,
    }
    torch.save({"datamodule_hyper_parameters": dict(data.hparams)}, tmp_path / "h.ckpt")
    loaded = torch.load(tmp_path / "h.ckpt", weights_only=True)
    assert loaded["datamodule_hyper_parameters"]["transform"] == saved
