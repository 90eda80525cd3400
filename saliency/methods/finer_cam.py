"""Finer-CAM: explain ``y_c − γ·y_d`` against similar reference classes d (Zhang et al.)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from saliency.errors import ConfigurationError
from saliency.layers import default_layer
from saliency.methods._contrastive import Selector, reference_gradients
from saliency.methods.base import SaliencyMethod
from saliency.methods.gradient_cams import GradCAM, GradCAMPlusPlus, GradientCAM, LayerCAM
from saliency.methods.registry import register_method
from saliency.targets import LogitNeighbours

Weighting = Literal["mean", "softmax"]
_BASES: dict[str, type[GradientCAM]] = {
    "grad_cam": GradCAM,
    "layer_cam": LayerCAM,
    "grad_cam_pp": GradCAMPlusPlus,
}


@register_method("finer_cam")
class FinerCAM(SaliencyMethod):
    """Gradient-based Finer-CAM (``finer_cam.md``, Sec. 3.2, Eqs. 5–8).

    For target c and references ``d_1..d_T`` (``references(logits, c)``, default the T = 3
    classes with the nearest logits): the base CAM is applied to the gradient of
    ``y_c − γ y_t`` (Eqs. 5–6), i.e. for Grad-CAM ``α^{c,t} = α^c − γ α^t`` (Eq. 7), and the
    pre-ReLU maps are averaged over the references BEFORE the ReLU (Eq. 8):
    ``L^c = ReLU(1/T Σ_t Σ_k α_k^{c,t} A^k)``. ``γ = 0`` gives the base CAM.

    ``weighting="mean"`` (default, the paper): plain mean, ``gamma`` defaults to 0.6.
    ``weighting="softmax"`` (the later reference code, ``FinerWeightedTarget``): the base CAM of
    the gradient of ``Σ_t p_t (y_c − γ y_t) / (Σ_t p_t + 1e-9)`` with ``p = softmax(logits)``,
    ``gamma`` defaults to 1. Here the weights ``p_t`` are constants; the reference code also
    back-propagates through the softmax, which would need the gradients of all N classes.
    ``base``: ``"grad_cam"`` | ``"layer_cam"`` | ``"grad_cam_pp"``. ``layout`` (``"nchw"``,
    ``"nhwc"``, ``"tokens"``, ``None`` = detect): how the layer's output becomes
    ``[B, C, h, w]`` (:mod:`saliency.feature_layout`); the paper's ViT layer is
    ``blocks[-1].norm1`` (the default for timm ViTs).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        references: Selector | None = None,
        gamma: float | None = None,
        base: str = "grad_cam",
        weighting: Weighting = "mean",
        layout: str | None = None,
    ) -> None:
        super().__init__(model)
        if base not in _BASES:
            raise ConfigurationError(
                f"finer_cam base {base!r} is not supported; choose one of {', '.join(_BASES)}"
            )
        if weighting not in ("mean", "softmax"):
            raise ConfigurationError(
                f"finer_cam weighting must be 'mean' (paper) or 'softmax' (later code), got "
                f"{weighting!r}"
            )
        self.layer = layer if layer is not None else default_layer(model)
        self.base = _BASES[base](model, self.layer, layout=layout)  # validates layer, layout
        self.layout = self.base.layout
        self.references = references if references is not None else LogitNeighbours(3)
        self.gamma = float(gamma) if gamma is not None else (0.6 if weighting == "mean" else 1.0)
        self.weighting = weighting

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        captured, references = reference_gradients(
            self.model, images, self.layer, classes, self.references, self.layout
        )
        num_targets = classes.shape[1]
        num_references = references.shape[2]
        gradients = captured.gradients
        target = gradients[:, :num_targets].unsqueeze(2)  # [B, K, 1, C, h, w]
        reference = gradients[:, num_targets:].unflatten(1, (num_targets, num_references))
        differences = target - self.gamma * reference  # ∂(y_c − γ y_t)/∂A, [B, K, T, C, h, w]
        if self.weighting == "mean":
            maps = self.base.pre_relu(captured.activations, differences.flatten(1, 2))
            maps = maps.unflatten(1, (num_targets, num_references)).mean(dim=2)  # Eq. 8
        else:
            probabilities = captured.logits.softmax(dim=1)  # [B, N]
            weights = probabilities.gather(1, references.flatten(1)).view_as(references)
            weights = weights / (weights.sum(dim=2, keepdim=True) + 1e-9)  # [B, K, T]
            combined = (weights[..., None, None, None] * differences).sum(dim=2)
            maps = self.base.pre_relu(captured.activations, combined)
        return maps.relu()
