"""Image transforms for file-based datasets: boxes and masks follow every resize and crop.

Every file-based datamodule takes one :class:`TransformConfig` (``transform``; on the command
line ``--data.transform.image_size 128``, in a config ``transform: {image_size: 128}``).
Evaluation: resize the shorter side to ``resize_size`` then centre-crop ``image_size`` (the
torchvision/timm protocol; CASE: 256 → 224), or resize straight to ``image_size²`` when
``resize_size`` is None. Training (``train_augment``): random resized crop + horizontal flip.
Both end in ``ToDtype(float, scale)`` + ``Normalize(mean, std)``; mean/std travel with the
datamodule so metrics can work in pixel space. ``from_model`` takes size, crop,
interpolation, mean and std from a model's own data config instead.

Boxes are ``[n, 4]`` xyxy in pixel-edge coordinates (a box over pixel columns ``0 … 9`` is
``x1 = 0, x2 = 10``), the convention of torchvision's ``BoundingBoxes``, so scaling is exact;
after the crop they are clamped to the image. Masks are resized with nearest-neighbour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from contrastive_saliency.errors import ConfigurationError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformConfig:
    """The image transform of a file-based datamodule (its ``transform`` argument).

    Args:
        image_size: side of the square output image.
        resize_size: evaluation: resize the shorter side to this, then centre-crop
            ``image_size``; ``None`` resizes straight to ``image_size²`` (squashes).
        mean, std: normalisation (ImageNet statistics by default).
        interpolation: a torchvision ``InterpolationMode`` value (``bilinear``, ``bicubic``, ...).
        train_augment: random resized crop + horizontal flip on the training split.
        from_model: a timm model name or ``hf:<repo id or directory>`` whose data config (size,
            crop, interpolation, mean, std) replaces the five values above
            (:meth:`resolved`; nothing is downloaded).
    """

    image_size: int = 224
    resize_size: int | None = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    train_augment: bool = True
    from_model: str | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "std"):  # lists from Python callers compare equal as tuples
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ConfigurationError(
                    f"transform.{name} needs one value per RGB channel (3), got {list(values)}"
                )
            object.__setattr__(self, name, values)
        if self.image_size < 1:
            raise ConfigurationError(
                f"transform.image_size must be positive, got {self.image_size}"
            )
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ConfigurationError(
                f"transform.resize_size {self.resize_size} is smaller than the crop "
                f"transform.image_size {self.image_size}; use resize_size >= image_size, or "
                f"null to squash"
            )
        if self.from_model in ("None", "null"):  # what --data.transform.from_model null gives
            raise ConfigurationError(
                f"transform.from_model {self.from_model!r} is not a model name; to unset it "
                f"give the block: --data.transform '{{from_model: null}}'"
            )
        try:
            InterpolationMode(self.interpolation)
        except ValueError as error:
            valid = ", ".join(mode.value for mode in InterpolationMode)
            raise ConfigurationError(
                f"unknown transform.interpolation {self.interpolation!r}; choose one of {valid}"
            ) from error

    def resolved(self) -> TransformConfig:
        """The configuration the transform runs with: itself, or with ``from_model`` the
        model's size, crop, interpolation, mean and std (``train_augment`` and ``from_model``
        kept)."""
        if self.from_model is None:
            return self
        model = config_from_model(self.from_model)
        return replace(model, train_augment=self.train_augment, from_model=self.from_model)


DEFAULT_TRANSFORM = TransformConfig()


def as_transform_config(
    value: TransformConfig | Mapping[str, Any], default: TransformConfig = DEFAULT_TRANSFORM
) -> TransformConfig:
    """``value`` as a :class:`TransformConfig`: a mapping of some of its fields (a Python
    caller's dict, a checkpoint's saved hyper-parameters) completes ``default``, the
    datamodule's own default transform."""
    if isinstance(value, TransformConfig):
        return value
    if isinstance(value, Mapping):
        valid = {f.name for f in fields(TransformConfig)}
        unknown = sorted(set(value) - valid)
        if unknown:
            raise ConfigurationError(
                f"transform has unknown field(s) {unknown}; valid: {', '.join(sorted(valid))}"
            )
        return replace(default, **value)
    raise ConfigurationError(
        f"transform must be a TransformConfig or a mapping of its fields, got "
        f"{type(value).__name__} {value!r}"
    )


"""The file-based datamodules' default: resize 256, centre-crop 224, ImageNet mean/std,
bilinear, training augmentation on."""


def config_from_model(model_name: str) -> TransformConfig:
    """The evaluation transform a model was trained with. ``hf:<repo id or directory>``: its
    image processor's ``preprocessor_config.json`` (:func:`config_from_image_processor`);
    otherwise a timm model (``timm:<name>`` or ``<name>``), from ``resolve_data_config``: input
    size, ``crop_pct`` (resize = ⌊size / crop_pct⌋), interpolation, mean and std. Reads
    configs only; no weights are downloaded."""
    if model_name.startswith("hf:"):
        return config_from_image_processor(model_name)
    import timm
    from timm.data import resolve_data_config

    model = timm.create_model(model_name.removeprefix("timm:"), pretrained=False)
    data_config = resolve_data_config({}, model=model)
    size = int(data_config["input_size"][-1])
    crop_pct = float(data_config.get("crop_pct", 1.0))
    return TransformConfig(
        image_size=size,
        resize_size=math.floor(size / crop_pct),
        mean=tuple(float(v) for v in data_config["mean"]),
        std=tuple(float(v) for v in data_config["std"]),
        interpolation=str(data_config.get("interpolation", "bilinear")),
    )


# PIL resampling codes of transformers' processors → the modes tensors can be resized with
# (lanczos → bicubic, box and hamming → bilinear: the nearest available).
_PIL_RESAMPLE = {
    0: "nearest",
    1: "bicubic",
    2: "bilinear",
    3: "bicubic",
    4: "bilinear",
    5: "bilinear",
}


def config_from_image_processor(model_name: str) -> TransformConfig:
    """The transform of a Hugging Face model's image processor (``preprocessor_config.json``
    of ``hf:<repo id or directory>``, read offline): ``crop_size`` with ``do_center_crop``
    (DeiT, CLIP: resize to ``size`` then centre-crop), ``size.shortest_edge`` with
    ``crop_pct`` (ConvNeXt, ResNet below 384 px: resize the shorter side to
    ``shortest_edge / crop_pct``, centre-crop ``shortest_edge``), or ``size.height × width``
    (ViT, Swin: resized straight to that size); ``image_mean``/``image_std`` (none without
    ``do_normalize``); ``resample``. One difference: a processor that resizes to a fixed
    ``height × width`` before cropping (DeiT) squashes the image, where this transform keeps
    its aspect ratio (the same for square images)."""
    import json

    from datamodules.hf_hub import hf_file

    path = hf_file(model_name, "preprocessor_config.json")
    settings = json.loads(path.read_text())
    size = settings.get("size") or {}
    size = {"shortest_edge": size} if isinstance(size, int) else size
    crop = settings.get("crop_size") if settings.get("do_center_crop") else None

    def side(box: dict | int, what: str) -> int:
        if isinstance(box, int):
            return box
        if "shortest_edge" in box:
            return int(box["shortest_edge"])
        if box.get("height") != box.get("width"):
            raise ConfigurationError(
                f"{path}: {what} {box} is not square; set the data's image_size instead"
            )
        return int(box["height"])

    if crop:
        image_size, resize_size = side(crop, "crop_size"), side(size, "size")
    elif "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        crop_pct = settings.get("crop_pct")
        image_size = edge
        resize_size = math.floor(edge / crop_pct) if crop_pct and edge < 384 else None
        if not crop_pct:
            resize_size = edge  # shorter side to edge, then the centre square
    else:
        image_size, resize_size = side(size, "size"), None
    if (
        settings.get("do_rescale", True)
        and abs(settings.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9
    ):
        raise ConfigurationError(
            f"{path}: rescale_factor {settings['rescale_factor']} is not 1/255"
        )
    normalise = settings.get("do_normalize", True)
    mean = tuple(settings.get("image_mean", IMAGENET_MEAN)) if normalise else (0.0, 0.0, 0.0)
    std = tuple(settings.get("image_std", IMAGENET_STD)) if normalise else (1.0, 1.0, 1.0)
    return TransformConfig(
        image_size=image_size,
        resize_size=resize_size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        interpolation=_PIL_RESAMPLE.get(int(settings.get("resample", 2)), "bilinear"),
    )


class SampleTransform:
    """``(PIL image, boxes [n,4] | None, mask [H,W] or [n,H,W] | None) -> (image, boxes, mask)``
    tensors; every mask plane gets the same geometry as the image.

    ``train=True`` uses random resized crop + flip (boxes and masks follow as well).
    """

    def __init__(self, config: TransformConfig, train: bool = False) -> None:
        self.config = config
        self.train = train
        mode = InterpolationMode(config.interpolation)
        size = config.image_size
        if train:
            geometry = [
                v2.RandomResizedCrop(size, interpolation=mode, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        elif config.resize_size is None:
            geometry = [v2.Resize((size, size), interpolation=mode, antialias=True)]
        else:
            geometry = [
                v2.Resize(config.resize_size, interpolation=mode, antialias=True),
                v2.CenterCrop(size),
            ]
        self.geometry = v2.Compose([v2.ToImage(), *geometry])
        self.finish = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(config.mean, config.std)]
        )

    def __call__(
        self,
        image,
        boxes: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        width, height = image.size  # PIL
        inputs: list = [image]
        if boxes is not None:
            inputs.append(
                tv_tensors.BoundingBoxes(
                    torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    format="XYXY",
                    canvas_size=(height, width),
                )
            )
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.dim() not in (2, 3) or tuple(mask.shape[-2:]) != (height, width):
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} does not match the image size "
                    f"{(height, width)}: expected [H, W] or [n, H, W] (one per object)"
                )
            inputs.append(tv_tensors.Mask(mask))
        transformed = self.geometry(*inputs)
        # Compose returns the bare output (not a 1-tuple) when given a single input.
        outputs = list(transformed) if len(inputs) > 1 else [transformed]
        image_out = self.finish(outputs.pop(0)).as_subclass(torch.Tensor)
        boxes_out = outputs.pop(0) if boxes is not None else None
        if boxes_out is not None:
            boxes_out = v2.functional.clamp_bounding_boxes(boxes_out).as_subclass(torch.Tensor)
        mask_out = outputs.pop(0).as_subclass(torch.Tensor) if mask is not None else None
        return image_out, boxes_out, mask_out
