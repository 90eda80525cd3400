"""Sanity-check map similarities vs scipy / scikit-image (Adebayo et al. 2018, Sec. 4)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch
from scipy.stats import rankdata, spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity

from contrastive_saliency.metrics.functional.map_similarity import (
    average_ranks,
    cosine_similarity_maps,
    hog_features,
    hog_similarity,
    pearson_similarity,
    spearman_similarity,
    ssim_similarity,
)

SIZES = [(32, 32), (56, 56), (64, 48)]


def _maps(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Five pairs of [H, W] maps: random signed, heavily tied, smooth blob vs edge,
    sparse lines vs waves, and a map vs a noisy copy of itself."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width]
    a = np.empty((5, height, width))
    b = np.empty((5, height, width))
    a[0], b[0] = rng.normal(size=(2, height, width))
    a[1] = np.round(rng.random((height, width)) * 4) / 4  # ties
    b[1] = np.round(rng.normal(size=(height, width)))
    a[2] = np.exp(-((rows - height / 2) ** 2 + (cols - width / 3) ** 2) / 60)
    b[2] = (cols > width / 2).astype(float)  # gradients at exactly 0° / 180°
    a[3] = ((rows + cols) % 7 == 0).astype(float)  # 45° structure
    b[3] = np.sin(cols / 3.0) * np.cos(rows / 5.0)
    a[4] = rng.random((height, width))
    b[4] = a[4] + 0.1 * rng.normal(size=(height, width))
    return a, b


def _min_max(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def test_average_ranks_match_scipy():
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(size=(6, 40)) * 2) / 2
    values[5] = 3.0
    ranks = average_ranks(torch.from_numpy(values)).numpy()
    np.testing.assert_array_equal(ranks, np.stack([rankdata(row) for row in values]))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("absolute", [False, True])
def test_spearman_matches_scipy(size, absolute):
    a, b = _maps(*size, seed=1)
    ours = spearman_similarity(torch.from_numpy(a), torch.from_numpy(b), absolute=absolute)
    transform = np.abs if absolute else (lambda x: x)
    expected = [
        spearmanr(transform(x).ravel(), transform(y).ravel())[0] for x, y in zip(a, b, strict=True)
    ]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-12)


def test_spearman_absolute_differs_for_signed_maps():
    a = torch.tensor([[[-3.0, -1.0], [1.5, 2.0]]])
    b = torch.tensor([[[3.0, 1.0], [1.5, 2.0]]])
    assert spearman_similarity(a, b).item() == pytest.approx(
        spearmanr([-3, -1, 1.5, 2], [3, 1, 1.5, 2])[0]
    )
    assert spearman_similarity(a, b, absolute=True).item() == pytest.approx(1.0)


def test_spearman_degenerate_cases():
    maps = torch.rand(3, 16, 16)
    torch.testing.assert_close(spearman_similarity(maps, maps), torch.ones(3))
    constant = torch.full((2, 8, 8), 0.5)
    other = torch.rand(2, 8, 8)
    torch.testing.assert_close(spearman_similarity(constant, other), torch.zeros(2))
    torch.testing.assert_close(spearman_similarity(constant, constant), torch.zeros(2))
    torch.testing.assert_close(
        spearman_similarity(constant, other, constant_value=float("nan")).isnan(),
        torch.ones(2, dtype=torch.bool),
    )
    assert spearman_similarity(other, other).dtype == torch.float32


@pytest.mark.parametrize("size", SIZES)
def test_ssim_matches_skimage(size):
    a, b = _maps(*size, seed=2)
    ours = ssim_similarity(torch.from_numpy(a), torch.from_numpy(b))
    expected = [
        structural_similarity(_min_max(x), _min_max(y), data_range=1)
        for x, y in zip(a, b, strict=True)
    ]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5)
    # float32 input: same result to 1e-5 (computed in float64 internally).
    ours32 = ssim_similarity(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    np.testing.assert_allclose(ours32.numpy(), expected, atol=1e-5)


def test_ssim_without_normalisation_and_other_window():
    a, b = _maps(40, 40, seed=3)
    a, b = np.stack([_min_max(x) for x in a]), np.stack([_min_max(y) for y in b])
    ours = ssim_similarity(torch.from_numpy(a), torch.from_numpy(b), normalise=False, win_size=5)
    expected = [
        structural_similarity(x, y, data_range=1, win_size=5) for x, y in zip(a, b, strict=True)
    ]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5)


def test_ssim_degenerate_cases_and_errors():
    maps = torch.rand(2, 20, 20)
    torch.testing.assert_close(ssim_similarity(maps, maps), torch.ones(2))
    constant = torch.full((1, 20, 20), 3.0)
    # Constant maps normalise to zeros: two constant maps are identical (SSIM 1), never NaN.
    assert ssim_similarity(constant, constant).item() == pytest.approx(1.0)
    assert torch.isfinite(ssim_similarity(constant, maps[:1])).all()
    with pytest.raises(ValueError, match="smaller than"):
        ssim_similarity(torch.rand(1, 6, 30), torch.rand(1, 6, 30))
    with pytest.raises(ValueError, match="odd"):
        ssim_similarity(maps, maps, win_size=4)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim_similarity(maps, maps[:1])
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        ssim_similarity(maps[:, None], maps[:, None])


@pytest.mark.parametrize("size", SIZES)
def test_hog_matches_skimage_defaults(size):
    a, b = _maps(*size, seed=4)
    maps = np.concatenate([a, b])
    maps = np.stack([_min_max(x) for x in maps])
    ours = hog_features(torch.from_numpy(maps)).numpy()
    expected = np.stack([hog(x) for x in maps])
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    np.testing.assert_allclose(ours, expected, atol=1e-6)  # in fact far closer


@pytest.mark.parametrize(
    "options",
    [
        {
            "orientations": 8,
            "pixels_per_cell": (5, 7),
            "cells_per_block": (2, 3),
            "block_norm": "L1",
        },
        {"pixels_per_cell": (16, 16), "cells_per_block": (1, 1), "block_norm": "L2"},
        {
            "orientations": 12,
            "pixels_per_cell": (7, 7),
            "cells_per_block": (2, 2),
            "block_norm": "L1-sqrt",
        },
    ],
)
def test_hog_matches_skimage_other_parameters(options):
    a, _ = _maps(64, 48, seed=5)
    maps = np.stack([_min_max(x) for x in a])
    ours = hog_features(torch.from_numpy(maps), **options).numpy()
    expected = np.stack([hog(x, **options) for x in maps])
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_hog_float32_input():
    a, _ = _maps(32, 32, seed=6)
    maps = np.stack([_min_max(x) for x in a]).astype(np.float32)
    ours = hog_features(torch.from_numpy(maps))
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), np.stack([hog(x) for x in maps]), atol=1e-4)


@pytest.mark.parametrize("size", SIZES)
def test_hog_similarity_matches_reference(size):
    a, b = _maps(*size, seed=7)
    ours = hog_similarity(torch.from_numpy(a), torch.from_numpy(b))
    expected = [spearmanr(hog(_min_max(x)), hog(_min_max(y)))[0] for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6)


def test_hog_degenerate_cases_and_errors():
    maps = torch.rand(2, 32, 32)
    torch.testing.assert_close(hog_similarity(maps, maps), torch.ones(2))
    constant = torch.zeros(2, 32, 32)
    torch.testing.assert_close(hog_features(constant), torch.zeros(2, 324))
    torch.testing.assert_close(hog_similarity(constant, maps), torch.zeros(2))
    with pytest.raises(ValueError, match="too small"):
        hog_features(torch.rand(1, 16, 40))
    with pytest.raises(ValueError, match="block_norm"):
        hog_features(maps, block_norm="L3")


def test_batch_equals_per_sample_loop():
    a, b = _maps(56, 56, seed=8)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for function in (
        spearman_similarity,
        lambda x, y: spearman_similarity(x, y, absolute=True),
        ssim_similarity,
        hog_similarity,
    ):
        batched = function(ta, tb)
        looped = torch.cat([function(ta[i : i + 1], tb[i : i + 1]) for i in range(len(ta))])
        torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)


def test_nan_maps_rejected():
    maps = torch.rand(1, 16, 16)
    bad = maps.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        spearman_similarity(bad, maps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a, b = _maps(56, 56, seed=9)
    ta, tb = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    for function in (spearman_similarity, ssim_similarity, hog_similarity):
        on_cpu = function(ta, tb)
        on_gpu = function(ta.cuda(), tb.cuda())
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-5)


def test_pearson_and_cosine_closed_forms():
    """VAR App. Figs. 8–14: Pearson is invariant to a positive affine map and flips sign with a
    negative one; cosine is not centred, so a shift changes it by a closed form; orthogonal
    maps score 0; a constant (Pearson) or all-zero (cosine) map scores 0, never NaN."""
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    torch.testing.assert_close(pearson_similarity(a, 2 * a + 3), torch.ones(1))
    torch.testing.assert_close(pearson_similarity(a, -a), -torch.ones(1))
    torch.testing.assert_close(cosine_similarity_maps(a, 2 * a), torch.ones(1))
    # ⟨a, a + 1⟩ / (‖a‖ ‖a + 1‖) = (30 + 10) / (√30 · √54)
    torch.testing.assert_close(
        cosine_similarity_maps(a, a + 1), torch.tensor([40 / (30**0.5 * 54**0.5)])
    )
    left = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    right = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    torch.testing.assert_close(cosine_similarity_maps(left, right), torch.zeros(1))
    torch.testing.assert_close(pearson_similarity(left, right), -torch.ones(1))
    torch.testing.assert_close(pearson_similarity(a, torch.full_like(a, 5.0)), torch.zeros(1))
    torch.testing.assert_close(cosine_similarity_maps(a, torch.zeros_like(a)), torch.zeros(1))


@pytest.mark.parametrize("size", [(3, 8, 8), (2, 5, 7)])
def test_pearson_and_cosine_match_scipy(size):
    generator = np.random.default_rng(sum(size))
    a, b = generator.normal(size=size), generator.normal(size=size)
    pearson = pearson_similarity(torch.from_numpy(a), torch.from_numpy(b))
    cosine = cosine_similarity_maps(torch.from_numpy(a), torch.from_numpy(b))
    for row in range(size[0]):
        x, y = a[row].ravel(), b[row].ravel()
        assert pearson[row].item() == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
        assert cosine[row].item() == pytest.approx(
            1 - scipy.spatial.distance.cosine(x, y), abs=1e-12
        )
