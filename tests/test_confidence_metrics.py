"""Confidence drop, relative drop and AD / IC / AG on tiny linear models with closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from contrastive_saliency.metrics.functional.confidence import (
    average_drop,
    average_gain,
    confidence_drop,
    drop_increase_gain,
    increase_in_confidence,
    mask_top_pixels,
    masked_confidences,
    relative_drop,
    soft_mask_confidences,
)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


class HalfSums(nn.Module):
    """Logits ``[a·Σ left half, a·Σ right half, 0]`` of a ``[B, 1, H, W]`` image; counts calls."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.calls = 0
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        w = x.shape[-1]
        left = x[..., : w // 2].sum(dim=(1, 2, 3))
        right = x[..., w // 2 :].sum(dim=(1, 2, 3))
        return self.scale * torch.stack([left, right, torch.zeros_like(left)], dim=1)


class SignedSum(nn.Module):
    """Two-class linear model, logits ``[s·Σx, 0]``: p₀ = sigmoid(s·Σx)."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign

    def forward(self, x):
        s = self.sign * x.sum(dim=(1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_mask_top_pixels_selects_k_with_index_keyed_random_ties():
    images = torch.ones(2, 3, 4, 4)
    maps = torch.zeros(2, 4, 4)
    maps[0, 3, 3] = 2.0
    maps[0, 0, 1] = 1.0
    # fraction 0.125 of 16 pixels → k = 2; map 0 has two distinct top pixels, map 1 is all ties.
    masked = mask_top_pixels(images, maps, 0.125, fill=-1.0, indices=torch.tensor([7, 8]))
    expected = torch.ones(3, 4, 4)
    expected[:, 3, 3] = expected[:, 0, 1] = -1.0
    assert torch.equal(masked[0], expected)
    removed = masked[1, 0] == -1.0
    assert int(removed.sum()) == 2 and (masked[1] == -1.0).all(dim=0).equal(removed)
    # The tied map's two pixels depend on its index only (not on its batch neighbours) ...
    alone = mask_top_pixels(images[1:], maps[1:], 0.125, fill=-1.0, indices=torch.tensor([8]))
    assert torch.equal(alone[0], masked[1])
    # ... and over many indices every pixel is drawn about equally often (k/N = 1/8 each),
    # where the raster rule always took pixels 0 and 1.
    many = torch.arange(4000)
    flat = mask_top_pixels(
        torch.ones(4000, 1, 4, 4), torch.zeros(4000, 4, 4), 0.125, fill=-1.0, indices=many
    ).flatten(1)
    frequency = (flat == -1.0).double().mean(dim=0)
    assert (frequency - 0.125).abs().max() < 4 * (0.125 * 0.875 / 4000) ** 0.5
    with pytest.raises(ValueError, match="upsample"):
        mask_top_pixels(images, torch.zeros(2, 2, 2), 0.1, indices=torch.arange(2))
    with pytest.raises(ValueError, match="fraction"):
        mask_top_pixels(images, maps, 0.0, indices=torch.arange(2))
    with pytest.raises(ValueError, match="index"):
        mask_top_pixels(images, maps, 0.125, indices=torch.arange(3))


def test_confidence_drop_closed_form_one_forward():
    model = SignedSum(1.0)
    images = torch.full((3, 1, 4, 4), 0.25)  # Σx = 4 → p₀ = σ(4)
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    # k = 0.25 · 16 = 4 pixels zeroed → Σx = 3 → p₀ = σ(3); p₁ = 1 − p₀.
    drop = confidence_drop(
        model, images, maps, torch.tensor([0, 0, 1]), fraction=0.25, indices=torch.arange(3)
    )
    d = sigmoid(4) - sigmoid(3)
    torch.testing.assert_close(drop, torch.tensor([d, d, -d]))
    assert not drop.requires_grad

    counted = HalfSums()
    images = torch.ones(5, 1, 4, 4)
    five, no_class = torch.arange(5), torch.zeros(5, dtype=torch.long)
    confidence_drop(counted, images, torch.rand(5, 4, 4), no_class, indices=five)
    assert counted.calls == 1 and counted.batch_sizes == [10]  # originals + masked together
    chunked = HalfSums()
    maps = torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(1))
    full = confidence_drop(HalfSums(), images, maps, no_class, 0.25, indices=five)
    small = confidence_drop(chunked, images, maps, no_class, 0.25, batch_size=3, indices=five)
    assert chunked.batch_sizes == [3, 3, 3, 1]
    torch.testing.assert_close(full, small)


def test_masked_confidences_multiple_classes():
    images = torch.ones(1, 1, 2, 4)  # left Σ = 4, right Σ = 4
    maps = torch.zeros(1, 2, 4)
    maps[0, :, :2] = 1.0  # the 4 left pixels are the top half
    before, after, probs = masked_confidences(
        HalfSums(), images, maps, torch.tensor([[0, 1, 2]]), fraction=0.5, indices=torch.arange(1)
    )
    torch.testing.assert_close(before, torch.tensor([[4.0, 4.0, 0.0]]).softmax(1))
    torch.testing.assert_close(after, torch.tensor([[0.0, 4.0, 0.0]]).softmax(1))
    torch.testing.assert_close(probs, before)


def test_relative_drop_closed_form():
    images = torch.ones(2, 1, 2, 4)
    maps = torch.zeros(2, 2, 4)
    maps[0, :, :2] = 1.0  # top 50 % = the left half (class 0's evidence)
    maps[1, :, 2:] = 1.0  # top 50 % = the right half (class 1's evidence)
    model = HalfSums(scale=0.5)
    p = torch.tensor([2.0, 2.0, 0.0]).softmax(0)  # before, both samples
    p_left_gone = torch.tensor([0.0, 2.0, 0.0]).softmax(0)
    p_right_gone = torch.tensor([2.0, 0.0, 0.0]).softmax(0)
    classes = torch.tensor([0, 0])
    two = torch.arange(2)
    rd = relative_drop(
        model, images, maps, classes, torch.tensor([1, 1]), fraction=0.5, indices=two
    )
    expected = torch.stack(
        [
            (p[0] - p_left_gone[0]) - (p[1] - p_left_gone[1]),
            (p[0] - p_right_gone[0]) - (p[1] - p_right_gone[1]),
        ]
    )
    torch.testing.assert_close(rd, expected)
    assert rd[0] > 0 > rd[1]  # removing c's evidence is discriminative, removing d's is not
    # Default reference: the most probable class other than c on the original image = class 1.
    default = relative_drop(model, images, maps, classes, fraction=0.5, indices=two)
    torch.testing.assert_close(default, expected)
    with pytest.raises(ValueError, match="reference_classes"):
        relative_drop(model, images, maps, classes, classes, fraction=0.5, indices=two)


def test_average_drop_increase_gain_closed_form():
    images = torch.full((2, 1, 4, 4), 0.25)  # Σx = 4
    half = torch.full((2, 4, 4), 0.5)  # soft mask halves every pixel → Σ(x ⊙ E) = 2
    classes = torch.tensor([0, 1])
    # SignedSum(+1): Y₀ = σ(4), O₀ = σ(2) (drop); class 1: Y₁ = σ(−4), O₁ = σ(−2) (gain).
    y = torch.tensor([sigmoid(4), sigmoid(-4)])
    o = torch.tensor([sigmoid(2), sigmoid(-2)])
    model = SignedSum(1.0)
    kwargs = {"normalise": False}
    ad = average_drop(model, images, half, classes, **kwargs)
    ic = increase_in_confidence(model, images, half, classes, **kwargs)
    ag = average_gain(model, images, half, classes, **kwargs)
    torch.testing.assert_close(ad, torch.stack([(y[0] - o[0]) / y[0], torch.tensor(0.0)]))
    torch.testing.assert_close(ic, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ag, torch.stack([torch.tensor(0.0), (o[1] - y[1]) / (1 - y[1])]))
    combined = drop_increase_gain(model, images, half, classes, **kwargs)
    torch.testing.assert_close(combined["average_drop"], ad)
    torch.testing.assert_close(combined["increase_in_confidence"], ic)
    torch.testing.assert_close(combined["average_gain"], ag)
    # A full map (E = 1) changes nothing: AD = AG = IC = 0.
    ones = torch.ones(2, 4, 4)
    assert torch.all(average_drop(model, images, ones, classes, **kwargs) == 0)
    assert torch.all(increase_in_confidence(model, images, ones, classes, **kwargs) == 0)
    with pytest.raises(ValueError, match="normalise=True"):
        average_drop(model, images, half * 3, classes, normalise=False)


def test_soft_mask_normalises_maps():
    model = SignedSum(1.0)
    images = torch.full((2, 1, 2, 2), 1.0)
    maps = torch.tensor([[[2.0, 4.0], [6.0, 10.0]], [[3.0, 3.0], [3.0, 3.0]]])
    y, o = soft_mask_confidences(model, images, maps, torch.tensor([0, 0]))
    # (E − 2) / 8 = [0, .25, .5, 1] → Σ = 1.75; a constant map normalises to zeros → Σ = 0.
    torch.testing.assert_close(y, torch.full((2,), sigmoid(4)))
    torch.testing.assert_close(o, torch.tensor([sigmoid(1.75), 0.5]))
    # [B, 1, H, W] maps are accepted too.
    _, o2 = soft_mask_confidences(model, images, maps[:, None], torch.tensor([0, 0]))
    torch.testing.assert_close(o2, o)
    with pytest.raises(ValueError, match="classes"):
        soft_mask_confidences(model, images, maps, torch.tensor([0]))
