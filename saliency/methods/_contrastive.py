"""Shared by contrastive CAMs (CASE, Finer-CAM): targets + reference classes in one request."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from saliency.errors import ConfigurationError
from saliency.gradients import LayerGradients, class_gradients

Selector = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reference_gradients(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    targets: torch.Tensor,
    selector: Selector,
    layout: str | None = None,
) -> tuple[LayerGradients, torch.Tensor]:
    """Pick ``k`` references for each of the ``[B, K]`` targets and get the layer gradients of
    targets and references from ONE forward pass and ONE :func:`class_gradients` request.

    The selector runs on the logits of that forward (ConfusionContrast ignores them). Returns
    the captured tensors for the request ``[targets | references.flatten]`` (``[B, K + K·k]``)
    and the references ``[B, K, k]``. ``layout`` is passed on to :func:`class_gradients`.
    """
    batch = targets.shape[0]
    chosen: dict[str, torch.Tensor] = {}

    def request(logits: torch.Tensor) -> torch.Tensor:
        references = select_references(selector, logits, targets)
        chosen["references"] = references
        return torch.cat([targets, references.reshape(batch, -1)], dim=1)

    # Pass layout only when given: the default call keeps class_gradients' 4-argument form.
    extra = {"layout": layout} if layout is not None else {}
    captured = class_gradients(model, images, layer, request, **extra)
    return captured, chosen["references"]


def select_references(
    selector: Selector, logits: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The selector's ``k`` references for each of the ``[B, K]`` targets, ``[B, K, k]``, from
    the (detached) logits ``[B, N]`` (one selector call with the logits repeated per target)."""
    batch, num_targets = targets.shape
    flat_targets = targets.reshape(-1)
    logits = logits.detach()
    _check_selector_classes(selector, logits.shape[1])
    references = selector(logits.repeat_interleave(num_targets, dim=0), flat_targets)
    if (
        not isinstance(references, torch.Tensor)
        or references.dim() != 2
        or references.shape[0] != flat_targets.shape[0]
    ):
        raise ConfigurationError(
            f"the reference selector {selector!r} must return LongTensor[B, k] for B "
            f"targets; got {getattr(references, 'shape', type(references).__name__)} for "
            f"{flat_targets.shape[0]} targets"
        )
    return references.long().to(targets.device).reshape(batch, num_targets, -1)


def _check_selector_classes(selector: Selector, num_outputs: int) -> None:
    expected = getattr(selector, "num_classes", None)  # e.g. a confusion matrix's size
    if expected is not None and expected != num_outputs:
        raise ConfigurationError(
            f"the selector {selector!r} is built for {expected} classes but the model outputs "
            f"{num_outputs} logits; use the confusion matrix of this model's run"
        )
