"""Random Logit: parity with Quantus ``RandomLogit`` on fabricated maps (same maps, the class
Quantus drew), the closed forms and the rules for constant and NaN maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from contrastive_saliency.metrics.functional import random_logit

quantus = pytest.importorskip("quantus")

B, N, H, W = 5, 6, 12, 10


def _class_maps() -> torch.Tensor:
    """``[B, N, H, W]``: one fabricated map per (sample, class): signed, ReLU'd, smooth."""
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(B, N, H, W, generator=generator) - 0.3
    maps[1] = maps[1].relu()
    maps[2] = torch.nn.functional.avg_pool2d(maps[2], 3, stride=1, padding=1)
    maps[3, 4] = 3.0 * maps[3, 1]  # sample 3: class 4's map is a multiple of class 1's
    return maps


def test_random_logit_matches_quantus_on_the_class_it_drew():
    """Quantus is run one sample per call (batch size 1): its ``normalise_by_max`` divides by
    the maximum over the whole batch, so with larger batches its score of a sample depends on
    the others; we normalise each map on its own, which is Quantus at batch size 1."""
    maps = _class_maps()
    explained = np.array([2, 0, 5, 1, 3])
    x = torch.rand(B, 3, H, W).numpy()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, N))
    ours, theirs = [], []
    for b in range(B):
        drawn: list[int] = []

        def explain(model, inputs, targets, _b=b, _drawn=drawn, **kwargs):
            _drawn.append(int(targets[0]))
            return maps[_b, int(targets[0])][None, None].numpy()

        metric = quantus.RandomLogit(num_classes=N, seed=b, disable_warnings=True)
        score = metric(
            model=model, x_batch=x[b : b + 1], y_batch=explained[b : b + 1],
            a_batch=maps[b, explained[b]][None, None].numpy(), explain_func=explain,
            batch_size=1, device="cpu",
        )  # fmt: skip
        assert drawn and drawn[0] != explained[b]
        theirs.append(score[0])
        ours.append(random_logit(maps[b : b + 1, explained[b]], maps[b : b + 1, drawn[0]]))
    np.testing.assert_allclose(torch.cat(ours).numpy(), theirs, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(theirs, 4))) == B  # distinct values: the test can see a mismatch


def test_random_logit_closed_forms_and_rules():
    maps = _class_maps()
    # identical maps, and maps equal up to a positive factor (normalisation): 1
    same = random_logit(maps[:, 0], maps[:, 0])
    np.testing.assert_allclose(same.numpy(), 1.0, atol=1e-6)
    assert random_logit(maps[3:4, 1], maps[3:4, 4]).item() == pytest.approx(1.0, abs=1e-6)
    # one 7-pixel window: Wang et al. (2004) Eq. 13 with sample (co)variances, L = range of both
    a = torch.tensor([[0.0, 0.2, 1.0, 0.4, 0.0, 0.1, 0.3]], dtype=torch.float64)
    b = torch.tensor([[0.5, 0.0, 0.1, 1.0, 0.2, 0.0, 0.0]], dtype=torch.float64)
    c1, c2 = 0.01**2, 0.03**2  # data range 1 after max-abs normalisation
    mu_a, mu_b = a.mean(), b.mean()
    cov = ((a - mu_a) * (b - mu_b)).sum() / 6
    expected = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (a.var() + b.var() + c2)
    )
    assert random_logit(a[:, None], b[:, None]).item() == pytest.approx(expected.item(), rel=1e-9)
    # SSIM multiplies a luminance and a structure term: for a map and its NEGATION both are
    # negative, so their product is positive (Quantus' measure as it is; abs=True is the option)
    assert random_logit(maps[:1, 0], -maps[:1, 0]).item() > 0.5
    # the same constant twice (Quantus: 0/0 = NaN) is identical: 1; all-zero maps too
    constant, zeros = torch.full((2, H, W), 0.3), torch.zeros(2, H, W)
    assert random_logit(constant, 2 * constant).tolist() == [1.0, 1.0]
    assert random_logit(zeros, zeros).tolist() == [1.0, 1.0]
    # a constant against a varying map is defined: μ_a μ_b and σ_a σ_b terms of the window
    mixed = random_logit(zeros[:1], maps[:1, 0])
    assert math.isfinite(mixed.item()) and abs(mixed.item()) < 0.1
    # NaN in one sample's map: NaN for that sample only
    broken = maps[:, 0].clone()
    broken[1, 3, 3] = torch.nan
    values = random_logit(broken, maps[:, 1])
    assert math.isnan(values[1].item()) and torch.isfinite(values[[0, 2, 3, 4]]).all()
