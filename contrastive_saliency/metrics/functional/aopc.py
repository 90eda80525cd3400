"""Cumulative removal curves of pixels, patches or superpixels in saliency order, and their
summaries: pixel flipping and region perturbation (AOPC), IROF.

* **Pixel flipping** (Bach et al., PLoS ONE 2015, Sec. "Pixel-flipping"; Quantus
  ``PixelFlipping``): the ``pixels_per_step`` most salient pixels at a time (every colour
  channel of a pixel together) are replaced by the ``baseline``, until the whole image is.
* **Region perturbation** (Samek et al., IEEE TNNLS 2017, Sec. III; Quantus
  ``RegionPerturbation``): the image is tiled into ``patch_size``² patches on Quantus' grid
  (padded symmetrically to a multiple of the patch size: ``floor``/``ceil`` of the remainder
  before/after); patches are ranked by the sum of the map over them (most relevant first,
  MoRF) and the first ``regions_evaluation`` are replaced one at a time.
* Both are summarised by the **AOPC** (Samek et al., Eq. 12, one image):
  ``AOPC = 1/(L + 1) · Σ_{k=0}^{L} (f(x⁽⁰⁾) − f(x⁽ᵏ⁾))`` over the ``L`` removal steps (the
  ``k = 0`` term is 0). Higher = the score falls faster = a more faithful map.
* **IROF** (Rieger & Hansen, ICLR-W 2020, "Iterative removal of features"; Quantus ``IROF``):
  SLIC superpixels of the image (scikit-image; ``num_segments``, ``compactness``) ranked by the
  map's mean over them, removed one at a time; the curve is the class score relative to the
  unperturbed one, ``r_k = f(x⁽ᵏ⁾) / f(x)``, over the fraction ``k / n`` of the ``n``
  superpixels removed, and IROF is the area over it, ``1 − ∫ r`` (trapezoid on
  ``k / n = 0 … 1``). Higher = more faithful. Quantus reports ``n − trapz(r_1 … r_n)`` (unit
  steps, without ``r_0``), which grows with the number of superpixels; ``irof_curve`` returns
  the ratios from which either follows (tests/test_aopc_metrics.py checks Quantus' form).

``f`` is the softmax probability of the explained class (``score="softmax"``, Quantus'
default) or its logit (``score="logit"``). The ``baseline`` a removed pixel takes is computed
per image from the unperturbed image over all channels and pixels: ``"black"`` its minimum,
``"white"`` its maximum, ``"mean"`` its mean (Quantus' ``"black"`` / ``"white"`` are the same;
Quantus' ``"mean"`` is recomputed from the already perturbed array at every step, and for IROF
over the whole batch, so a sample's value depends on its batch; docs/deviations.md), or
``"zero"``: 0 in the model's (normalised) input space, i.e. the dataset's mean colour.

Rules (tests/test_aopc_metrics.py):

* **Ties** — tied pixels, patch sums or superpixel means are ordered uniformly at random by
  the counter-based generator keyed by the sample ``indices``
  (:mod:`contrastive_saliency.metrics.functional.ties`): the same order on every process and in
  every batch. So a **constant or all-zero map** removes its pixels (patches, superpixels) in
  a random order keyed by the index: its value is that of a random order (the chance level),
  never a raster-order bias.
* **NaN** in a map counts as the least salient value (removed last, tied with ``-inf``); a
  superpixel or patch whose sum or mean is NaN ranks last among the real ones.
* IROF divides by the unperturbed score: where it is 0 (a logit of 0, or an underflowing
  probability) the sample's IROF is NaN or infinite, as in Quantus.

Every perturbed image of every sample and step goes through the model in forward batches of
at most ``batch_size`` (any mix of samples and steps) under ``torch.no_grad()``, on the
images' device and in the model's current mode; ``batch_size = 1`` is the naive loop. The
SLIC segmentation of IROF is the one step on the CPU (NumPy, scikit-image): once per image,
before any forward pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from contrastive_saliency.metrics.functional.ties import pixel_ranks, rank_descending

BASELINES = ("black", "white", "mean", "zero")
SCORES = ("softmax", "logit")


def removal_baseline(images: torch.Tensor, baseline: str) -> torch.Tensor:
    """The value removed pixels take, ``[B, 1, 1, 1]``, from each unperturbed image over all
    its channels and pixels (module docstring)."""
    flat = images.flatten(1)
    if baseline == "black":
        value = flat.amin(dim=1)
    elif baseline == "white":
        value = flat.amax(dim=1)
    elif baseline == "mean":
        value = flat.mean(dim=1)
    elif baseline == "zero":
        value = torch.zeros_like(flat[:, 0])
    else:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    return value.view(-1, 1, 1, 1)


def _check_inputs(images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if maps.shape != (b, h, w) or classes.numel() != b:
        raise ValueError(
            f"maps must be [B, H, W] = {(b, h, w)} (one map per image at input resolution) and "
            f"classes [B]; got maps {tuple(maps.shape)} and {classes.numel()} classes"
        )


@torch.no_grad()
def removal_scores(
    model: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor,
    unit_ranks: torch.Tensor,
    removed: torch.Tensor,
    baseline: str = "black",
    score: str = "softmax",
    batch_size: int = 256,
) -> torch.Tensor:
    """The class score of each image with its first ``removed[b, s]`` units replaced by the
    ``baseline``: ``[B, S]``, NaN where ``removed`` is negative (no such step for that sample).

    ``unit_ranks`` ``[B, H, W]``: the removal rank of the unit (pixel, patch, superpixel) each
    pixel belongs to, 0 = removed first; step ``s`` of sample ``b`` replaces every pixel whose
    rank is below ``removed[b, s]``. The valid (sample, step) pairs are run step-major in
    forward batches of at most ``batch_size``.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = images.device
    b = images.shape[0]
    fill = removal_baseline(images, baseline)
    ranks = unit_ranks.to(device).unsqueeze(1)
    classes = classes.reshape(b).to(device)
    removed = removed.to(device)
    step, sample = (removed.T >= 0).nonzero(as_tuple=True)  # step-major
    scores = torch.full(removed.shape, float("nan"), device=device)
    for pairs in torch.arange(step.numel(), device=device).split(batch_size):
        rows, steps = sample[pairs], step[pairs]
        taken = ranks[rows] < removed[rows, steps].view(-1, 1, 1, 1)
        perturbed = torch.where(taken, fill[rows], images[rows])
        # Channels-last input runs convolutions markedly faster on CPU (oneDNN) and with AMP.
        logits = model(perturbed.contiguous(memory_format=torch.channels_last))
        values = logits.softmax(dim=1) if score == "softmax" else logits
        scores[rows, steps] = values.gather(1, classes[rows].view(-1, 1))[:, 0].float()
    return scores


def aopc(curve: torch.Tensor) -> torch.Tensor:
    """``[B]`` AOPC of ``[B, L + 1]`` score curves whose column 0 is the unperturbed score:
    ``1/(L + 1) · Σ_k (f(x⁽⁰⁾) − f(x⁽ᵏ⁾))`` (Samek et al. 2017, Eq. 12)."""
    return (curve[:, :1] - curve).mean(dim=1)


def pixel_flipping_curve(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    pixels_per_step: int | None = None,
    baseline: str = "black",
    score: str = "softmax",
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Scores ``[B, L + 1]`` while the ``pixels_per_step`` most salient pixels at a time (all
    channels; ``None`` = the image width) are replaced, ``L = ceil(H·W / pixels_per_step)``;
    column 0 is the unperturbed image, column ``L`` the all-baseline image. Ties keyed by the
    sample ``indices``."""
    _check_inputs(images, maps, classes)
    b, _, h, w = images.shape
    pixels_per_step = pixels_per_step or w
    if pixels_per_step < 1:
        raise ValueError(f"pixels_per_step must be a positive number, got {pixels_per_step}")
    num_steps = math.ceil(h * w / pixels_per_step)
    ranks = pixel_ranks(maps, indices.to(maps.device)).view(b, h, w)
    steps = torch.arange(num_steps + 1, device=images.device) * pixels_per_step
    removed = steps.clamp(max=h * w).expand(b, -1)
    return removal_scores(model, images, classes, ranks, removed, baseline, score, batch_size)


def pixel_flipping(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    pixels_per_step: int | None = None,
    baseline: str = "black",
    score: str = "softmax",
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """AOPC ``[B]`` of :func:`pixel_flipping_curve`."""
    curve = pixel_flipping_curve(
        model, images, maps, classes, pixels_per_step, baseline, score, batch_size,
        indices=indices,
    )  # fmt: skip
    return aopc(curve)


def patch_grid(height: int, width: int, patch_size: int, device=None) -> tuple[torch.Tensor, int]:
    """``(patch id of each pixel [H, W], number of patches)`` on Quantus' grid: the image padded
    by ``floor``/``ceil`` of ``(−size) mod patch_size`` before/after, tiled in raster order."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive number of pixels, got {patch_size}")
    pad_h, pad_w = (-height) % patch_size // 2, (-width) % patch_size // 2
    rows = (torch.arange(height, device=device) + pad_h) // patch_size
    columns = (torch.arange(width, device=device) + pad_w) // patch_size
    per_row = math.ceil(width / patch_size)
    return rows[:, None] * per_row + columns[None, :], math.ceil(height / patch_size) * per_row


def _unit_values(maps: torch.Tensor, units: torch.Tensor, count: int, mean: bool) -> torch.Tensor:
    """Sum (or mean) of each ``[B, H, W]`` map over its ``count`` units ``[B, H, W]``:
    ``[B, count]``; a unit with no pixel is ``-inf`` (ranked after every real one), a real unit
    whose value is NaN or ``-inf`` is ``-max`` (least salient among the real ones)."""
    b = maps.shape[0]
    flat = maps.reshape(b, -1).double()
    units = units.reshape(b, -1).to(maps.device)
    sums = torch.zeros(b, count, dtype=torch.float64, device=maps.device)
    sums.scatter_add_(1, units, flat)
    sizes = torch.zeros_like(sums).scatter_add_(1, units, torch.ones_like(flat))
    values = sums / sizes if mean else sums
    lowest = torch.finfo(torch.float64).min
    values = torch.nan_to_num(values, nan=lowest, neginf=lowest)
    return values.where(sizes > 0, float("-inf"))


def _unit_ranks(values: torch.Tensor, units: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rank (0 = removed first) of the unit each pixel belongs to: ``[B, H, W]``."""
    order = rank_descending(values, indices.to(values.device))
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    b = units.shape[0]
    return ranks.gather(1, units.reshape(b, -1).to(ranks.device)).view_as(units)


def region_perturbation_curve(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    patch_size: int = 8,
    regions_evaluation: int = 100,
    baseline: str = "black",
    score: str = "softmax",
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Scores ``[B, L + 1]`` while the patches (:func:`patch_grid`) with the largest map sums
    are replaced one at a time, ``L = min(regions_evaluation, number of patches)``; column 0 is
    the unperturbed image. Ties keyed by the sample ``indices``."""
    _check_inputs(images, maps, classes)
    if regions_evaluation < 1:
        raise ValueError(f"regions_evaluation must be at least 1, got {regions_evaluation}")
    b, _, h, w = images.shape
    grid, count = patch_grid(h, w, patch_size, maps.device)
    units = grid.expand(b, h, w)
    ranks = _unit_ranks(_unit_values(maps, units, count, mean=False), units, indices)
    steps = torch.arange(min(regions_evaluation, count) + 1, device=images.device)
    return removal_scores(
        model, images, classes, ranks, steps.expand(b, -1), baseline, score, batch_size
    )


def region_perturbation(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    patch_size: int = 8,
    regions_evaluation: int = 100,
    baseline: str = "black",
    score: str = "softmax",
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """AOPC ``[B]`` of :func:`region_perturbation_curve`."""
    curve = region_perturbation_curve(
        model, images, maps, classes, patch_size, regions_evaluation, baseline, score, batch_size,
        indices=indices,
    )  # fmt: skip
    return aopc(curve)


def slic_segments(
    images: torch.Tensor, num_segments: int = 100, compactness: float = 10.0
) -> torch.Tensor:
    """SLIC superpixels of each image (scikit-image ``slic`` with its other defaults, as Quantus
    calls it on the image as given, channels last, float64), relabelled ``0 … n − 1``:
    ``[B, H, W]`` int64 on the images' device. The one CPU / NumPy step of IROF: once per
    image."""
    from skimage.segmentation import slic

    arrays = images.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
    labels = []
    for array in arrays:
        segments = slic(array, n_segments=num_segments, compactness=compactness, start_label=0)
        _, relabelled = np.unique(segments, return_inverse=True)
        labels.append(torch.from_numpy(relabelled.reshape(segments.shape).astype(np.int64)))
    return torch.stack(labels).to(images.device)


def irof_curve(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    num_segments: int = 100,
    compactness: float = 10.0,
    baseline: str = "mean",
    score: str = "softmax",
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ratios [B, S + 1], n [B])``: ``r_k = f(x⁽ᵏ⁾) / f(x)`` after the ``k`` superpixels with
    the largest mean saliency are replaced, ``k = 0 … n_b`` (NaN beyond a sample's own ``n_b``;
    ``S`` the largest ``n_b``). ``segments`` ``[B, H, W]`` (labels ``0 … n − 1``) replaces the
    SLIC segmentation (:func:`slic_segments`) where given. Ties keyed by the sample
    ``indices``."""
    _check_inputs(images, maps, classes)
    if segments is None:
        segments = slic_segments(images, num_segments, compactness)
    b, _, h, w = images.shape
    if segments.shape != (b, h, w):
        raise ValueError(f"segments must be [B, H, W] = {(b, h, w)}, got {tuple(segments.shape)}")
    segments = segments.to(maps.device).long()
    counts = segments.reshape(b, -1).amax(dim=1) + 1
    most = int(counts.max())
    ranks = _unit_ranks(_unit_values(maps, segments, most, mean=True), segments, indices)
    steps = torch.arange(most + 1, device=images.device).expand(b, -1)
    removed = steps.where(steps <= counts.to(images.device)[:, None], -1)
    scores = removal_scores(model, images, classes, ranks, removed, baseline, score, batch_size)
    return scores / scores[:, :1], counts.to(images.device)


def irof_from_curve(ratios: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[B]`` area over each ratio curve on ``k / n = 0 … 1``: ``1 − trapz``."""
    counts = counts.long().to(ratios.device)
    steps = torch.arange(ratios.shape[1], device=ratios.device)
    total = ratios.where(steps <= counts[:, None], 0.0).sum(dim=1)  # a NaN ratio stays NaN
    last = ratios.gather(1, counts.view(-1, 1))[:, 0]
    return 1.0 - (total - (ratios[:, 0] + last) / 2) / counts.to(ratios.dtype)


def irof(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    num_segments: int = 100,
    compactness: float = 10.0,
    baseline: str = "mean",
    score: str = "softmax",
    batch_size: int = 256,
    *,
    indices: torch.Tensor,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """IROF ``[B]``: the area over :func:`irof_curve`, ``1 − ∫ r`` over ``k / n ∈ [0, 1]``."""
    ratios, counts = irof_curve(
        model, images, maps, classes, num_segments, compactness, baseline, score, batch_size,
        indices=indices, segments=segments,
    )  # fmt: skip
    return irof_from_curve(ratios, counts)
