"""GradientSHAP: parity with Captum's GradientShap given the same draws, draws that are a function
of the sample index only, the closed form of a linear model, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import GradientShap as CaptumGradientShap
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.index_random import index_normal
from contrastive_saliency.methods import create_method
from tests.tiny_models import CountingCNN

pytestmark = pytest.mark.usefixtures("one_thread")
INDEX = torch.tensor([5, 17, 99])


def _model() -> CountingCNN:
    torch.manual_seed(0)
    return CountingCNN().eval()


def _images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("baselines", ["normal", "reference_images", 0.3])
def test_parity_with_captum_given_the_same_draws(monkeypatch, baselines):
    """Captum draws the baseline rows (``np.random.choice``), the path positions
    (``np.random.uniform``) and the noise (``torch.normal``) from global generators; given ours
    (the drawn baselines as its distribution, picked in row order b·S + s), it gives our
    attributions for every class."""
    model = _model()
    images, classes = _images(), torch.tensor([[0, 3], [2, 2], [4, 1]])
    if baselines == "reference_images":
        baselines = torch.randn(4, 3, 1, 12, generator=torch.Generator().manual_seed(2))
    method = create_method(
        "gradient_shap", model, n_samples=4, stdevs=0.3, baselines=baselines, batch_size=5
    )
    attributions = method.attributions(images, classes, index=INDEX)
    draws = method.draws(images, INDEX)
    batch, samples = draws.alphas.shape
    assert (draws.noise != 0).all() and draws.alphas.unique().numel() == batch * samples
    monkeypatch.setattr(np.random, "choice", lambda n, size: np.arange(size))
    monkeypatch.setattr(np.random, "uniform", lambda lo, hi, size: draws.alphas.reshape(-1).numpy())
    monkeypatch.setattr(torch, "normal", lambda mean, std: draws.noise.reshape(std.shape))
    distribution = draws.baselines.reshape(batch * samples, *images.shape[1:])
    for k in range(2):
        reference = CaptumGradientShap(model).attribute(
            images, baselines=distribution, n_samples=samples, stdevs=0.3, target=classes[:, k]
        )
        assert reference.abs().max() > 1e-4
        torch.testing.assert_close(attributions[:, k], reference, rtol=1e-5, atol=1e-7)
    assert method(images, classes, index=INDEX).shape == (3, 2, 12, 12)


def test_draws_depend_on_the_sample_index_only():
    """The same index gives the same map in any batch, position, chunking and class set; another
    index or seed gives another map (Captum #742: Captum's depend on the global generators)."""
    model = _model()
    images, classes = _images(), torch.tensor([[0, 3], [2, 2], [4, 1]])
    method = create_method("gradient_shap", model, n_samples=6, stdevs=0.2, batch_size=7)
    maps = method(images, classes, index=INDEX)
    reordered = method(images.flip(0), classes.flip(0), index=INDEX.flip(0)).flip(0)
    torch.testing.assert_close(reordered, maps)
    chunked = create_method("gradient_shap", model, n_samples=6, stdevs=0.2, batch_size=1)
    alone = chunked(images[1:2], classes[1:2, 1], index=INDEX[1:2])
    torch.testing.assert_close(alone[0, 0], maps[1, 1])
    other_index = method(images, classes, index=INDEX + 1)
    other_seed = create_method("gradient_shap", model, n_samples=6, stdevs=0.2, seed=1)
    for changed in (other_index, other_seed(images, classes, index=INDEX)):
        assert (changed - maps).abs().amax(dim=(2, 3)).min() > 1e-6
    first, second = method.draws(images, INDEX), method.draws(images, INDEX)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_linear_model_closed_form():
    """For ``f(x) = Σ w·x + b`` the gradient is ``w`` everywhere, so ``φ = w ⊙ mean_s (x̃_s − x'_s)``
    and ``Σ φ = mean_s f(x̃_s) − f(x'_s)`` for every draw set (completeness of each draw);
    without noise and with a constant baseline, ``φ = w ⊙ (x − x')`` exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 4)).double().eval()
    images, classes = _images().double(), torch.tensor([[1, 3], [0, 2], [2, 2]])
    weights = model[1].weight.detach().view(4, 3, 12, 12)[classes]  # [B, K, C, H, W]
    method = create_method("gradient_shap", model, n_samples=5, stdevs=0.5)
    draws = method.draws(images, INDEX)
    difference = (images[:, None] + draws.noise - draws.baselines).mean(dim=1)  # [B, C, H, W]
    attributions = method.attributions(images, classes, index=INDEX)
    torch.testing.assert_close(attributions, weights * difference[:, None])
    with torch.no_grad():
        noisy = model((images[:, None] + draws.noise).flatten(0, 1)).unflatten(0, (3, 5))
        start = model(draws.baselines.flatten(0, 1)).unflatten(0, (3, 5))
    rows = torch.arange(3)[:, None]
    expected_sum = (noisy - start).mean(dim=1)[rows, classes]
    torch.testing.assert_close(attributions.sum(dim=(2, 3, 4)), expected_sum)
    constant = create_method("gradient_shap", model, baselines=-0.5)
    exact = constant.attributions(images, classes, index=INDEX)
    torch.testing.assert_close(exact, weights * (images + 0.5)[:, None])


def test_index_normal_is_standard_normal_and_drawn_in_pieces():
    index = torch.arange(4)
    values = index_normal(index, (20_000,), seed=3, stream=7)
    assert abs(float(values.mean())) < 0.02 and abs(float(values.std()) - 1) < 0.02
    assert values.abs().max() < 5.8
    pieces = torch.cat(
        [index_normal(index, (700,), 3, 7, start=0), index_normal(index, (300,), 3, 7, 700)], 1
    )
    assert torch.equal(pieces, values[:, :1000])


def test_errors():
    model = _model()
    with pytest.raises(ConfigurationError, match=r"n_samples must be a positive integer, got 0"):
        create_method("gradient_shap", model, n_samples=0)
    with pytest.raises(ConfigurationError, match=r"stdevs .* must be a number >= 0, got -1"):
        create_method("gradient_shap", model, stdevs=-1)
    with pytest.raises(ConfigurationError, match=r"baselines must be 'normal'.*got 'uniform'"):
        create_method("gradient_shap", model, baselines="uniform")
    with pytest.raises(ConfigurationError, match=r"reference images \[M, C, H, W\]"):
        create_method("gradient_shap", model, baselines=torch.zeros(3, 12, 12))
    method = create_method("gradient_shap", model, baselines=torch.zeros(2, 3, 5, 5))
    with pytest.raises(ConfigurationError, match=r"do not broadcast to images of shape"):
        method(_images(1), torch.tensor([0]), index=INDEX[:1])
    with pytest.raises(ConfigurationError, match=r"reads the batch field\(s\) index"):
        method(_images(1), torch.tensor([0]))
