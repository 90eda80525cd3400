"""Random Logit (Sixt, Granz & Landgraf, ICML 2020, "When explanations lie"; Quantus
``RandomLogit``): how similar is the map of the explained class to the map of a random OTHER
class? A class-sensitive method gives dissimilar maps, so LOWER is better (Quantus:
``ScoreDirection.LOWER``); a class-agnostic map (edge, random noise, an oracle mask) scores 1.

Exactly what Quantus 0.6 compares (``quantus/metrics/randomisation/random_logit.py``):

1. each map normalised by its maximum absolute value (``normalise_by_max``; an all-zero map is
   left as it is), then optionally its absolute value (``abs``, off by default);
2. the maps FLATTENED in raster order and compared by skimage's 1-D ``structural_similarity``
   (``quantus.functions.similarity_func.ssim``): uniform window of 7 consecutive pixels, K1 =
   0.01, K2 = 0.03, sample covariance, ``data_range = max − min`` over BOTH maps together, the
   mean over the valid windows.

One deliberate difference: Quantus' ``normalise_by_max`` divides by the maximum over the WHOLE
batch (all axes), so its score of a sample depends on the other samples in the batch and on the
batch size; here each map is normalised on its own, which equals Quantus with batch size 1 (the
parity test runs it so).

SSIM is a product of a luminance and a structure term; for a signed map and its negation both
are negative and the product is positive, so signed maps can score high against opposite
evidence (``absolute=True``, Quantus' ``abs``, compares magnitudes instead).

Rules: two maps that are the same constant after normalisation (``data_range = 0``; Quantus
divides 0 by 0 and returns NaN) are identical, so their similarity is 1; a constant map against
a non-constant one is defined (``data_range > 0``). A NaN anywhere in either map gives NaN for
that sample (the evaluation's summaries and tests skip non-finite values).
"""

from __future__ import annotations

import torch

from contrastive_saliency.metrics.functional.map_similarity import mean_ssim

QUANTUS_WIN_SIZE = 7  # skimage's default window, which Quantus' ssim leaves in place


def max_abs_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each ``[B, ...]`` map divided by its maximum absolute value; an all-zero map unchanged
    (Quantus ``normalise_by_max`` on one sample)."""
    scale = maps.flatten(1).abs().amax(dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return maps / scale.view(-1, *([1] * (maps.dim() - 1)))


def random_logit(
    maps: torch.Tensor,
    other_maps: torch.Tensor,
    *,
    normalise: bool = True,
    absolute: bool = False,
    win_size: int = QUANTUS_WIN_SIZE,
) -> torch.Tensor:
    """SSIM of the explained class's maps ``[B, H, W]`` and the random other class's maps
    ``[B, H, W]`` (as Quantus ``RandomLogit(normalise=True, abs=False)``), ``[B]``, ≤ 1."""
    if maps.shape != other_maps.shape or maps.dim() < 2:
        raise ValueError(
            f"random_logit needs two [B, H, W] map batches of equal shape, got "
            f"{tuple(maps.shape)} and {tuple(other_maps.shape)}"
        )
    pixels = maps[0].numel()
    if win_size < 2 or win_size % 2 == 0 or win_size > pixels:
        raise ValueError(f"win_size must be odd, ≥ 3 and ≤ the {pixels} pixels, got {win_size}")
    work = torch.float32 if maps.device.type == "mps" else torch.float64
    a, b = maps.flatten(1).to(work), other_maps.flatten(1).to(work)
    if normalise:
        a, b = max_abs_normalise(a), max_abs_normalise(b)
    if absolute:
        a, b = a.abs(), b.abs()
    both = torch.cat([a, b], dim=1)
    data_range = both.amax(dim=1) - both.amin(dim=1)
    similarity = mean_ssim(a[:, None], b[:, None], (1, win_size), data_range)
    similarity = torch.where(data_range == 0, torch.ones_like(similarity), similarity)
    has_nan = torch.isnan(a).any(dim=1) | torch.isnan(b).any(dim=1)
    similarity = torch.where(has_nan, torch.full_like(similarity, torch.nan), similarity)
    return similarity.to(maps.dtype if maps.dtype.is_floating_point else torch.float32)
