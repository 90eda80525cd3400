"""CAMs computed from one forward pass and the layer gradients of all K classes."""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from contrastive_saliency.feature_layout import check_layout, detect_layout
from contrastive_saliency.gradients import as_class_matrix, class_gradients
from contrastive_saliency.layers import capture_layer, default_layer, resolve_layer
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.registry import register_method


class GradientCAM(SaliencyMethod):
    """A CAM that is a function of (activations, gradients) at one layer.

    ``layer=None`` takes :func:`~contrastive_saliency.layers.default_layer`; ``layout`` (``"nchw"``,
    ``"nhwc"``, ``"tokens"``, ``None`` = detect) says how the layer's output becomes
    ``[B, C, h, w]`` (ViT tokens, channels-last maps): :mod:`contrastive_saliency.feature_layout`.
    """

    def __init__(
        self, model: nn.Module, layer: str | None = None, layout: str | None = None
    ) -> None:
        super().__init__(model)
        self.layer = layer if layer is not None else default_layer(model)
        resolve_layer(model, self.layer)  # fail at construction, not at the first batch
        self.layout = check_layout(layout)

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.signed_maps(images, classes).relu()

    def signed_maps(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The maps before the final ReLU, ``[B, K, h, w]`` at the layer's resolution (what
        Captum's ``LayerGradCam`` returns with its default ``relu_attributions=False``)."""
        classes = as_class_matrix(classes, images.shape[0])
        captured = class_gradients(self.model, images, self.layer, classes, layout=self.layout)
        return self.pre_relu(captured.activations, captured.gradients)

    def cam(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]``, ``[B, K, C, h, w]`` → ``[B, K, h, w]``: ReLU of :meth:`pre_relu`."""
        return self.pre_relu(activations, gradients).relu()

    @abstractmethod
    def pre_relu(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """The map before its final ReLU, ``[B, K, h, w]``; linear in the channel weights, so
        contrastive variants (Finer-CAM Eq. 8) can average it over reference classes."""


@register_method("grad_cam")
class GradCAM(GradientCAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017, Eqs. 1–2), the base CASE modifies (CASE Sec. III).

    ``α_k^c = mean_{ij} ∂y^c/∂A^k_{ij}``;  ``L^c = ReLU(Σ_k α_k^c A^k)``.
    """

    def pre_relu(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return weighted_sum(gradients.mean(dim=(-2, -1)), activations)


@register_method("grad_cam_pp")
class GradCAMPlusPlus(GradientCAM):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, Sec. 3, Eq. 19: exponential-score form).

    ``a^{kc}_{ij} = g² / (2 g² + Σ_{ab} A^k_{ab} g³ + eps)`` (0 where ``g = 0``),
    ``w_k^c = Σ_{ij} a^{kc}_{ij} ReLU(g)``, ``L^c = ReLU(Σ_k w_k^c A^k)`` with
    ``g = ∂y^c/∂A^k_{ij}``; ``eps = 1e-6`` as pytorch-grad-cam.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        eps: float = 1e-6,
        layout: str | None = None,
    ) -> None:
        super().__init__(model, layer, layout)
        self.eps = eps

    def pre_relu(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        squared = gradients.pow(2)
        activation_sums = activations.sum(dim=(-2, -1))[:, None, :, None, None]  # [B,1,C,1,1]
        denominator = 2 * squared + activation_sums * squared * gradients + self.eps
        alpha = _safe_divide(squared, denominator)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        weights = (alpha * gradients.relu()).sum(dim=(-2, -1))  # [B, K, C]
        return weighted_sum(weights, activations)


@register_method("xgrad_cam")
class XGradCAM(GradientCAM):
    """XGrad-CAM (Fu et al., BMVC 2020, Sec. 3): ``w_k^c = Σ_{ij} A^k_{ij} ∂y^c/∂A^k_{ij} /
    (Σ_{ij} A^k_{ij} + eps)``, ``L^c = ReLU(Σ_k w_k^c A^k)``; ``eps = 1e-7`` as pytorch-grad-cam.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        eps: float = 1e-7,
        layout: str | None = None,
    ) -> None:
        super().__init__(model, layer, layout)
        self.eps = eps

    def pre_relu(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        activation_sums = activations.sum(dim=(-2, -1))[:, None, :, None, None]
        normalised = _safe_divide(activations.unsqueeze(1), activation_sums + self.eps)
        weights = (gradients * normalised).sum(dim=(-2, -1))  # [B, K, C]
        return weighted_sum(weights, activations)


@register_method("layer_cam")
class LayerCAM(GradientCAM):
    """LayerCAM (Jiang et al., IEEE TIP 2021, Sec. III): element-wise weights
    ``w^{kc}_{ij} = ReLU(∂y^c/∂A^k_{ij})``, ``L^c = ReLU(Σ_k w^{kc} ⊙ A^k)``."""

    def pre_relu(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (gradients.relu() * activations.unsqueeze(1)).sum(dim=2)


@register_method("hires_cam")
class HiResCAM(GradientCAM):
    """HiResCAM (Draelos & Carin, 2020, Sec. 2): ``L^c = ReLU(Σ_k ∂y^c/∂A^k ⊙ A^k)``, the
    element-wise product of gradient and activation (no spatial averaging of the gradient)."""

    def pre_relu(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (gradients * activations.unsqueeze(1)).sum(dim=2)


@register_method("eigen_cam")
class EigenCAM(SaliencyMethod):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020, Sec. III): ReLU of the projection of the
    channel-centred activations on their first principal component; class-agnostic, so every
    requested class gets the same map. One forward, no gradients.

    Sign convention: the SVD fixes the component only up to sign (pytorch-grad-cam keeps
    whatever LAPACK returns). Here the sign is chosen so that the projection correlates
    non-negatively with the channel-summed, centred activation map (equivalently, the
    component's channel loadings sum to ≥ 0), so high total activation maps to positive values.
    Constant or all-zero activations give an all-zero map. Token and channels-last layers are
    turned into ``[B, C, h, w]`` first (``layout``, as :class:`GradientCAM`).
    """

    class_agnostic = True

    def __init__(
        self, model: nn.Module, layer: str | None = None, layout: str | None = None
    ) -> None:
        super().__init__(model)
        self.layer = layer if layer is not None else default_layer(model)
        resolve_layer(model, self.layer)
        self.layout = check_layout(layout)

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), capture_layer(self.model, self.layer, track_gradient=False) as cap:
            self.model(images)
            output = cap.output()
        grid = detect_layout(
            self.model, self.layer, output, images.shape[-2:], self.layout, images.shape[0]
        )
        activations = grid.to_grid(output)
        if activations.dtype in (torch.float16, torch.bfloat16):
            activations = activations.float()  # no half-precision SVD
        maps = first_component_projection(activations).relu()  # [B, h, w]
        return maps.unsqueeze(1).expand(-1, classes.shape[1], -1, -1)


def first_component_projection(activations: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, h, w]``: the positions (rows) of the channel-centred matrix
    ``X [hw, C]`` projected on its first right singular vector, signed as in :class:`EigenCAM`.
    Batched SVD over images; zero (centred) activations give zeros, never NaN."""
    batch, channels, height, width = activations.shape
    matrix = torch.nan_to_num(activations).reshape(batch, channels, -1).transpose(1, 2)
    centred = matrix - matrix.mean(dim=1, keepdim=True)  # [B, hw, C]
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    component = right[:, 0, :]  # [B, C]
    sign = torch.where(component.sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(component.dtype)
    projection = torch.einsum("bpc,bc->bp", centred, component * sign)
    return projection.reshape(batch, height, width)


def weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``Σ_k w_k A^k``: weights ``[B, K, C]``, activations ``[B, C, h, w]`` → ``[B, K, h, w]``."""
    return torch.einsum("bkc,bchw->bkhw", weights, activations)


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` with 0 where the denominator is exactly 0 (never NaN/inf)."""
    zero = denominator == 0
    return torch.where(
        zero, torch.zeros_like(numerator), numerator / denominator.masked_fill(zero, 1)
    )
