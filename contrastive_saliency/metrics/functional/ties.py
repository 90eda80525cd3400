"""Ties in saliency rankings: the one rule every top-k, mask and pixel order follows.

Saliency maps have flat regions (ReLU zeros, constant maps, saturated values). No ranking of a
map may turn such a tie into agreement or into a spatial bias (DESIGN.md "Ties"), so:

1. **Set overlaps with a closed form** — the share of a map's top ``k`` that is shared with
   another map's top ``k`` (feature agreement, CASE Eq. 7) or lies inside a mask (top-k
   intersection) — are the *expected* value under uniform random tie-breaking, independently
   in each map. A pixel strictly above the ``k``-th largest value is in the top ``k`` with
   probability 1, a pixel equal to it with ``(k − n_above) / n_tied``, a pixel below with 0
   (:func:`top_k_ties`), and ``E|A ∩ B| = Σ_p P(p ∈ A) · P(p ∈ B)``. Deterministic, no
   random numbers.
2. **Masks and orders** — the pixels a perturbation metric removes or reveals (confidence and
   relative drop, deletion / insertion curves, PIC) — break ties uniformly at random with a
   counter-based generator keyed by the sample's dataset ``index`` and the pixel position
   (:func:`tie_break_keys`): the same sample gets the same order on every process, rank and
   device and in every batch composition; different samples get independent orders. Pixels
   are ranked by value (descending), ties by key (:func:`rank_descending`,
   :func:`top_k_positions`).

NaN counts as the least salient value (it ties with ``-inf``); ``-0.0`` equals ``0.0``.
Metrics that rank the positive part of a map (feature agreement) clamp at 0 first, so every
non-positive pixel (and NaN) ties at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contrastive_saliency.index_random import STREAM_TIE_BREAKING, index_hash


def tie_break_keys(indices: torch.Tensor, num_positions: int, salt: int = 0) -> torch.Tensor:
    """Tie-break keys ``[B, num_positions]`` (int64 in ``[0, 2³²)``) for the samples ``indices``.

    The counter-based hash of :func:`contrastive_saliency.index_random.index_hash` of (``salt``, the
    tie-breaking stream, the sample index, the position): a pure function of those — no
    generator state, so it is the same on every process and device. Within a row the keys are
    distinct (the hash is a bijection of the position), so ordering a row by key is a
    permutation.
    """
    if indices.dim() != 1:
        raise ValueError(
            f"indices must be the [B] dataset indices of the samples, got shape "
            f"{tuple(indices.shape)}"
        )
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(
            f"indices must be integers (the samples' dataset index), got {indices.dtype}"
        )
    positions = torch.arange(num_positions, dtype=torch.int64, device=indices.device)
    return index_hash(indices.long(), positions, seed=salt, stream=STREAM_TIE_BREAKING)


def _check_rows(flat: torch.Tensor, indices: torch.Tensor) -> None:
    if indices.shape != (flat.shape[0],):
        raise ValueError(
            f"indices must hold one dataset index per map, shape ({flat.shape[0]},), got "
            f"{tuple(indices.shape)}; pass the batch's 'index'"
        )


def _ranked_values(flat: torch.Tensor) -> torch.Tensor:
    """NaN → ``-inf`` (least salient), ``-0.0`` → ``0.0``; integers and low precision → float32."""
    if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    inf = float("inf")
    return torch.nan_to_num(flat, nan=-inf, posinf=inf, neginf=-inf).add_(0.0)


def _combined_keys(flat: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One int64 per pixel ordered as (float32 value, key) lexicographically: the value's bits
    as a signed integer monotone in the value (negative floats count down, so their lower 31
    bits are flipped), times 2³², plus the 32-bit key. ``keys`` is overwritten."""
    bits = flat.contiguous().view(torch.int32)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return keys.add_(monotone.long(), alpha=1 << 32)


def rank_descending(maps: torch.Tensor, indices: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Flat pixel positions of each ``[B, ...]`` map from most to least salient, ``[B, N]``;
    ties in uniformly random order keyed by the sample ``indices`` ``[B]`` (module docstring).

    Among tied pixels the larger key comes first. float32 (and lower precision) maps sort once
    on a combined (value, key) integer; float64 maps sort by key, then stably by value — the
    same order as the float32 path wherever float32 keeps the values apart.
    """
    flat = _ranked_values(maps.flatten(1))
    _check_rows(flat, indices)
    keys = tie_break_keys(indices.to(flat.device), flat.shape[1], salt)
    if flat.dtype == torch.float32:
        return torch.sort(_combined_keys(flat, keys), dim=1, descending=True).indices
    by_key = torch.argsort(keys, dim=1, descending=True)  # the float32 path's tie order
    by_value = torch.sort(flat.gather(1, by_key), dim=1, descending=True, stable=True).indices
    return by_key.gather(1, by_value)


def top_k_positions(
    maps: torch.Tensor, indices: torch.Tensor, k: int, salt: int = 0
) -> torch.Tensor:
    """The first ``k`` positions of :func:`rank_descending`, ``[B, k]`` (a partial ``topk``
    for float32 maps, a full sort for float64)."""
    flat = _ranked_values(maps.flatten(1))
    _check_rows(flat, indices)
    if not 0 <= k <= flat.shape[1]:
        raise ValueError(f"k must lie in [0, {flat.shape[1]}] (pixels per map), got {k}")
    if flat.dtype != torch.float32:
        return rank_descending(flat, indices, salt)[:, :k]
    keys = tie_break_keys(indices.to(flat.device), flat.shape[1], salt)
    return torch.topk(_combined_keys(flat, keys), k, dim=1).indices


def pixel_ranks(maps: torch.Tensor, indices: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Rank of every pixel in :func:`rank_descending` order (0 = most salient), ``[B, N]``."""
    order = rank_descending(maps, indices, salt)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


@dataclass(frozen=True)
class TopKTies:
    """Which pixels of ``[B, N]`` maps are in the top ``k`` under uniform tie-breaking.

    ``indicators`` ``[B, 2, N]`` (float32 0/1): row 0 marks the pixels strictly above the
    ``k``-th largest value (in with probability 1), row 1 those at least equal to it; the tied
    pixels are row 1 minus row 0. ``share`` ``[B]`` (float64) = ``(k − n_above) / n_tied``, the
    probability that a tied pixel is in. So ``P(p ∈ top k) = (1 − share)·above + share·at_least``.
    """

    indicators: torch.Tensor
    share: torch.Tensor

    def weights(self) -> torch.Tensor:
        """``[B, 2]`` float64 ``(1 − share, share)``: ``P = weights · indicators``."""
        return torch.stack([1.0 - self.share, self.share], dim=1)

    def probabilities(self) -> torch.Tensor:
        """``P(pixel ∈ top k)``, ``[B, N]`` float64."""
        return (self.weights()[:, :, None] * self.indicators.double()).sum(dim=1)


def top_k_ties(flat: torch.Tensor, k: int | torch.Tensor, positive_part: bool = False) -> TopKTies:
    """:class:`TopKTies` of ``[B, N]`` values from one partial ``topk`` per row; ``k`` may also
    be one count per row (an integer tensor ``[B]``, e.g. each mask's size), found by a sort.

    NaN ranks lowest; with ``positive_part`` the values are ``max(E, 0)`` first, so every
    non-positive pixel and NaN ties at 0.
    """
    if flat.dim() != 2:
        raise ValueError(f"values must be [B, N], got shape {tuple(flat.shape)}")
    num = flat.shape[1]
    per_row = torch.is_tensor(k)
    if per_row:
        if (
            k.shape != (flat.shape[0],)
            or k.is_floating_point()
            or not bool(((k >= 1) & (k <= num)).all())
        ):
            raise ValueError(
                f"k per row must be integers in [1, {num}] of shape ({flat.shape[0]},), got {k!r}"
            )
    elif isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num:
        raise ValueError(f"k must be an integer in [1, {num}] (pixels per map), got {k!r}")
    if not flat.is_floating_point():
        flat = flat.float()
    if positive_part:
        flat = flat.where(flat > 0, 0.0)  # NaN > 0 is False: NaN → 0
    else:
        flat = torch.nan_to_num(flat, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if per_row:
        ordered = flat.sort(dim=1, descending=True).values
        kth = ordered.gather(1, (k.to(flat.device) - 1)[:, None])
    else:
        top = torch.topk(flat, k, dim=1, sorted=False).values
        kth = top.amin(dim=1, keepdim=True)  # the k-th largest value
    indicators = torch.empty(flat.shape[0], 2, num, dtype=torch.float32, device=flat.device)
    torch.gt(flat, kth, out=indicators[:, 0])
    torch.ge(flat, kth, out=indicators[:, 1])
    # integer sums, exact in float32
    n_above = indicators[:, 0].sum(dim=1).double()
    n_tied = indicators[:, 1].sum(dim=1).double() - n_above
    count = k.to(flat.device).double() if per_row else k
    return TopKTies(indicators=indicators, share=(count - n_above) / n_tied)


def _exact_counts(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` of 0/1 float32 matrices: integer counts below 2²⁴, exact in float32
    whatever the summation order; autocast (float16) is switched off for it."""
    with torch.autocast(left.device.type, enabled=False):
        return torch.bmm(left, right).double()


def expected_top_k_overlap(first: TopKTies, second: TopKTies) -> torch.Tensor:
    """``E|A ∩ B|`` ``[B]`` (float64) for the top-``k`` sets of two maps, each tie-broken
    independently and uniformly: ``Σ_p P(p ∈ A) P(p ∈ B)``, from the exact counts of the four
    (above, at least) intersections, so identical inputs give exactly ``k``."""
    counts = _exact_counts(first.indicators, second.indicators.transpose(1, 2))  # [B, 2, 2]
    return torch.einsum("bi,bij,bj->b", first.weights(), counts, second.weights())


def expected_top_k_inside(ties: TopKTies, masks: torch.Tensor) -> torch.Tensor:
    """``E|A ∩ R|`` ``[B]`` (float64) of a top-``k`` set ``A`` with bool masks ``R`` ``[B, N]``."""
    region = masks.to(device=ties.indicators.device, dtype=torch.float32).unsqueeze(2)
    counts = _exact_counts(ties.indicators, region)[:, :, 0]  # [B, 2]
    return (ties.weights() * counts).sum(dim=1)
