"""Top-k feature agreement between two saliency maps (CASE Eq. 7, after Krishna et al.)."""

from __future__ import annotations

import torch

from contrastive_saliency.metrics.functional.ties import expected_top_k_overlap, top_k_ties


def top_fraction_count(num_pixels: int, fraction: float) -> int:
    """k = round(fraction · pixels), at least 1 (5 % of 64×64 → 205, of 224×224 → 2509)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    return max(1, round(fraction * num_pixels))


def feature_agreement(
    maps_a: torch.Tensor, maps_b: torch.Tensor, fraction: float = 0.05
) -> torch.Tensor:
    """``F(E, E', k) = |topk(E) ∩ topk(E')| / k`` per sample (CASE Eq. 7), ``[B]`` in [0, 1].

    ``maps_a`` and ``maps_b`` are ``[B, H, W]`` (or any ``[B, ...]`` of equal shape); only the
    positive part ranks (CASE ranks the ReLU'd maps), so every non-positive pixel (and NaN)
    ties at 0; ``k`` is ``fraction`` of the pixels.

    Ties follow :mod:`contrastive_saliency.metrics.functional.ties`: the value is the expected overlap
    when each map's ties at its ``k``-th value are broken uniformly at random, independently —
    ``E|A ∩ B| / k`` with ``E|A ∩ B| = Σ_p P(p ∈ A) P(p ∈ B)``. Two maps with fewer than ``k``
    positive pixels therefore agree by chance only (two all-zero maps: ``k / N``), never by
    sharing a raster-order padding; identical maps with distinct values score 1.
    """
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"map shapes differ: {tuple(maps_a.shape)} vs {tuple(maps_b.shape)}")
    num_pixels = maps_a[0].numel()
    k = top_fraction_count(num_pixels, fraction)
    ties_a = top_k_ties(maps_a.flatten(1), k, positive_part=True)
    ties_b = top_k_ties(maps_b.flatten(1), k, positive_part=True)
    return (expected_top_k_overlap(ties_a, ties_b) / k).float()
