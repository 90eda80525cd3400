"""Common call contract of every saliency method."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import as_class_matrix


class SaliencyMethod(ABC):
    """``method(images, classes, **fields) -> FloatTensor[B, K, H, W]`` at the input resolution.

    Subclasses implement :meth:`compute`, which receives ``classes`` as ``[B, K]`` and may
    return maps at a lower resolution; they are upsampled bilinearly here. Maps are raw: the
    method's own definition (e.g. ReLU for CAMs), no per-image normalisation.

    ``batch_fields`` names the fields of the batch (DESIGN.md sample format: ``mask``,
    ``part_mask``, ``index``, ...) a method reads besides the images, e.g. the reference maps
    (:mod:`contrastive_saliency.methods.reference_maps`). They are passed by name, ``method(images,
    classes, part_mask=...)``, and reach :meth:`compute` as keyword arguments; the evaluation
    passes exactly the declared fields (no method is named there), and checks before any
    computation that the dataset has them. A declared field missing from a call, or a field
    the method does not declare, is a :class:`~contrastive_saliency.errors.ConfigurationError`.

    ``class_agnostic`` is True for a method whose map does not depend on the requested class
    (every class of an image gets the same map: attention rollout, Eigen-CAM, the reference
    maps). Methods that compare the maps of several classes read it (VAR refuses such a base).

    ``base_option`` names the option that holds the method a plug-in method wraps (VAR's
    ``base``), None for a method that wraps none; reports draw a wrapper beside its base.
    ``per_call_class_set`` is True for a method whose call also takes ``class_set`` ``[B, M]``,
    the classes the requested ones compete with (VAR Sec. 3.2's ``C′``): the evaluation passes
    a grid image's cell classes for the cells of a grid.
    """

    batch_fields: tuple[str, ...] = ()
    class_agnostic: ClassVar[bool] = False
    base_option: ClassVar[str | None] = None
    per_call_class_set: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abstractmethod
    def compute(self, images: torch.Tensor, classes: torch.Tensor, **fields) -> torch.Tensor:
        """Maps ``[B, K, h, w]`` for ``classes`` ``[B, K]`` (and the declared batch fields)."""

    def __call__(
        self, images: torch.Tensor, classes: torch.Tensor, **fields: torch.Tensor
    ) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        classes = as_class_matrix(classes, images.shape[0])
        maps = self.compute(images, classes, **check_batch_fields(self, fields, images))
        if maps.shape[-2:] != images.shape[-2:]:
            maps = upsample(maps, images.shape[-2:])
        return maps.float()


def upsample(maps: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize of ``[B, K, h, w]`` maps to ``size`` (align_corners=False, as cv2)."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def method_name(method: object) -> str:
    """The registered name of a built method (its class name when unregistered)."""
    return getattr(method, "registered_name", type(method).__name__)


def check_batch_fields(
    method: object, fields: dict[str, torch.Tensor], images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``fields`` checked against ``method.batch_fields``: every declared field present, no
    other field, one row per image; moved to the images' device."""
    declared = tuple(getattr(method, "batch_fields", ()))
    name = method_name(method)
    undeclared = sorted(set(fields) - set(declared))
    if undeclared:
        reads = f"reads only {', '.join(declared)}" if declared else "reads no batch field"
        raise ConfigurationError(
            f"saliency method {name!r} {reads}; got {', '.join(undeclared)}: drop "
            f"{'it' if len(undeclared) == 1 else 'them'} from the call"
        )
    missing = [field for field in declared if field not in fields]
    if missing:
        example = ", ".join(f"{field}=..." for field in declared)
        raise ConfigurationError(
            f"saliency method {name!r} reads the batch field(s) {', '.join(missing)}; pass "
            f"them by name: method(images, classes, {example})"
        )
    batch = images.shape[0]
    for field, value in fields.items():
        if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != batch:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ConfigurationError(
                f"saliency method {name!r}: batch field {field!r} must be a tensor with one "
                f"row per image ({batch}), got {shape}"
            )
    return {field: value.to(images.device) for field, value in fields.items()}
