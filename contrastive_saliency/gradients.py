"""The one-forward, many-classes gradient primitive every gradient CAM is built on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.feature_layout import check_layout, detect_layout
from contrastive_saliency.layers import capture_layer


@dataclass(frozen=True)
class LayerGradients:
    """Activations ``[B, C, h, w]``, logits ``[B, N]``, the explained ``classes`` ``[B, K]`` and
    ``gradients[b, k] = d logits[b, classes[b, k]] / d activations[b]`` as ``[B, K, C, h, w]``
    (from :func:`score_gradients`: ``classes`` is None and ``gradients[b, k]`` is the gradient
    of score column k).

    Token and channels-last layers are already converted to this grid
    (:mod:`contrastive_saliency.feature_layout`); ViT prefix tokens are dropped from both tensors."""

    activations: torch.Tensor
    logits: torch.Tensor
    classes: torch.Tensor | None
    gradients: torch.Tensor


def as_class_matrix(classes: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Accept ``LongTensor[B]`` or ``LongTensor[B, K]`` and return ``[B, K]``."""
    if not isinstance(classes, torch.Tensor) or classes.dtype not in (torch.int64, torch.int32):
        raise ConfigurationError(
            f"classes must be an integer tensor of shape [B] or [B, K], got "
            f"{getattr(classes, 'dtype', type(classes).__name__)}"
        )
    if classes.dim() == 1:
        classes = classes.unsqueeze(1)
    if classes.dim() != 2 or classes.shape[0] != batch_size:
        raise ConfigurationError(
            f"classes has shape {tuple(classes.shape)}; expected [{batch_size}] or "
            f"[{batch_size}, K] for a batch of {batch_size} images"
        )
    return classes.long()


ClassRequest = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
"""``LongTensor[B]``/``[B, K]``, or a function of the logits ``[B, N]`` returning one."""


def class_gradients(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    classes: ClassRequest,
    layout: str | None = None,
) -> LayerGradients:
    """One forward pass, then the gradient of each requested logit w.r.t. ``layer``'s output.

    The model runs in eval mode, so samples are independent and the gradient of
    ``logits[:, classes[:, k]].sum()`` w.r.t. the activations holds every sample's own gradient:
    K backward passes through the part of the network after the layer, no parameter gradients.
    Works under ``torch.no_grad`` and ``torch.inference_mode`` callers (grad is enabled here).

    ``classes`` may be a function of the (detached) logits, called after the forward pass and
    before any backward: classes chosen from the prediction (top-k, logit neighbours) then
    cost no second forward.

    ``layout`` (``"nchw"``, ``"nhwc"``, ``"tokens"`` or ``None`` to detect) says how the layer's
    output becomes ``[B, C, h, w]``: see :func:`contrastive_saliency.feature_layout.detect_layout`. It is
    decided right after the forward, before any backward, so a wrong layer fails fast.
    """
    layout = check_layout(layout)
    if not callable(classes):
        classes = as_class_matrix(classes, images.shape[0]).to(images.device)
    # Gradients are enabled locally, so callers under no_grad or inference_mode get maps too;
    # an inference tensor cannot enter autograd, a normal copy of it can.
    with torch.inference_mode(False), torch.enable_grad():
        if images.is_inference():
            images = images.clone()
        return _class_gradients(model, images, layer, classes, layout)


def score_gradients(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    scores: Callable[[torch.Tensor], torch.Tensor],
    layout: str | None = None,
) -> LayerGradients:
    """One forward pass, then the gradient of each column of ``scores(logits)`` (``[B, K]``, any
    differentiable function of the logits ``[B, N]``, e.g. Finer-CAM's softmax-weighted logit
    differences) w.r.t. ``layer``'s output: K backward passes, through ``scores`` and the part
    of the network after the layer. ``classes`` of the result is None. Grad is enabled here,
    as in :func:`class_gradients`; ``layout`` as there."""
    layout = check_layout(layout)
    with torch.inference_mode(False), torch.enable_grad():
        if images.is_inference():
            images = images.clone()
        return _layer_gradients(model, images, layer, scores, layout)


def _class_gradients(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    classes: ClassRequest,
    layout: str | None,
) -> LayerGradients:
    chosen: dict[str, torch.Tensor] = {}

    def scores(logits: torch.Tensor) -> torch.Tensor:
        request = classes(logits.detach()) if callable(classes) else classes
        request = as_class_matrix(request, images.shape[0]).to(images.device)
        _check_classes(request, logits.shape[1])
        chosen["classes"] = request
        return logits.gather(1, request)

    captured = _layer_gradients(model, images, layer, scores, layout)
    return LayerGradients(
        captured.activations, captured.logits, chosen["classes"], captured.gradients
    )


def _layer_gradients(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    scores: Callable[[torch.Tensor], torch.Tensor],
    layout: str | None,
) -> LayerGradients:
    with capture_layer(model, layer) as capture:
        logits = model(images)
        activations = capture.output()
        grid = detect_layout(
            model, layer, activations, images.shape[-2:], layout, batch_size=images.shape[0]
        )
        values = scores(logits)
        count = values.shape[1]
        gradients = [
            torch.autograd.grad(values[:, k].sum(), activations, retain_graph=k < count - 1)[0]
            for k in range(count)
        ]
    return LayerGradients(
        activations=_at_least_float32(grid.to_grid(activations.detach()).contiguous()),
        logits=_at_least_float32(logits.detach()),
        classes=None,
        gradients=_at_least_float32(
            grid.gradients_to_grid(torch.stack(gradients, dim=1)).contiguous()
        ),
    )


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision results (from a model run under ``torch.autocast``) as float32, so the
    CAM formulas that follow do not lose them to float16 underflow (Grad-CAM++ cubes the
    gradients: a float16 gradient of 1e-3 cubed is below float16's smallest normal number)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def _check_classes(classes: torch.Tensor, num_outputs: int) -> None:
    if classes.numel() and (classes.min() < 0 or classes.max() >= num_outputs):
        raise ConfigurationError(
            f"class indices must lie in [0, {num_outputs - 1}] for a model with {num_outputs} "
            f"outputs; got min {int(classes.min())}, max {int(classes.max())}"
        )
