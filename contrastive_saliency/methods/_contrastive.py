"""Shared by contrastive CAMs (CASE, Finer-CAM): targets + reference classes in one request."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import LayerGradients, class_gradients
from contrastive_saliency.targets import PADDING

Selector = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reference_gradients(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    targets: torch.Tensor,
    selector: Selector,
    layout: str | None = None,
    allow_padding: bool = False,
) -> tuple[LayerGradients, torch.Tensor]:
    """Pick ``k`` references for each of the ``[B, K]`` targets and get the layer gradients of
    targets and references from ONE forward pass and ONE :func:`class_gradients` request.

    The selector runs on the logits of that forward. Returns the captured tensors for the
    request ``[targets | references.flatten]`` (``[B, K + K·k]``) and the references
    ``[B, K, k]``. ``layout`` is passed on to :func:`class_gradients`.

    Empty slots (:data:`~contrastive_saliency.targets.PADDING`, a ``ConfusionContrast`` with
    ``fallback="none"``) are accepted only with ``allow_padding``: the references keep ``-1``
    there and the gradient requested for that slot is the target's own (a placeholder the
    caller must mask out). Otherwise they are an error naming the fix.
    """
    batch = targets.shape[0]
    chosen: dict[str, torch.Tensor] = {}

    def request(logits: torch.Tensor) -> torch.Tensor:
        references = select_references(selector, logits, targets, allow_padding)
        empty = references == PADDING
        chosen["references"] = references
        requested = torch.where(empty, targets[:, :, None], references)
        return torch.cat([targets, requested.reshape(batch, -1)], dim=1)

    # Pass layout only when given: the default call keeps class_gradients' 4-argument form.
    extra = {"layout": layout} if layout is not None else {}
    captured = class_gradients(model, images, layer, request, **extra)
    return captured, chosen["references"]


def select_references(
    selector: Selector, logits: torch.Tensor, targets: torch.Tensor, allow_padding: bool = False
) -> torch.Tensor:
    """The selector's ``k`` references for each of the ``[B, K]`` targets, ``[B, K, k]``, from
    the (detached) logits ``[B, N]`` (one selector call with the logits repeated per target).
    Empty slots (:data:`~contrastive_saliency.targets.PADDING`) are an error unless ``allow_padding``."""
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
    references = references.long().to(targets.device).reshape(batch, num_targets, -1)
    if not allow_padding and bool((references == PADDING).any()):
        raise ConfigurationError(
            f"the reference selector {selector!r} left contrast slots empty (fallback "
            f"'none'), but this method needs k references for every target: use "
            f"fallback: top_predictions"
        )
    return references


def _check_selector_classes(selector: Selector, num_outputs: int) -> None:
    expected = getattr(selector, "num_classes", None)  # e.g. a confusion matrix's size
    if expected is not None and expected != num_outputs:
        raise ConfigurationError(
            f"the selector {selector!r} is built for {expected} classes but the model outputs "
            f"{num_outputs} logits; use the confusion matrix of this model's run"
        )
