"""Common call contract of every saliency method."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from saliency.gradients import as_class_matrix


class SaliencyMethod(ABC):
    """``method(images, classes) -> FloatTensor[B, K, H, W]`` at the input resolution.

    Subclasses implement :meth:`compute`, which receives ``classes`` as ``[B, K]`` and may
    return maps at a lower resolution; they are upsampled bilinearly here. Maps are raw: the
    method's own definition (e.g. ReLU for CAMs), no per-image normalisation.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abstractmethod
    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, K, h, w]`` for ``classes`` ``[B, K]``."""

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        classes = as_class_matrix(classes, images.shape[0])
        maps = self.compute(images, classes)
        if maps.shape[-2:] != images.shape[-2:]:
            maps = upsample(maps, images.shape[-2:])
        return maps.float()


def upsample(maps: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize of ``[B, K, h, w]`` maps to ``size`` (align_corners=False, as cv2)."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
