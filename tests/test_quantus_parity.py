"""Localisation metrics against Quantus (test-only dependency) on the same maps and masks.

Quantus returns NaN for empty masks where we return 0 (a defined value); parity is checked on
non-empty masks, and the documented differences are asserted explicitly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive_saliency.metrics.functional import (
    energy_pointing_game,
    pointing_game,
    top_k_intersection,
)

quantus = pytest.importorskip("quantus")


def _maps_and_masks(seed: int = 0, batch: int = 12, size: int = 24):
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(batch, size, size, generator=generator, dtype=torch.float64)
    # Masks: random boxes of varied size plus two blobs, all non-empty.
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    corners = torch.randint(0, size // 2, (batch, 2), generator=generator)
    extents = torch.randint(3, size // 2, (batch, 2), generator=generator)
    for b in range(batch):
        y, x = corners[b].tolist()
        h, w = extents[b].tolist()
        masks[b, y : y + h, x : x + w] = True
    # Make the maximum fall inside the mask for some samples, outside for others.
    maps[::3] += 5.0 * masks[::3]
    return maps, masks


def _quantus_inputs(maps: torch.Tensor, masks: torch.Tensor):
    batch, height, width = maps.shape
    x = np.zeros((batch, 1, height, width), dtype=np.float64)
    y = np.zeros(batch, dtype=np.int64)
    return x, y, maps.numpy()[:, None], masks.numpy()[:, None].astype(np.float64)


def _run(metric, maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    x, y, a, s = _quantus_inputs(maps, masks)
    scores = metric(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s, channel_first=True)
    return np.asarray(scores, dtype=np.float64)


def test_pointing_game_matches_quantus():
    maps, masks = _maps_and_masks()
    ours = pointing_game(maps, masks, ties="any").numpy()
    theirs = _run(
        quantus.PointingGame(abs=False, normalise=False, disable_warnings=True), maps, masks
    )
    np.testing.assert_array_equal(ours, theirs)
    assert 0 < ours.sum() < len(ours)  # both hits and misses are exercised
    # Without ties the other rules agree too; with a constant map they differ by design:
    # Quantus ("any") hits, the default ("expected") scores the mask's area share, "first"
    # (torch.argmax) points at pixel (0, 0), outside.
    np.testing.assert_array_equal(pointing_game(maps, masks).numpy(), theirs)
    np.testing.assert_array_equal(pointing_game(maps, masks, ties="first").numpy(), theirs)
    constant = torch.ones_like(maps[:1])
    inner = torch.zeros_like(masks[:1])
    inner[0, 5:8, 5:8] = True
    assert pointing_game(constant, inner, ties="any").item() == 1.0
    assert pointing_game(constant, inner).item() == pytest.approx(9 / inner.numel())
    assert pointing_game(constant, inner, ties="first").item() == 0.0


def test_energy_pointing_game_matches_quantus_attribution_localisation():
    maps, masks = _maps_and_masks(seed=1)
    metric = quantus.AttributionLocalisation(
        positive_attributions=True, abs=False, normalise=False, disable_warnings=True
    )
    theirs = _run(metric, maps, masks)
    ours = energy_pointing_game(maps, masks).numpy()
    # Quantus divides by (total + 1e-9); the totals here are O(100), so 1e-9 relative.
    np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=0)


@pytest.mark.parametrize("k", [1, 17, 100])
def test_top_k_intersection_matches_quantus(k: int):
    maps, masks = _maps_and_masks(seed=2)
    metric = quantus.TopKIntersection(k=k, abs=False, normalise=False, disable_warnings=True)
    theirs = _run(metric, maps, masks)
    ours = top_k_intersection(maps, masks, k).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_top_k_intersection_ties_count_by_expectation_not_quantus_argsort_order():
    # Quantus ranks with np.argsort(-a), which puts tied pixels in index (raster) order: on a
    # map flat beyond its top pixels, its top k are padded with the first rows. We count the
    # tied pixels by their expected share (DESIGN.md "Ties"), so the two differ exactly there.
    maps = torch.zeros(1, 10, 10, dtype=torch.float64)
    maps[0, 9, 9] = 1.0  # one positive pixel, k = 10
    top_rows = torch.zeros(1, 10, 10, dtype=torch.bool)
    top_rows[0, :2] = True  # 20 % of the image, where argsort puts the padding
    metric = quantus.TopKIntersection(k=10, abs=False, normalise=False, disable_warnings=True)
    assert _run(metric, maps, top_rows)[0] == pytest.approx(0.9)  # 9 padded pixels inside
    # Ours: 9 of the 99 tied pixels are drawn, 20 of which lie inside → 9 · 20/99 / 10.
    expected = 9 * 20 / 99 / 10
    assert top_k_intersection(maps, top_rows, 10).item() == pytest.approx(expected, abs=1e-12)


def test_empty_masks_are_zero_where_quantus_is_undefined():
    maps, masks = _maps_and_masks(seed=3, batch=3)
    masks[1] = False
    top_k = _run(quantus.TopKIntersection(k=5, abs=False, normalise=False), maps, masks)
    assert np.isnan(top_k[1])
    # Quantus 0.6 means NaN for the pointing game too, but writes it into a bool array, which
    # stores True: an empty mask counts as a hit there. We score it 0.
    pointing = _run(quantus.PointingGame(abs=False, normalise=False), maps, masks)
    assert pointing[1] == 1.0
    for values in (
        pointing_game(maps, masks),
        pointing_game(maps, masks, ties="any"),
        energy_pointing_game(maps, masks),
        top_k_intersection(maps, masks, 5),
    ):
        assert values[1].item() == 0.0 and torch.isfinite(values).all()
