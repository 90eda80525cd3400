"""Shared by contrastive CAMs (CASE, Finer-CAM): targets + reference classes in one request."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from saliency.errors import ConfigurationError
from saliency.gradients import LayerGradients, class_gradients
from saliency.layers import capture_layer

Selector = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def reference_gradients(
    model: nn.Module, images: torch.Tensor, layer: str, targets: torch.Tensor, selector: Selector
) -> tuple[LayerGradients, torch.Tensor]:
    """Pick ``k`` references for each of the ``[B, K]`` targets and get the layer gradients of
    targets and references from ONE :func:`class_gradients` call.

    Returns the captured tensors for the request ``[targets | references.flatten]``
    (``[B, K + K·k]``) and the references ``[B, K, k]``. Selectors with ``needs_logits``
    (logit-based: LogitNeighbours, TopPredictions) first need the logits, obtained from one
    gradient-free forward; ConfusionContrast needs none.
    """
    batch, num_targets = targets.shape
    logits = None
    if getattr(selector, "needs_logits", True):
        with torch.no_grad(), capture_layer(model, layer, track_gradient=False):
            logits = model(images)
        logits = logits.repeat_interleave(num_targets, dim=0)
    flat_targets = targets.reshape(-1)
    references = selector(logits, flat_targets)
    if (
        not isinstance(references, torch.Tensor)
        or references.dim() != 2
        or references.shape[0] != flat_targets.shape[0]
    ):
        raise ConfigurationError(
            f"the reference selector {selector!r} must return LongTensor[B, k] for B targets; "
            f"got {getattr(references, 'shape', type(references).__name__)} for "
            f"{flat_targets.shape[0]} targets"
        )
    references = references.long().to(targets.device).reshape(batch, num_targets, -1)
    request = torch.cat([targets, references.reshape(batch, -1)], dim=1)
    captured = class_gradients(model, images, layer, request)
    expected = getattr(selector, "num_classes", None)  # e.g. a confusion matrix's size
    if expected is not None and expected != captured.logits.shape[1]:
        raise ConfigurationError(
            f"the selector {selector!r} is built for {expected} classes but the model outputs "
            f"{captured.logits.shape[1]} logits; use the confusion matrix of this model's run"
        )
    return captured, references
