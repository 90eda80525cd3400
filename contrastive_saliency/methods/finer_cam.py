"""Finer-CAM: explain ``y_c − γ·y_d`` against similar reference classes d (Zhang et al.)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import _check_classes, score_gradients
from contrastive_saliency.layers import default_layer
from contrastive_saliency.methods._contrastive import (
    Selector,
    reference_gradients,
    select_references,
)
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.gradient_cams import (
    GradCAM,
    GradCAMPlusPlus,
    GradientCAM,
    LayerCAM,
)
from contrastive_saliency.methods.registry import register_method
from contrastive_saliency.targets import LogitNeighbours

Weighting = Literal["mean", "softmax", "softmax_constant"]
WEIGHTINGS = ("mean", "softmax", "softmax_constant")
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
    ``weighting="softmax"`` (the authors' current code, ``FinerWeightedTarget``): the base CAM
    of the gradient of ``S = Σ_t p_t (y_c − γ y_t) / (Σ_t p_t + 1e-9)`` with
    ``p = softmax(logits)``, back-propagated through ``p`` as the code does (one backward per
    target through the score); ``gamma`` defaults to 1 (the code's ``alpha``).
    ``weighting="softmax_constant"`` (an option of this library): the same ``S`` with the
    weights ``p_t`` held constant, ``Σ_t p_t (∇y_c − γ ∇y_t) / (Σ_t p_t + 1e-9)``.
    References (``references``): :class:`~contrastive_saliency.targets.LogitNeighbours` ``(3)`` by default,
    the classes ranked just below the target (Table 2); ``LogitNeighbours(3, mode="nearest")``
    is the authors' code's choice for a target that is not the top-1.
    ``base``: ``"grad_cam"`` | ``"layer_cam"`` | ``"grad_cam_pp"``. ``layout`` (``"nchw"``,
    ``"nhwc"``, ``"tokens"``, ``None`` = detect): how the layer's output becomes
    ``[B, C, h, w]`` (:mod:`contrastive_saliency.feature_layout`); the paper's ViT layer is
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
        if weighting not in WEIGHTINGS:
            raise ConfigurationError(
                f"finer_cam weighting must be 'mean' (paper), 'softmax' (the authors' code: "
                f"gradients through the softmax weights) or 'softmax_constant' (the weights "
                f"held constant), got {weighting!r}"
            )
        self.layer = layer if layer is not None else default_layer(model)
        self.base = _BASES[base](model, self.layer, layout=layout)  # validates layer, layout
        self.layout = self.base.layout
        self.references = references if references is not None else LogitNeighbours(3)
        self.gamma = float(gamma) if gamma is not None else (0.6 if weighting == "mean" else 1.0)
        self.weighting = weighting

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if self.weighting == "softmax":
            return self._softmax_weighted(images, classes)
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

    def _softmax_weighted(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The authors' code: the base CAM of ∇S with S differentiated through the softmax."""
        classes = classes.to(images.device)

        def score(logits: torch.Tensor) -> torch.Tensor:  # [B, N] → S per target, [B, K]
            _check_classes(classes, logits.shape[1])
            references = select_references(self.references, logits, classes)  # [B, K, T]
            flat = references.flatten(1)
            weights = logits.softmax(dim=1).gather(1, flat).view_as(references)  # not detached
            others = logits.gather(1, flat).view_as(references)
            differences = logits.gather(1, classes)[..., None] - self.gamma * others
            return (weights * differences).sum(dim=2) / (weights.sum(dim=2) + 1e-9)

        captured = score_gradients(self.model, images, self.layer, score, self.layout)
        return self.base.pre_relu(captured.activations, captured.gradients).relu()
