"""Reference maps registered as methods: the ceilings and chance levels every study can show.

They ignore the model and the requested class — they are class-AGNOSTIC by design: every
requested class of an image gets the same map, so their top-1 vs top-2 agreement is 1 and their
Random Logit similarity is 1 (the "not class sensitive" end of those scales), while their
localisation scores mark what a perfect (``oracle_part``), an object-level (``oracle_object``),
a chance (``random``) and a model-free low-level (``edge``) explanation achieve on the same
samples.

| name | map | batch field |
|---|---|---|
| ``oracle_part`` | the discriminative part (the shapes benchmark's mark), 1 inside, 0 outside | ``part_mask`` |
| ``oracle_object`` | the object mask | ``mask`` |
| ``random`` | uniform noise in [0, 1), a pure function of (seed, sample ``index``, pixel) | ``index`` |
| ``edge`` | Sobel gradient magnitude of the image (XAI-TRIS's edge-detection baseline) | — |

Masks are ``[B, H, W]`` (or ``[B, n, H, W]`` per-object masks, whose union is used) at the image
resolution.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.index_random import STREAM_RANDOM_MAP, index_uniform
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.registry import register_method


class ReferenceMap(SaliencyMethod):
    """A class-agnostic map ``[B, H, W]`` repeated for each of the K requested classes. The
    model is not used; ``layer`` is accepted for the registry's common signature and ignored
    (the evaluation lists these methods under layer ``input``)."""

    layer = None
    class_agnostic = True

    def __init__(self, model: nn.Module | None = None, layer: str | None = None) -> None:
        super().__init__(model)

    @abstractmethod
    def reference_map(self, images: torch.Tensor, **fields: torch.Tensor) -> torch.Tensor:
        """The map of each image, ``[B, H, W]``."""

    def compute(self, images: torch.Tensor, classes: torch.Tensor, **fields) -> torch.Tensor:
        reference = self.reference_map(images, **fields).float()
        return reference[:, None].expand(-1, classes.shape[1], -1, -1).contiguous()


def _mask_map(masks: torch.Tensor, images: torch.Tensor, field: str) -> torch.Tensor:
    if masks.dim() == 4:  # [B, n, H, W] per-object masks: their union
        masks = masks.bool().any(dim=1)
    if masks.dim() != 3 or masks.shape[-2:] != images.shape[-2:]:
        raise ConfigurationError(
            f"batch field {field!r} must be [B, H, W] (or [B, n, H, W]) at the image resolution "
            f"{tuple(images.shape[-2:])}, got {tuple(masks.shape)}"
        )
    return (masks != 0).float()


@register_method("oracle_part")
class OraclePart(ReferenceMap):
    """The discriminative part's mask as the map (``part_mask``: the mark that separates a
    shapes class from its sibling): mark energy 1 by construction — the ceiling of part
    localisation."""

    batch_fields = ("part_mask",)

    def reference_map(self, images: torch.Tensor, part_mask: torch.Tensor) -> torch.Tensor:
        return _mask_map(part_mask, images, "part_mask")


@register_method("oracle_object")
class OracleObject(ReferenceMap):
    """The object mask as the map (``mask``): what an explanation that finds the object but not
    the part inside it scores (mark energy = the mark's share of the object)."""

    batch_fields = ("mask",)

    def reference_map(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _mask_map(mask, images, "mask")


@register_method("random")
class RandomMap(ReferenceMap):
    """Uniform noise in ``[0, 1)`` per pixel, seeded by the sample ``index``
    (:func:`contrastive_saliency.index_random.index_uniform`, counter-based: identical on every rank,
    device and batch composition). Its expected energy in a region is the region's area
    share — the chance level of the localisation metrics. ``seed`` selects another draw."""

    batch_fields = ("index",)

    def __init__(
        self, model: nn.Module | None = None, layer: str | None = None, seed: int = 0
    ) -> None:
        super().__init__(model, layer)
        self.seed = int(seed)

    def reference_map(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return index_uniform(
            index.to(images.device), tuple(images.shape[-2:]), self.seed, STREAM_RANDOM_MAP
        )


@register_method("edge")
class EdgeMap(ReferenceMap):
    """Sobel gradient magnitude of the image, a model-free baseline that XAI-TRIS (Clark,
    Wilming & Haufe 2023, arXiv:2306.12816, Sec. 4) found hard to beat for many XAI methods.

    Per channel ``c``, as ``skimage.filters.sobel``: ``G_x = K_x * I_c``, ``G_y = K_y * I_c``
    with ``K = [1, 0, −1] ⊗ [1, 2, 1] / 4`` (edge-replicating border, scipy's ``reflect`` for a
    3×3 kernel) and ``m_c = sqrt((G_x² + G_y²) / 2)``; channels are combined by their L2 norm,
    ``E = sqrt(Σ_c m_c²)`` (the colour-gradient magnitude; a grey image gives skimage's value).

    Normalisation: the method sees the NORMALISED image ``(x_c − μ_c) / σ_c``. Both kernels sum
    to zero, so the mean shift cancels exactly and channel ``c``'s gradient is ``1/σ_c`` times
    that of the pixel image: on the normalised image the channels are weighted by ``1/σ_c``
    (equal weights for equal σ, as the shapes benchmark; within 2 % for ImageNet's σ). Pass
    ``std`` (the datamodule's σ) to undo it — the map is then exactly the Sobel magnitude of the
    un-normalised image.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        layer: str | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(model, layer)
        if std is not None:
            std = [float(value) for value in std]
            if not std or any(not value > 0 for value in std):
                raise ConfigurationError(f"edge std must be positive per channel, got {std}")
        self.std = std

    def reference_map(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        channels = images.shape[1]
        if self.std is not None:
            if len(self.std) not in (1, channels):
                raise ConfigurationError(
                    f"edge std has {len(self.std)} values for images with {channels} channels"
                )
            images = images * torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        smooth = torch.tensor([1.0, 2.0, 1.0], device=images.device) / 4
        derivative = torch.tensor([1.0, 0.0, -1.0], device=images.device)
        # cross-correlation kernels; a convolution flips the sign only, squared below
        kernels = torch.stack([derivative[:, None] * smooth, smooth[:, None] * derivative])
        padded = F.pad(images.flatten(0, 1)[:, None], (1, 1, 1, 1), mode="replicate")
        gradients = F.conv2d(padded, kernels[:, None])  # [B·C, 2, H, W]
        squared = gradients.square().sum(dim=1) / 2
        return squared.view(images.shape[0], channels, *images.shape[-2:]).sum(dim=1).sqrt()
