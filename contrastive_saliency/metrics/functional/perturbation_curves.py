"""Deletion and insertion curves and their AUC (Petsiuk et al., RISE, BMVC 2018, Sec. 4.1).

Pixels move in saliency order; ties are broken uniformly at random, keyed by the samples'
dataset ``indices`` ``[B]`` (keyword-only everywhere; :mod:`contrastive_saliency.metrics.functional.ties`),
so a flat region is deleted in a random spread, the same on every process and in every batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from contrastive_saliency.metrics.functional.ties import pixel_ranks


def saliency_ranks(maps: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rank of each pixel by saliency (0 = most salient), ``[B, H·W]``; NaN last; ties in a
    uniformly random order keyed by the samples' dataset ``indices`` ``[B]``
    (:func:`~contrastive_saliency.metrics.functional.ties.pixel_ranks`)."""
    return pixel_ranks(maps, indices)


@torch.no_grad()
def perturbation_curve(
    model: nn.Module,
    start: torch.Tensor,
    end: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    pixels_per_step: int | None = None,
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Softmax score of ``classes`` while pixels move from ``start`` to ``end`` in saliency order
    (:func:`saliency_ranks`, ties keyed by the samples' dataset ``indices``).

    Step ``s`` takes the ``s · pixels_per_step`` most salient pixels (all channels) from ``end``
    and the rest from ``start``. Returns ``[B, n + 1]`` for ``n = ceil(H·W / pixels_per_step)``
    steps. The ``(n + 1) · B`` perturbed images go through the model in forward batches of at
    most ``batch_size`` (any mix of steps and samples), so ``batch_size = 1`` is the naive
    one-forward-per-step-per-image loop and larger values only change the speed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    b, _, h, w = start.shape
    if maps.shape[0] != b or classes.numel() != b:
        raise ValueError(
            f"images, maps and classes must share the batch size, got {b}, {maps.shape[0]} "
            f"and {classes.numel()}"
        )
    pixels_per_step = pixels_per_step or w  # RISE: 224 pixels per step at 224²
    num_steps = -(-h * w // pixels_per_step)
    ranks = saliency_ranks(maps.reshape(b, h, w), indices.to(maps.device))
    ranks = ranks.to(start.device).view(b, 1, h, w)
    classes = classes.reshape(b).to(start.device)
    scores = torch.empty((num_steps + 1) * b, device=start.device)
    # Pair p is (step p // B, sample p % B): consecutive pairs share a step.
    for pairs in torch.arange((num_steps + 1) * b, device=start.device).split(batch_size):
        step, sample = pairs // b, pairs % b
        taken = ranks[sample] < (step * pixels_per_step).view(-1, 1, 1, 1)
        images = torch.where(taken, end[sample], start[sample])
        # Channels-last input runs convolutions markedly faster on CPU (oneDNN) and with AMP.
        images = images.contiguous(memory_format=torch.channels_last)
        probs = model(images).softmax(dim=1)
        scores[pairs] = probs.gather(1, classes[sample].view(-1, 1))[:, 0].float()
    return scores.view(num_steps + 1, b).T.contiguous()


def curve_auc(curve: torch.Tensor, num_pixels: int, pixels_per_step: int) -> torch.Tensor:
    """Trapezoid area under ``[B, n + 1]`` curves over the fraction of pixels changed, in [0, 1]."""
    steps = torch.arange(curve.shape[1], device=curve.device, dtype=curve.dtype)
    fraction = (steps * pixels_per_step).clamp(max=num_pixels) / num_pixels
    return torch.trapezoid(curve, fraction, dim=1)


def deletion_curve(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    pixels_per_step: int | None = None,
    fill: float = 0.0,
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Deletion: most salient pixels first replaced by ``fill`` (0 = the mean colour in
    normalised space, PROTOCOLS.md). Lower AUC = more faithful map."""
    blank = torch.full_like(images, fill)
    return perturbation_curve(
        model, images, blank, maps, classes, pixels_per_step, batch_size, indices=indices
    )


def insertion_curve(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    pixels_per_step: int | None = None,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Insertion: most salient pixels first copied from the image into its Gaussian-blurred
    version (kernel 11, σ 5). Higher AUC = more faithful map."""
    blurred = gaussian_blur(images, [blur_kernel, blur_kernel], [blur_sigma, blur_sigma])
    return perturbation_curve(
        model, blurred, images, maps, classes, pixels_per_step, batch_size, indices=indices
    )


def deletion_auc(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    pixels_per_step: int | None = None,
    fill: float = 0.0,
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """AUC of :func:`deletion_curve`, ``[B]``."""
    pixels_per_step = pixels_per_step or images.shape[-1]
    curve = deletion_curve(
        model, images, maps, classes, pixels_per_step, fill, batch_size, indices=indices
    )
    return curve_auc(curve, images.shape[-2] * images.shape[-1], pixels_per_step)


def insertion_auc(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    pixels_per_step: int | None = None,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """AUC of :func:`insertion_curve`, ``[B]``."""
    pixels_per_step = pixels_per_step or images.shape[-1]
    curve = insertion_curve(
        model, images, maps, classes, pixels_per_step, blur_kernel, blur_sigma, batch_size,
        indices=indices,
    )  # fmt: skip
    return curve_auc(curve, images.shape[-2] * images.shape[-1], pixels_per_step)
