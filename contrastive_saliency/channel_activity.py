"""Active channels of several layers in one forward pass (CASE Sec. V-B, Eq. 10).

CASE's layer ablation counts, per image, the channels of the explained layer whose spatially
pooled activation exceeds a small threshold,

    â_c = (1 / HW) Σ_i Σ_j A_c(i, j),   channel c active iff â_c > τ   (Eq. 10, τ = 0.001),

then averages the counts per class over the correctly predicted images and draws a KDE of
these per-class means across classes (Figs. 5–6). :func:`active_channel_counts` hooks every
requested layer at once, so one forward pass gives the counts of all layers and the logits
(for the predictions). Each layer's output is laid out as ``[B, C, h, w]`` by
:mod:`contrastive_saliency.feature_layout` first (channels-last maps are permuted; a ViT's patch tokens are
put back on the patch grid and its class/register tokens dropped), so ``C`` is the channel
dimension and the mean runs over the spatial positions. The counting itself is
:func:`contrastive_saliency.metrics.functional.representation.channel_activity`, the per-class means
:func:`~contrastive_saliency.metrics.functional.representation.class_channel_activity`.

The counts are taken inside the forward hook, before any later in-place operation (a
``ReLU(inplace=True)`` after a ``BatchNorm2d``) could change the layer's output. Hooks exist only
during the call; the model's train/eval mode is restored afterwards, also on error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.feature_layout import FeatureLayout, check_layout, detect_layout
from contrastive_saliency.layers import resolve_layer
from contrastive_saliency.metrics.functional.representation import (
    ClassChannelActivity,
    channel_activity,
    class_channel_activity,
)

CASE_THRESHOLD = 0.001  # τ of CASE Sec. V-B


@dataclass(frozen=True)
class LayerActivity:
    """What :func:`active_channel_counts` found for one batch.

    ``logits``: ``[B, N]``; ``counts``: per layer, the number of active channels of each image
    ``[B]`` (int64); ``channels``: per layer, its channel count ``C``; ``layouts``: how each
    layer's output was arranged as ``[B, C, h, w]``.
    """

    logits: torch.Tensor
    counts: dict[str, torch.Tensor]
    channels: dict[str, int]
    layouts: dict[str, FeatureLayout]


def check_threshold(threshold: float) -> float:
    """A finite threshold τ (any sign: activations before a ReLU may be negative)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ConfigurationError(f"threshold τ must be a number, got {threshold!r}")
    if not torch.isfinite(torch.tensor(float(threshold))):
        raise ConfigurationError(f"threshold τ must be finite, got {threshold!r}")
    return float(threshold)


def check_layers(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """The layer paths, validated against ``model``: a non-empty list of distinct submodule
    paths. Unknown paths raise :class:`~contrastive_saliency.errors.UnknownLayerError` naming close ones."""
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise ConfigurationError(
            f"layers must be a non-empty list of dotted layer paths, got {layers!r}"
        )
    seen: set[str] = set()
    for layer in layers:
        if not isinstance(layer, str) or not layer:
            raise ConfigurationError(f"every layer must be a dotted path string, got {layer!r}")
        if layer in seen:
            raise ConfigurationError(f"layer {layer!r} is listed twice in {list(layers)}")
        seen.add(layer)
        resolve_layer(model, layer)
    return list(layers)


def active_channel_counts(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[str],
    threshold: float = CASE_THRESHOLD,
    layout: str | None = None,
) -> LayerActivity:
    """Active channels ``Σ_c 1[â_c > τ]`` (CASE Eq. 10) of every layer in ``layers`` for each of
    the ``[B, 3, H, W]`` ``images``, from ONE forward pass of ``model`` in eval mode without
    gradients. ``layout`` forces the layout of every layer (``None``: detect per layer).

    Raises :class:`ConfigurationError` for an unknown layer (before the forward pass), a layer
    that does not run or runs more than once per forward pass, or an output that is not a
    feature map.
    """
    layers = check_layers(model, layers)
    threshold = check_threshold(threshold)
    layout = check_layout(layout)
    if images.dim() != 4:
        raise ConfigurationError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    batch = images.shape[0]
    counts: dict[str, torch.Tensor] = {}
    channels: dict[str, int] = {}
    layouts: dict[str, FeatureLayout] = {}
    calls = dict.fromkeys(layers, 0)

    def hook_for(layer: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            calls[layer] += 1
            if calls[layer] > 1:
                return  # reported after the forward pass
            if not isinstance(output, torch.Tensor):
                raise ConfigurationError(
                    f"layer {layer!r} returns {type(output).__name__}, not a tensor; choose a "
                    f"layer whose output is a feature map"
                )
            found = detect_layout(model, layer, output, images.shape[-2:], layout, batch)
            grid = found.to_grid(output.detach())
            counts[layer] = channel_activity(grid, threshold)
            channels[layer] = int(grid.shape[1])
            layouts[layer] = found

        return hook

    was_training = model.training
    handles = [
        resolve_layer(model, layer).register_forward_hook(hook_for(layer)) for layer in layers
    ]
    try:
        model.eval()
        with torch.no_grad():
            logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for layer in layers:
        if calls[layer] == 0:
            raise ConfigurationError(
                f"layer {layer!r} was not called during the forward pass: choose a layer on the "
                f"path from the input to the logits"
            )
        if calls[layer] > 1:
            raise ConfigurationError(
                f"layer {layer!r} ran {calls[layer]} times in one forward pass (a shared "
                f"module); choose a layer that runs once per forward"
            )
    return LayerActivity(logits, counts, channels, layouts)


def per_class_active_channels(
    counts: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    predictions: torch.Tensor | None = None,
) -> ClassChannelActivity:
    """Mean active channels per class (CASE Sec. V-B) from per-image ``counts`` ``[N]``.

    With ``predictions`` ``[N]`` only correctly predicted images count (``predictions ==
    labels``, the paper's protocol); without, every image counts. ``.mean[c]`` is the mean over
    class ``c``'s counted images, ``.present`` says which classes have any (the KDE runs over
    those).
    """
    correct = None if predictions is None else predictions.long() == labels.long()
    return class_channel_activity(counts, labels.long(), num_classes, correct)
