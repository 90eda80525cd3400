"""Confidence-based faithfulness metrics: confidence drop, relative drop, AD / IC / AG.

Every function takes ``(model, images, maps, classes, ...)`` with ``images`` ``[B, C, H, W]``
in the model's input (normalised) space, ``maps`` ``[B, H, W]`` (or ``[B, 1, H, W]``) at the
image resolution and ``classes`` ``[B]``. Original and perturbed images go through the model
together in forward batches of ``batch_size`` under ``torch.no_grad()``. Per-sample values are
returned as fractions; papers report their mean ×100 (AD, IC, AG), which is left to the caller.

The hard-masking metrics (confidence drop, relative drop) take the samples' dataset
``indices`` ``[B]`` (keyword-only): ties among the top pixels are broken uniformly at random,
keyed by the index (:mod:`contrastive_saliency.metrics.functional.ties`), never by pixel position.
"""

from __future__ import annotations

import torch
from torch import nn

from contrastive_saliency.metrics.functional.feature_agreement import top_fraction_count
from contrastive_saliency.metrics.functional.ties import top_k_positions


def _flat_maps(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``[B, H·W]`` maps checked against ``[B, C, H, W]`` images."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.shape != (b, h, w):
        raise ValueError(
            f"maps must be [{b}, {h}, {w}] to match the images, got {tuple(maps.shape)}; "
            "upsample them to the image resolution first"
        )
    return maps.reshape(b, h * w)


def _check_classes(classes: torch.Tensor, batch: int, name: str = "classes") -> torch.Tensor:
    if classes.dim() != 1 or classes.shape[0] != batch:
        raise ValueError(f"{name} must be [{batch}] class indices, got {tuple(classes.shape)}")
    return classes.long()


@torch.no_grad()
def softmax_scores(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Softmax of ``model(images)`` over classes, ``[N, num_classes]``, in chunks of
    ``batch_size`` images under ``torch.no_grad()``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return torch.cat([model(chunk).float().softmax(dim=1) for chunk in images.split(batch_size)])


def mask_top_pixels(
    images: torch.Tensor,
    maps: torch.Tensor,
    fraction: float,
    fill: float = 0.0,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Images with the ``k = round(fraction · H·W)`` most salient pixels (all channels) set to
    ``fill`` (0 = the dataset mean in normalised space).

    Pixels rank by value, descending (NaN last); ties at the ``k``-th value are broken
    uniformly at random, keyed by the samples' dataset ``indices`` ``[B]``
    (:func:`~contrastive_saliency.metrics.functional.ties.top_k_positions`), so a map with fewer than ``k``
    positive pixels masks a random spread of its zero pixels, the same on every process and in
    every batch, and never a raster block."""
    flat = _flat_maps(images, maps)
    b, _, h, w = images.shape
    k = top_fraction_count(h * w, fraction)
    removed = torch.zeros(b, h * w, dtype=torch.bool, device=flat.device)
    removed.scatter_(1, top_k_positions(flat, indices.to(flat.device), k), True)
    return images.masked_fill(removed.to(images.device).view(b, 1, h, w), fill)


@torch.no_grad()
def masked_confidences(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    fraction: float = 0.05,
    fill: float = 0.0,
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax scores before and after :func:`mask_top_pixels`, from one (chunked) forward.

    ``classes`` is ``[B]`` or ``[B, K]``; returns ``(before, after, probs)`` where ``before``
    and ``after`` have the shape of ``classes`` and ``probs`` is the original images' full
    ``[B, num_classes]`` softmax.
    """
    original, perturbed = _masked_probabilities(
        model, images, maps, fraction, fill, batch_size, indices
    )
    index = classes.long().to(original.device).view(images.shape[0], -1)
    before = original.gather(1, index).view_as(classes)
    after = perturbed.gather(1, index).view_as(classes)
    return before, after, original


def _masked_probabilities(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    fraction: float,
    fill: float,
    batch_size: int,
    indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full softmax of the original and of the top-pixel-masked images, ``[B, N]`` each."""
    masked = mask_top_pixels(images, maps, fraction, fill, indices=indices)
    probs = softmax_scores(model, torch.cat([images, masked]), batch_size)
    return probs[: images.shape[0]], probs[images.shape[0] :]


def confidence_drop(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    fraction: float = 0.05,
    fill: float = 0.0,
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Confidence drop ``p_c(x) − p_c(x̃)`` per sample, ``[B]`` (CASE RQ2, Sec. IV-C).

    ``x̃`` is ``x`` with the top ``fraction`` of pixels by saliency (5 %, as the feature
    agreement's k) set to ``fill`` = 0 in normalised space (:func:`mask_top_pixels`, ties
    keyed by the samples' dataset ``indices``); ``p_c`` is the softmax score of ``classes``
    (CASE: the predicted class, correctly classified images only; filtering is the caller's).
    Larger = more faithful.
    """
    classes = _check_classes(classes, images.shape[0])
    before, after, _ = masked_confidences(
        model, images, maps, classes, fraction, fill, batch_size, indices=indices
    )
    return before - after


def relative_drop(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    reference_classes: torch.Tensor | None = None,
    fraction: float = 0.05,
    fill: float = 0.0,
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Relative confidence drop ``RD = (p_c − p*_c) − (p_d − p*_d)``, ``[B]`` (Finer-CAM Eq. 10).

    ``p`` are softmax scores before and ``p*`` after masking the top ``fraction`` of pixels
    (Finer-CAM reports 5 % and 10 %) with ``fill`` (:func:`mask_top_pixels`, ties keyed by the
    samples' dataset ``indices``). ``d`` is ``reference_classes`` (the most
    similar class); when ``None``, the most probable class other than ``c`` on the original
    image. Larger = the map is more discriminative of ``c`` against ``d``.
    """
    b = images.shape[0]
    classes = _check_classes(classes, b)
    original, perturbed = _masked_probabilities(
        model, images, maps, fraction, fill, batch_size, indices
    )
    classes = classes.to(original.device)
    if reference_classes is None:
        others = original.scatter(1, classes.view(-1, 1), -1.0)
        reference_classes = others.argmax(dim=1)
    else:
        reference_classes = _check_classes(reference_classes, b, "reference_classes")
        reference_classes = reference_classes.to(original.device)
        if torch.any(reference_classes == classes):
            raise ValueError(
                "reference_classes equal classes for some samples, which makes RD 0; pass a "
                "different (most similar) class, or None to use the runner-up prediction"
            )
    pair = torch.stack([classes, reference_classes], dim=1)
    before, after = original.gather(1, pair), perturbed.gather(1, pair)
    return (before[:, 0] - after[:, 0]) - (before[:, 1] - after[:, 1])


def _unit_maps(maps: torch.Tensor, normalise: bool) -> torch.Tensor:
    flat = maps.flatten(1)
    if not normalise:
        if flat.numel() and (flat.min() < 0 or flat.max() > 1):
            raise ValueError(
                f"maps must lie in [0, 1] for the soft mask, got {flat.min().item():.3g}.."
                f"{flat.max().item():.3g}; pass normalise=True to min-max normalise them"
            )
        return maps
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    positive = span > 0
    return torch.where(positive, (flat - low) / span.where(positive, 1), 0.0).view_as(maps)


@torch.no_grad()
def soft_mask_confidences(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    normalise: bool = True,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, O)``: softmax scores of ``classes`` on ``x`` and on ``x ⊙ E``, ``[B]`` each, from one
    (chunked) forward (Grad-CAM++, Chattopadhyay et al. 2018;
    ClusCAM App. C).

    ``E`` is the map min-max normalised to [0, 1] per sample when ``normalise`` (a constant map
    becomes all zeros), else it must already lie in [0, 1]. The product is taken in the model's
    input space and broadcast over channels.
    """
    flat = _flat_maps(images, maps)
    b, _, h, w = images.shape
    classes = _check_classes(classes, b)
    unit = _unit_maps(flat, normalise).view(b, 1, h, w).to(images.dtype)
    probs = softmax_scores(model, torch.cat([images, images * unit]), batch_size)
    index = classes.to(probs.device).view(-1, 1)
    return probs[:b].gather(1, index)[:, 0], probs[b:].gather(1, index)[:, 0]


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    positive = denominator > 0
    return torch.where(positive, numerator / denominator.where(positive, 1), 0.0)


def average_drop(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    normalise: bool = True,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample Average Drop term ``max(0, Y − O) / Y`` (ClusCAM App. C Eq. 11;
    Grad-CAM++).

    ``Y``/``O`` as in :func:`soft_mask_confidences`. AD = mean × 100, lower is better.
    """
    return drop_increase_gain(model, images, maps, classes, normalise, batch_size)["average_drop"]


def increase_in_confidence(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    normalise: bool = True,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample Increase-in-Confidence indicator ``1[O > Y]`` (ClusCAM App. C Eq. 12;
    Grad-CAM++). IC = mean × 100, higher is better."""
    terms = drop_increase_gain(model, images, maps, classes, normalise, batch_size)
    return terms["increase_in_confidence"]


def average_gain(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    normalise: bool = True,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample Average Gain term ``max(0, O − Y) / (1 − Y)`` (ClusCAM App. C Eq. 13;
    Opti-CAM); 0 when ``Y = 1``. AG = mean × 100, higher is better."""
    return drop_increase_gain(model, images, maps, classes, normalise, batch_size)["average_gain"]


def drop_increase_gain(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    normalise: bool = True,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """AD, IC and AG per-sample terms from a single forward, keyed ``average_drop,
    increase_in_confidence, average_gain`` (the single-metric functions pick one)."""
    y, o = soft_mask_confidences(model, images, maps, classes, normalise, batch_size)
    return {
        "average_drop": _ratio((y - o).clamp(min=0), y),
        "increase_in_confidence": (o > y).to(y.dtype),
        "average_gain": _ratio((o - y).clamp(min=0), 1 - y),
    }
