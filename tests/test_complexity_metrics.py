"""Sparseness (Gini) and complexity (entropy): closed forms, Quantus parity, the rules for
all-zero maps, NaN and scale, and the registered classes as the evaluation feeds them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contrastive_saliency.metrics import create_metric, list_metrics
from contrastive_saliency.metrics.functional import complexity, sparseness
from contrastive_saliency.metrics.registry import MetricInputs, metric_class


def _one_hot(size: int = 8) -> torch.Tensor:
    maps = torch.zeros(2, size, size)
    maps[0, 3, 5] = 2.5
    maps[1, 0, 0] = -1.0  # magnitudes: a negative spike is as concentrated
    return maps


def test_one_hot_and_constant_maps_are_the_extremes():
    n = 64
    torch.testing.assert_close(sparseness(_one_hot()), torch.full((2,), (n - 1) / n))
    torch.testing.assert_close(complexity(_one_hot()), torch.zeros(2))
    constant = torch.full((2, 8, 8), 0.3)
    torch.testing.assert_close(sparseness(constant), torch.zeros(2))
    torch.testing.assert_close(complexity(constant), torch.full((2,), math.log(n)))


def test_two_level_map_has_the_hand_computed_values():
    """A map with ``m`` pixels at 1 and the rest 0: Gini = 1 − m/N and entropy = log m."""
    maps = torch.zeros(1, 4, 4)
    maps.view(-1)[:4] = 1.0
    torch.testing.assert_close(sparseness(maps), torch.tensor([1 - 4 / 16]))
    torch.testing.assert_close(complexity(maps), torch.tensor([math.log(4)]))


def test_rules_scale_sign_all_zero_and_nan():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 10, 10, generator=generator)
    torch.testing.assert_close(sparseness(7.0 * maps), sparseness(maps))
    torch.testing.assert_close(complexity(-maps), complexity(maps))
    zero = torch.zeros(1, 10, 10)
    assert sparseness(zero).item() == 0.0
    assert complexity(zero).item() == pytest.approx(math.log(100))
    broken = maps.clone()
    broken[1, 2, 2] = float("nan")
    assert sparseness(broken).isnan().tolist() == [False, True, False]
    assert complexity(broken).isnan().tolist() == [False, True, False]


@pytest.mark.parametrize(
    ("name", "quantus_name"), [("sparseness", "Sparseness"), ("complexity", "Complexity")]
)
def test_parity_with_quantus(name, quantus_name):
    """Quantus' defaults (``abs=True``, ``normalise=True``) on fabricated maps. Quantus adds
    1e-7 to each normalised magnitude (Gini) or 1e-12 inside the log (entropy), hence the
    tolerance; on the one-hot map the Gini epsilon matters (N·1e-7 against a sum of 1), so
    that map is checked by the closed form above, not here."""
    quantus = pytest.importorskip("quantus")
    rng = np.random.default_rng(0)
    maps = rng.random((4, 1, 16, 16)).astype(np.float32) - 0.3
    images = rng.random((4, 3, 16, 16)).astype(np.float32)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    theirs = getattr(quantus, quantus_name)(disable_warnings=True)(
        model=model, x_batch=images, y_batch=np.zeros(4, dtype=int), a_batch=maps, device="cpu"
    )
    ours = {"sparseness": sparseness, "complexity": complexity}[name](torch.from_numpy(maps[:, 0]))
    np.testing.assert_allclose(
        ours.numpy(), np.asarray(theirs, dtype=np.float64), rtol=1e-5, atol=1e-5
    )


def test_registered_classes_as_the_evaluation_feeds_them():
    assert {"sparseness", "complexity"} <= set(list_metrics())
    assert metric_class("sparseness").higher_is_better is True
    assert metric_class("complexity").higher_is_better is False
    maps = _one_hot()[:, None]  # [B, K = 1, H, W], as the evaluation hands a single target
    inputs = MetricInputs(
        model=None, images=torch.zeros(2, 3, 8, 8), maps=maps, classes=torch.zeros(2, 1, dtype=torch.long),
        logits=torch.zeros(2, 3), batch={"index": torch.tensor([5, 9])},
    )  # fmt: skip
    for name, expected in (("sparseness", 63 / 64), ("complexity", 0.0)):
        metric = create_metric(name)
        metric.update(**metric.update_arguments(inputs))
        metric.update(**metric.update_arguments(inputs))  # the same samples again: counted once
        indices, values = metric.labelled_values(name, sync=False)
        assert indices.tolist() == [5, 9]
        torch.testing.assert_close(values[name], torch.full((2,), expected))
