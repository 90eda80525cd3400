"""CASE: Grad-CAM with the target gradient projected orthogonal to the mean gradient of the
classes the model confuses it with (Contrastive Activation for Saliency Estimation)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.feature_layout import check_layout
from contrastive_saliency.layers import default_layer, resolve_layer
from contrastive_saliency.methods._contrastive import Selector, reference_gradients
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.gradient_cams import weighted_sum
from contrastive_saliency.methods.registry import register_method
from contrastive_saliency.targets import PADDING

Projection = Literal["full", "weights"]


@register_method("case")
class CASE(SaliencyMethod):
    """CASE (``case.md``, Sec. III-B–E, Alg. 1, Eqs. 2–6).

    For target ``u`` with contrast set ``V = contrast(logits, u)`` (Eq. 2; usually
    :class:`~contrastive_saliency.targets.ConfusionContrast`): ``γ̄ = mean_{v∈V} ∇_A s_v`` (Eq. 4),
    ``γ⊥ = γ_u − <γ_u, γ̄>/(‖γ̄‖² + ε) γ̄`` (Eq. 5), ``S = ReLU(Σ_k w_k A^k)`` (Eq. 6).

    ``projection="full"`` (default, the paper's Alg. 1): project the full gradient tensors
    ``[C, h, w]`` (inner product over channels and positions), then pool ``w = mean_{ij} γ⊥``.
    ``projection="weights"`` (the public reference code): pool first, ``w_u = mean_{ij} γ_u``,
    ``w̄ = mean_v mean_{ij} γ_v``, and project the channel-weight vectors ``[C]``. Pooling is
    linear, so both give ``w_u − c·w̄`` and differ only in the coefficient ``c``.
    Targets and contrasts come from one forward and one :func:`class_gradients` call.
    ``eps`` (unspecified in the paper) defaults to 1e-8. A contrast set with empty slots
    (``ConfusionContrast(fallback="none")`` for a target with fewer than k confusions) averages
    γ̄ over its valid contrasts; with none, γ̄ = 0 and the map is plain Grad-CAM. ``layout`` (``"nchw"``, ``"nhwc"``,
    ``"tokens"``, ``None`` = detect): how the layer's output becomes ``[B, C, h, w]``
    (:mod:`contrastive_saliency.feature_layout`), so CASE also runs on ViT token layers.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        contrast: Selector | None = None,
        projection: Projection = "full",
        eps: float = 1e-8,
        layout: str | None = None,
    ) -> None:
        super().__init__(model)
        if contrast is None:
            raise ConfigurationError(
                "case needs a contrast selector: pass contrast=ConfusionContrast("
                "'outputs/<run>/confusion_matrix.npy', k=3) (from contrastive_saliency.targets)"
            )
        if projection not in ("full", "weights"):
            raise ConfigurationError(
                f"case projection must be 'full' (paper) or 'weights' (reference code), got "
                f"{projection!r}"
            )
        if not eps >= 0:
            raise ConfigurationError(f"case eps must be >= 0, got {eps!r}")
        self.layer = layer if layer is not None else default_layer(model)
        resolve_layer(model, self.layer)
        self.contrast = contrast
        self.projection = projection
        self.eps = eps
        self.layout = check_layout(layout)

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        captured, contrasts = reference_gradients(
            self.model, images, self.layer, classes, self.contrast, self.layout,
            allow_padding=True,
        )  # fmt: skip
        num_targets = classes.shape[1]
        gradients = captured.gradients  # [B, K + K·k, C, h, w]
        target = gradients[:, :num_targets]  # [B, K, C, h, w]
        contrast = gradients[:, num_targets:].unflatten(1, contrasts.shape[1:])
        # Eq. 4 over the valid contrasts only (empty slots: fallback "none"); none → γ̄ = 0.
        valid = (contrasts != PADDING).to(contrast.dtype)  # [B, K, k]
        count = valid.sum(dim=2).clamp_min(1.0)
        weights = (valid / count[..., None])[..., None, None, None]
        mean_contrast = (weights * contrast).sum(dim=2)  # [B, K, C, h, w]  (Eq. 4)
        if self.projection == "full":
            weights = project_out(target.flatten(2), mean_contrast.flatten(2), self.eps)
            weights = weights.view_as(target).mean(dim=(-2, -1))  # [B, K, C]
        else:
            weights = project_out(
                target.mean(dim=(-2, -1)), mean_contrast.mean(dim=(-2, -1)), self.eps
            )
        return weighted_sum(weights, captured.activations).relu()  # Eq. 6


def project_out(vectors: torch.Tensor, direction: torch.Tensor, eps: float) -> torch.Tensor:
    """CASE Eq. 5 over the last dim: ``γ − <γ, γ̄>/(‖γ̄‖² + ε) γ̄`` (a zero ``γ̄`` with
    ``ε = 0`` leaves ``γ`` unchanged instead of giving NaN)."""
    inner = (vectors * direction).sum(dim=-1, keepdim=True)
    norm = direction.pow(2).sum(dim=-1, keepdim=True) + eps
    coefficient = torch.where(norm > 0, inner / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0)
    return vectors - coefficient * direction
