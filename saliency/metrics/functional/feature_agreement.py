"""Top-k feature agreement between two saliency maps (CASE Eq. 7, after Krishna et al.)."""

from __future__ import annotations

import torch


def top_fraction_count(num_pixels: int, fraction: float) -> int:
    """k = round(fraction · pixels), at least 1 (5 % of 64×64 → 205, of 224×224 → 2509)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    return max(1, round(fraction * num_pixels))


def top_pixel_indices(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k largest values of each ``[B, ...]`` map, ``[B, k]``.

    A stable descending sort breaks ties by pixel position, so the result is deterministic
    (flat zero regions of ReLU'd maps are common).
    """
    flat = maps.flatten(1)
    return torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]


def feature_agreement(
    maps_a: torch.Tensor, maps_b: torch.Tensor, fraction: float = 0.05
) -> torch.Tensor:
    """``F(E, E', k) = |topk(E) ∩ topk(E')| / k`` per sample (CASE Eq. 7), ``[B]`` in [0, 1].

    ``maps_a`` and ``maps_b`` are ``[B, H, W]`` (or any ``[B, ...]`` of equal shape); only the
    positive part ranks (CASE ranks the ReLU'd maps); ``k`` is ``fraction`` of the pixels.
    """
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"map shapes differ: {tuple(maps_a.shape)} vs {tuple(maps_b.shape)}")
    num_pixels = maps_a[0].numel()
    k = top_fraction_count(num_pixels, fraction)
    top_a = top_pixel_indices(maps_a.clamp(min=0), k)
    top_b = top_pixel_indices(maps_b.clamp(min=0), k)
    selected = torch.zeros(maps_a.shape[0], num_pixels, dtype=torch.bool, device=maps_a.device)
    selected.scatter_(1, top_a, True)
    shared = selected.gather(1, top_b).sum(dim=1)
    return shared.float() / k
