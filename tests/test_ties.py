"""Ties never create agreement or a spatial bias (DESIGN.md "Ties"): the expected overlap of
feature agreement checked against Monte-Carlo tie-breaking, the index-keyed masks and pixel
orders of the perturbation metrics, and the keys they are drawn from."""

from __future__ import annotations

import pytest
import torch

from contrastive_saliency.metrics.functional import feature_agreement, mask_top_pixels
from contrastive_saliency.metrics.functional.perturbation_curves import saliency_ranks
from contrastive_saliency.metrics.functional.ties import (
    pixel_ranks,
    rank_descending,
    tie_break_keys,
    top_k_positions,
    top_k_ties,
)

SIDE = 32
N = SIDE * SIDE
K = round(0.05 * N)  # 51


def _random_tie_break_top_k(flat: torch.Tensor, k: int, generator: torch.Generator):
    """Top-k sets ``[D, N]`` (bool) of ``D`` maps, ties broken by independent uniform keys
    drawn here (not by the library's hash): sort by key, then stably by value."""
    keys = torch.rand(flat.shape, generator=generator, dtype=torch.float64)
    by_key = keys.argsort(dim=1)
    by_value = flat.gather(1, by_key).argsort(dim=1, descending=True, stable=True)
    top = by_key.gather(1, by_value)[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)


def _sparse_pair() -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Two maps with disjoint positive supports of 20 and 30 pixels (< k), zero elsewhere."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.zeros(1, SIDE, SIDE), torch.zeros(1, SIDE, SIDE)
    a[0, 2:6, 3:8] = torch.rand(4, 5, generator=generator) + 0.1  # 20 pixels, top-left
    b[0, 20:26, 10:15] = torch.rand(6, 5, generator=generator) + 0.1  # 30 pixels, elsewhere
    return a, b, 20, 30


def test_disjoint_sparse_supports_score_the_closed_form_and_the_monte_carlo_mean():
    a, b, s_a, s_b = _sparse_pair()
    value = feature_agreement(a, b).item()
    # Σ_p P(p∈A)·P(p∈B): A's support meets B's zeros, B's support meets A's zeros, and the
    # common zeros meet each other, each zero drawn with probability (k − s)/(N − s).
    q_a, q_b = (K - s_a) / (N - s_a), (K - s_b) / (N - s_b)
    closed_form = (s_a * q_b + s_b * q_a + (N - s_a - s_b) * q_a * q_b) / K
    assert value == pytest.approx(closed_form, rel=1e-6)
    # The mean overlap over 4000 independent uniform tie-breaks of both maps.
    draws, generator = 4000, torch.Generator().manual_seed(1)
    top_a = _random_tie_break_top_k(a.flatten(1).expand(draws, N), K, generator)
    top_b = _random_tie_break_top_k(b.flatten(1).expand(draws, N), K, generator)
    overlaps = (top_a & top_b).sum(dim=1).double() / K
    standard_error = overlaps.std().item() / draws**0.5
    assert abs(overlaps.mean().item() - value) < 4 * standard_error
    # Chance level, where raster-order padding of both top-k sets gave ≥ (k − 30)/k ≈ 0.41.
    assert value < 2 * K / N


@pytest.mark.parametrize(
    "make",
    [torch.zeros, torch.ones, lambda *shape: torch.full(shape, -3.0)],
    ids=["zeros", "constant", "negative"],
)
def test_constant_maps_score_k_over_n(make):
    maps = make(2, SIDE, SIDE)
    torch.testing.assert_close(feature_agreement(maps, maps.clone()), torch.full((2,), K / N))
    torch.testing.assert_close(
        feature_agreement(maps.double(), maps.double()), torch.full((2,), K / N)
    )


def test_identical_maps_with_distinct_values_score_one_and_nan_ranks_lowest():
    maps = torch.rand(3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    assert torch.equal(feature_agreement(maps, maps.clone()), torch.ones(3))
    assert torch.equal(feature_agreement(maps.double(), maps.double()), torch.ones(3))
    # A NaN pixel counts as 0 in the positive part, never as the top pixel.
    with_nan = maps.clone()
    with_nan[:, 0, 0] = float("nan")
    ties = top_k_ties(with_nan.flatten(1), K, positive_part=True)
    assert (ties.probabilities()[:, 0] == 0).all()


def test_top_k_probabilities_and_errors():
    values = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    ties = top_k_ties(values, 2)
    expected = torch.tensor([[1, 1 / 3, 1 / 3, 1 / 3, 0], [0.4] * 5], dtype=torch.float64)
    torch.testing.assert_close(ties.probabilities(), expected)
    torch.testing.assert_close(ties.probabilities().sum(dim=1), torch.full((2,), 2.0).double())
    for bad in (0, 6, 2.5):
        with pytest.raises(ValueError, match="k must"):
            top_k_ties(values, bad)


def _sparse_maps(batch: int) -> torch.Tensor:
    """Maps with 10 positive pixels (fewer than k) in the bottom-right corner, zero elsewhere."""
    maps = torch.zeros(batch, SIDE, SIDE)
    maps[:, -2:, -5:] = torch.arange(1.0, 11.0).view(2, 5)
    return maps


def test_top_pixel_mask_of_a_sparse_map_is_not_a_raster_block():
    maps, images = _sparse_maps(2), torch.ones(2, 1, SIDE, SIDE)
    masked = mask_top_pixels(images, maps, 0.05, indices=torch.tensor([11, 12]))[:, 0] == 0
    assert (masked.flatten(1).sum(dim=1) == K).all()
    assert masked[:, -2:, -5:].all()  # every positive pixel goes first
    padding = masked.clone()
    padding[:, -2:, -5:] = False  # the 41 zero pixels drawn to fill k
    # Spread over the image, not the first rows (raster order filled rows 0 and 1).
    rows_hit = padding.any(dim=2).sum(dim=1)
    assert (rows_hit >= 15).all() and (padding[:, :2].sum(dim=(1, 2)) < 15).all()
    # Two indices, two draws; the same index, the same draw alone or in another batch.
    assert not torch.equal(masked[0], masked[1])
    alone = mask_top_pixels(images[:1], maps[:1], 0.05, indices=torch.tensor([12]))[0, 0] == 0
    assert torch.equal(alone, masked[1])
    again = mask_top_pixels(images, maps, 0.05, indices=torch.tensor([12, 11]))[:, 0] == 0
    assert torch.equal(again[0], masked[1]) and torch.equal(again[1], masked[0])


def test_deletion_order_is_fixed_per_index_and_independent_of_the_batch():
    generator = torch.Generator().manual_seed(3)
    maps = (torch.rand(4, SIDE, SIDE, generator=generator) * 3).floor()  # three tie groups
    indices = torch.tensor([40, 7, 123456789012, 0])
    ranks = saliency_ranks(maps, indices)
    flat = maps.flatten(1)
    # Values are respected: a more salient pixel always comes first.
    order = ranks.argsort(dim=1)
    assert (flat.gather(1, order).diff(dim=1) <= 0).all()
    # Each sample's order depends on its index only: alone, reordered, or next to others.
    permutation = torch.tensor([2, 0, 3, 1])
    shuffled = saliency_ranks(maps[permutation], indices[permutation])
    assert torch.equal(shuffled, ranks[permutation])
    for i in range(4):
        assert torch.equal(saliency_ranks(maps[i : i + 1], indices[i : i + 1])[0], ranks[i])
    # Another index shuffles the ties differently; float64 maps rank the same as float32.
    assert not torch.equal(saliency_ranks(maps[:1], torch.tensor([41])), ranks[:1])
    assert torch.equal(saliency_ranks(maps.double(), indices), ranks)
    assert torch.equal(pixel_ranks(maps, indices), ranks)


def test_tie_breaks_are_uniform_and_independent_across_indices():
    draws = 3000
    constant = torch.zeros(draws, N)
    top = top_k_positions(constant, torch.arange(draws), K)
    chosen = torch.zeros(draws, N, dtype=torch.bool).scatter_(1, top, True)
    assert torch.equal(top, rank_descending(constant, torch.arange(draws))[:, :K])
    # Every pixel is drawn with probability k/N (4 standard errors, over all pixels at once).
    frequency = chosen.double().mean(dim=0)
    p = K / N
    assert (frequency - p).abs().max() < 5 * (p * (1 - p) / draws) ** 0.5
    assert frequency[:K].mean() == pytest.approx(p, abs=0.01)  # no raster preference
    # Consecutive indices are independent: their overlap averages k²/N.
    overlap = (chosen[1:] & chosen[:-1]).sum(dim=1).double()
    assert overlap.mean().item() == pytest.approx(
        K * K / N, abs=4 * overlap.std().item() / draws**0.5
    )


def test_keys_are_a_pure_function_of_index_position_and_salt():
    keys = tie_break_keys(torch.tensor([5, 5, 6, 2**40 + 5]), N)
    assert keys.dtype == torch.int64 and (keys >= 0).all() and (keys < 2**32).all()
    assert torch.equal(keys[0], keys[1]) and not torch.equal(keys[0], keys[2])
    assert not torch.equal(keys[0], keys[3])  # the index's high bits count
    assert all(row.unique().numel() == N for row in keys)  # a permutation per row
    assert torch.equal(tie_break_keys(torch.tensor([6]), N)[0], keys[2])
    assert not torch.equal(tie_break_keys(torch.tensor([5]), N, salt=1)[0], keys[0])
    with pytest.raises(ValueError, match="integers"):
        tie_break_keys(torch.tensor([0.5]), N)
    with pytest.raises(ValueError, match=r"\[B\]"):
        tie_break_keys(torch.zeros(2, 2, dtype=torch.long), N)
    with pytest.raises(ValueError, match="one dataset index per map"):
        rank_descending(torch.zeros(2, 4), torch.arange(3))


def test_top_k_ties_with_a_count_per_row_equals_one_call_per_row():
    generator = torch.Generator().manual_seed(4)
    flat = torch.randint(0, 5, (4, 30), generator=generator).float()  # many ties
    flat[2, 7] = float("nan")
    k = torch.tensor([1, 7, 15, 30])
    per_row = top_k_ties(flat, k)
    for row in range(4):
        alone = top_k_ties(flat[row : row + 1], int(k[row]))
        assert torch.equal(per_row.indicators[row], alone.indicators[0])
        assert per_row.share[row].item() == alone.share[0].item()
    with pytest.raises(ValueError, match="k per row"):
        top_k_ties(flat, torch.tensor([0, 1, 2, 3]))
