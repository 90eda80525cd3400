"""Finer-CAM (Eqs. 5–8): closed form on GAP + linear, γ = 0 is the base CAM, invariances."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.targets import LogitNeighbours, TopPredictions
from tests.tiny_models import TinyCAMNet


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyCAMNet(num_classes=6)


def _ranked_below(logits, targets, k):
    """The k classes ranked just below each target by logit (then just above, if too few)."""
    order = logits.argsort(dim=1, descending=True, stable=True).tolist()
    rows = []
    for ranked, target in zip(order, targets.tolist(), strict=True):
        rank = ranked.index(target)
        rows.append((ranked[rank + 1 :] + ranked[:rank][::-1])[:k])
    return torch.tensor(rows)


def test_one_reference_closed_form(net):
    """∂y_c/∂A_k(i,j) = W[c,k]/(hw): α^{c,d} = (W[c] − γ W[d])/(hw) (Eq. 7), L = ReLU(Σ α A)."""
    images = torch.randn(3, 3, 8, 8)
    targets = torch.tensor([0, 3, 5])
    method = create_method("finer_cam", net, "features", references=LogitNeighbours(1))
    maps = method(images, targets)
    with torch.no_grad():
        reference = _ranked_below(net(images), targets, 1)[:, 0]
        weights = (net.head.weight[targets] - 0.6 * net.head.weight[reference]) / 64.0
        expected = torch.einsum("bc,bchw->bhw", weights, net.features(images)).relu()
    assert maps.shape == (3, 1, 8, 8) and expected.max() > 0
    torch.testing.assert_close(maps[:, 0], expected, atol=1e-6, rtol=1e-5)


def test_references_are_averaged_before_the_relu(net):
    """Eq. 8: ReLU(1/T Σ_t Σ_k α^{c,t}_k A_k), not the mean of the T ReLU'd maps."""
    images, targets = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 0, 4])
    maps = create_method("finer_cam", net, "features", gamma=0.8)(images, targets)  # T = 3
    with torch.no_grad():
        references = _ranked_below(net(images), targets, 3)
        activations = net.features(images)
        weights = (net.head.weight[targets][:, None] - 0.8 * net.head.weight[references]) / 64.0
        per_reference = torch.einsum("btc,bchw->bthw", weights, activations)
    torch.testing.assert_close(maps[:, 0], per_reference.mean(dim=1).relu(), atol=1e-6, rtol=1e-5)
    assert (maps[:, 0] - per_reference.relu().mean(dim=1)).abs().max() > 1e-4


def _top_references(logits, targets, k=3):
    others = logits.clone()
    others[torch.arange(len(targets)), targets] = float("-inf")
    return others.argsort(dim=1, descending=True)[:, :k]


def test_softmax_weighting_closed_forms(net):
    """On GAP + linear, ∂y_n/∂A_k = W[n, k]/(hw), so a score S(y) has the channel weights
    Σ_n ∂S/∂y_n W[n] / (hw). ``softmax`` (the authors' code) differentiates
    S = Σ_t p_t (y_c − γ y_t) / (Σ_t p_t + 1e-9) through p = softmax(y); ``softmax_constant``
    holds p fixed, so ∂S/∂y = Σ_t p_t (e_c − γ e_t) / (Σ_t p_t + 1e-9)."""
    images, targets = torch.randn(3, 3, 8, 8), torch.tensor([0, 3, 5])
    maps = {
        weighting: create_method(
            "finer_cam", net, "features", references=TopPredictions(3), weighting=weighting
        )
        for weighting in ("softmax", "softmax_constant")
    }
    assert all(method.gamma == 1.0 for method in maps.values())
    with torch.no_grad():
        logits, activations = net(images), net.features(images)
    references = _top_references(logits, targets)

    def score(y, fixed=None):
        p = (y if fixed is None else fixed).softmax(dim=1).gather(1, references)
        differences = y.gather(1, targets[:, None]) - y.gather(1, references)
        return ((p * differences).sum(dim=1) / (p.sum(dim=1) + 1e-9)).sum()

    for weighting, fixed in (("softmax", None), ("softmax_constant", logits)):
        slopes = torch.func.grad(lambda y, fixed=fixed: score(y, fixed))(logits)  # ∂S/∂y [B, N]
        weights = slopes @ net.head.weight / 64.0
        expected = torch.einsum("bc,bchw->bhw", weights, activations).relu()
        assert expected.amax() > 0
        got = maps[weighting](images, targets)[:, 0]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    difference = maps["softmax"](images, targets) - maps["softmax_constant"](images, targets)
    assert difference.abs().max() > 1e-3  # the gradient through the weights matters


@pytest.mark.parametrize("base", ["grad_cam", "layer_cam", "grad_cam_pp"])
def test_gamma_zero_is_the_base_cam(base):
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 6),
    )  # fmt: skip
    images, classes = torch.randn(2, 3, 8, 8), torch.tensor([[0, 5], [3, 1]])
    finer = create_method("finer_cam", net, "1", gamma=0.0, base=base)(images, classes)
    plain = create_method(base, net, "1")(images, classes)
    assert plain.max() > 0
    torch.testing.assert_close(finer, plain, atol=1e-6, rtol=1e-5)
    contrastive = create_method("finer_cam", net, "1", base=base)(images, classes)
    assert (contrastive - plain).abs().max() > 1e-4


@pytest.mark.parametrize("base", ["grad_cam", "layer_cam", "grad_cam_pp"])
def test_batch_rows_and_class_columns_are_independent(base):
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 7),
    )  # fmt: skip
    images = torch.randn(3, 3, 8, 8)
    classes = torch.tensor([[0, 6, 2], [1, 1, 3], [4, 0, 5]])
    method = create_method("finer_cam", net, "1", base=base)
    together = method(images, classes)
    for b in range(3):
        single = method(images[b : b + 1], classes[b : b + 1])
        torch.testing.assert_close(single[0], together[b], atol=1e-5, rtol=1e-4)
    for k in range(3):
        torch.testing.assert_close(method(images, classes[:, k]), together[:, k : k + 1])
    assert all(p.grad is None for p in net.parameters())


def test_defaults_and_errors(net):
    method = create_method("finer_cam", net, "features")
    assert method.gamma == 0.6 and isinstance(method.references, LogitNeighbours)
    assert method.references.k == 3 and method.weighting == "mean"
    with pytest.raises(ConfigurationError, match=r"base 'score_cam'.*grad_cam, layer_cam"):
        create_method("finer_cam", net, "features", base="score_cam")
    with pytest.raises(
        ConfigurationError, match=r"'mean' \(paper\), 'softmax'.*'softmax_constant'"
    ):
        create_method("finer_cam", net, "features", weighting="max")
    with pytest.raises(ConfigurationError, match=r"k=6 .* 6 classes"):
        create_method("finer_cam", net, "features", references=LogitNeighbours(6))(
            torch.randn(1, 3, 8, 8), torch.tensor([0])
        )


def test_logit_neighbours_cost_no_second_forward(net):
    forwards = []
    net.register_forward_pre_hook(lambda module, args: forwards.append(1))
    method = create_method("finer_cam", net, layer="features", references=LogitNeighbours(2))
    maps = method(torch.randn(3, 3, 8, 8), torch.tensor([[0, 1], [2, 3], [4, 5]]))
    assert len(forwards) == 1 and maps.shape == (3, 2, 8, 8)
