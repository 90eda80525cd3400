"""CAMs computed from one forward pass and the layer gradients of all K classes."""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from saliency.gradients import class_gradients
from saliency.layers import default_layer, resolve_layer
from saliency.methods.base import SaliencyMethod
from saliency.methods.registry import register_method


class GradientCAM(SaliencyMethod):
    """A CAM that is a function of (activations, gradients) at one layer."""

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        super().__init__(model)
        self.layer = layer if layer is not None else default_layer(model)
        resolve_layer(model, self.layer)  # fail at construction, not at the first batch

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        captured = class_gradients(self.model, images, self.layer, classes)
        return self.cam(captured.activations, captured.gradients)

    @abstractmethod
    def cam(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]``, ``[B, K, C, h, w]`` → ``[B, K, h, w]``."""


@register_method("grad_cam")
class GradCAM(GradientCAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017, Eqs. 1–2), the base CASE modifies (CASE Sec. III).

    ``α_k^c = mean_{ij} ∂y^c/∂A^k_{ij}``;  ``L^c = ReLU(Σ_k α_k^c A^k)``.
    """

    def cam(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        weights = gradients.mean(dim=(-2, -1))  # [B, K, C]
        return torch.einsum("bkc,bchw->bkhw", weights, activations).relu()
