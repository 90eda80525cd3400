"""RISE: the reference code's masks, the Monte-Carlo estimator, closed forms, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.transform import resize
from torch import nn

import contrastive_saliency.methods.rise  # noqa: F401  (registers "rise")
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.methods.rise import generate_masks
from tests.tiny_models import TinyCAMNet

FAST = {"n_masks": 300, "grid_size": 4, "batch_size": 64}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyCAMNet(channels=6, num_classes=5).eval()
    images = torch.randn(3, 3, 24, 20, generator=torch.Generator().manual_seed(1))
    return model, images


def test_masks_match_the_reference_construction():
    """skimage's order-1 'reflect' upsampling of each grid to (s+1)·⌈H/s⌉, cropped at the
    mask's offset (eclique/RISE ``generate_masks``), for a size s does not divide."""
    height, width, s = 37, 50, 5
    masks = generate_masks(40, s, 0.3, (height, width), seed=3)
    dense = masks.materialise()
    assert dense.shape == (40, height, width)
    up_size = ((s + 1) * math.ceil(height / s), (s + 1) * math.ceil(width / s))
    for i in range(40):
        row, col = masks.shifts[i].tolist()
        assert 0 <= row < math.ceil(height / s) and 0 <= col < math.ceil(width / s)
        grid = masks.grid[i].numpy().astype(np.float32)
        upsampled = resize(grid, up_size, order=1, mode="reflect", anti_aliasing=False)
        expected = torch.from_numpy(upsampled[row : row + height, col : col + width])
        torch.testing.assert_close(dense[i], expected.float(), rtol=0, atol=1e-6)
    assert set(masks.grid.unique().tolist()) == {0.0, 1.0}
    # E[M(λ)] = p1: the interpolation weights of every pixel sum to one
    assert abs(masks.grid.mean().item() - 0.3) < 0.02
    torch.testing.assert_close(masks.rows.sum(-1), torch.ones(40, height))
    again = generate_masks(40, s, 0.3, (height, width), seed=3)
    assert torch.equal(again.materialise(), dense)
    assert not torch.equal(generate_masks(40, s, 0.3, (height, width), seed=4).grid, masks.grid)


def direct_rise(model, image, cls, masks, keep_probability, probability=True):
    """``1/(N·p1) Σ_i f_c(x ⊙ M_i) M_i`` one mask at a time (float64 sum)."""
    total = torch.zeros(image.shape[-2:], dtype=torch.float64)
    with torch.no_grad():
        for mask in masks:
            output = model((image * mask)[None])[0]
            score = output.softmax(0)[cls] if probability else output[cls]
            total += score.double() * mask.double()
    return (total / (len(masks) * keep_probability)).float()


@pytest.mark.parametrize("score", ["probability", "logit"])
def test_estimator_equals_direct_computation_with_the_same_masks(tiny, score):
    model, images = tiny
    rise = create_method("rise", model, n_masks=60, grid_size=3, keep_probability=0.4, score=score)
    classes = torch.tensor([[1, 4], [0, 0], [3, 2]])
    maps = rise(images, classes)
    assert maps.shape == (3, 2, 24, 20) and maps.isfinite().all()
    masks = rise.masks(24, 20).materialise()
    for b in range(3):
        for k in range(2):
            expected = direct_rise(
                model, images[b], classes[b, k], masks, 0.4, score == "probability"
            )
            torch.testing.assert_close(maps[b, k], expected, rtol=1e-5, atol=1e-6)


def test_deterministic_and_independent_of_batching(tiny):
    model, images = tiny
    classes = torch.tensor([[1, 4], [0, 2], [3, 2]])
    rise = create_method("rise", model, **FAST)
    maps = rise(images, classes)
    assert torch.equal(create_method("rise", model, **FAST)(images, classes), maps)
    other_seed = create_method("rise", model, **FAST, seed=1)(images, classes)
    assert (other_seed - maps).abs().max() > 1e-3
    for batch_size in (1, 7, 10_000):  # chunks split masks, split batches, or hold everything
        options = {**FAST, "batch_size": batch_size}
        torch.testing.assert_close(
            create_method("rise", model, **options)(images, classes), maps, rtol=1e-5, atol=1e-7
        )
    for k in range(2):  # K classes from the same forwards == one class per call
        torch.testing.assert_close(rise(images, classes[:, k])[:, 0], maps[:, k])
    for b in range(3):  # a batch row == that image alone
        torch.testing.assert_close(rise(images[b : b + 1], classes[b : b + 1]), maps[b : b + 1])


class ConstantLogits(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([2.0, -1.0]).expand(x.shape[0], 2)


class RegionLogit(nn.Module):
    """Logit 0 = mean of channel 0 over the top-left 8×8 region; logit 1 = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, 0, :8, :8].mean(dim=(1, 2))
        return torch.stack([region, torch.zeros_like(region)], dim=1)


def test_closed_forms():
    images = torch.ones(1, 3, 32, 32)
    # constant score f: S = f · mean_i M_i / p1, whose expectation is f everywhere
    rise = create_method("rise", ConstantLogits(), n_masks=2000, grid_size=4, score="logit")
    maps = rise(images, torch.tensor([[0, 1]]))
    mean_mask = rise.masks(32, 32).materialise().mean(dim=0) / 0.5
    torch.testing.assert_close(maps[0, 0], 2.0 * mean_mask)
    torch.testing.assert_close(maps[0, 1], -1.0 * mean_mask)
    assert (maps[0, 0] - 2.0).abs().mean() < 0.05

    # linear score f(x ⊙ M) = <w, M> (x = 1): S = (1/p1) E[M Mᵀ] w, larger where the region is
    rise = create_method("rise", RegionLogit(), n_masks=2000, grid_size=4, score="logit")
    saliency = rise(images, torch.tensor([0]))[0, 0]
    masks = rise.masks(32, 32).materialise()
    region_score = masks[:, :8, :8].mean(dim=(1, 2))
    expected = torch.einsum("n,nhw->hw", region_score, masks) / (2000 * 0.5)
    torch.testing.assert_close(saliency, expected, rtol=1e-5, atol=1e-7)
    inside, far = saliency[:8, :8].mean(), saliency[16:, 16:].mean()
    assert inside - far > 0.05  # ≈ p1 + Var/p1 inside, ≈ p1 far away
    assert abs(far.item() - 0.5) < 0.05


def test_eval_mode_no_grad_and_inference_tensors():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    )
    images = torch.randn(2, 3, 8, 8)
    model(images)  # materialise the lazy layer
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    rise = create_method("rise", model, n_masks=50, grid_size=2)
    model.eval()
    reference = rise(images, torch.tensor([0, 2]))
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    assert torch.equal(rise(images, torch.tensor([0, 2])), reference)  # run in eval mode
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    with torch.inference_mode():
        assert torch.equal(rise(images.clone(), torch.tensor([0, 2])), reference)


def test_errors(tiny):
    model, images = tiny
    with pytest.raises(ConfigurationError, match=r"class indices must lie in \[0, 4\]"):
        create_method("rise", model, n_masks=4)(images, torch.tensor([0, 5, 1]))
    with pytest.raises(ConfigurationError, match=r"keep_probability p1 must lie in \(0, 1\]"):
        create_method("rise", model, keep_probability=0.0)
    with pytest.raises(ConfigurationError, match=r"n_masks must be a positive integer"):
        create_method("rise", model, n_masks=0)
    with pytest.raises(ConfigurationError, match=r"batch_size .* must be a positive integer"):
        create_method("rise", model, batch_size=0)
    with pytest.raises(ConfigurationError, match=r"score must be one of probability, logit"):
        create_method("rise", model, score="softmax")
