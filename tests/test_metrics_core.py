"""Feature agreement, deletion curves, exactly-once per-sample state, Wilcoxon wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from contrastive_saliency.metrics.functional import (
    curve_auc,
    deletion_auc,
    deletion_curve,
    feature_agreement,
)
from contrastive_saliency.metrics.per_sample import PerSampleValues
from contrastive_saliency.stats import wilcoxon_below


def test_feature_agreement_closed_form():
    a = torch.zeros(3, 10, 10)
    b = torch.zeros(3, 10, 10)
    a[0].view(-1)[:5] = 1.0  # k = 5 % of 100 = 5 pixels
    b[0].view(-1)[:5] = 2.0  # same pixels → 1
    a[1].view(-1)[:5] = 1.0
    b[1].view(-1)[50:55] = 1.0  # disjoint → 0
    a[2].view(-1)[:5] = torch.arange(5.0, 0.0, -1)
    b[2].view(-1)[2:7] = 1.0  # shares pixels 2, 3, 4 → 3/5
    torch.testing.assert_close(feature_agreement(a, b, 0.05), torch.tensor([1.0, 0.0, 0.6]))
    # Only the positive part ranks: large negative values never enter the top set.
    signed = torch.full((1, 10, 10), -5.0)
    signed.view(-1)[20:25] = 0.1
    positive = torch.zeros(1, 10, 10)
    positive.view(-1)[20:25] = 1.0
    torch.testing.assert_close(feature_agreement(signed, positive, 0.05), torch.tensor([1.0]))


class MeanBrightness(nn.Module):
    """Logits [s, 0] with s = 4 · mean pixel value: deletion lowers p(class 0) predictably."""

    def forward(self, x):
        s = 4 * x.mean(dim=(1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_deletion_curve_closed_form_and_batch_invariance():
    images = torch.rand(3, 3, 4, 4) + 0.5
    maps = torch.rand(3, 4, 4)
    classes = torch.zeros(3, dtype=torch.long)
    indices = torch.arange(3)
    curve = deletion_curve(
        MeanBrightness(), images, maps, classes, pixels_per_step=4, indices=indices
    )
    assert curve.shape == (3, 5)  # 16 pixels, 4 per step → 4 steps + 1 point
    order = maps.flatten(1).argsort(dim=1, descending=True)
    for b in range(3):
        for step in range(5):
            kept = torch.ones(16)
            kept[order[b, : 4 * step]] = 0
            s = 4 * (images[b] * kept.view(1, 4, 4)).mean()
            assert curve[b, step].item() == pytest.approx(torch.sigmoid(s).item(), abs=1e-6)
    # The forward batch size changes nothing.
    for batch_size in (1, 4, 1000):
        small = deletion_curve(
            MeanBrightness(), images, maps, classes, 4, batch_size=batch_size, indices=indices
        )
        torch.testing.assert_close(small, curve)
    expected_auc = ((curve[:, :-1] + curve[:, 1:]) / 2).mean(dim=1)
    torch.testing.assert_close(curve_auc(curve, 16, 4), expected_auc)
    torch.testing.assert_close(
        deletion_auc(MeanBrightness(), images, maps, classes, 4, indices=indices), expected_auc
    )


def test_per_sample_values_drop_padded_duplicates():
    metric = PerSampleValues()
    metric.update(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([4, 0, 2]))
    metric.update(torch.tensor([0.4, 0.1]), torch.tensor([1, 4]))  # index 4 padded again
    indices, values = metric.compute()
    assert indices.tolist() == [0, 1, 2, 4]
    torch.testing.assert_close(values, torch.tensor([0.2, 0.4, 0.3, 0.1]))


def test_wilcoxon_below_matches_scipy_one_sided():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.2, 0.7, size=40)
    result = wilcoxon_below(values, 0.5)
    expected = stats.wilcoxon(values - 0.5, alternative="less")
    assert result.p_value == pytest.approx(expected.pvalue, abs=1e-12)
    assert result.n == 40
    assert wilcoxon_below(np.full(5, 0.5), 0.5).p_value == 1.0
