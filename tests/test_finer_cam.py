"""Finer-CAM (Eqs. 5–8): closed form on GAP + linear, γ = 0 is the base CAM, invariances."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saliency.errors import ConfigurationError
from saliency.methods import create_method
from saliency.targets import LogitNeighbours, TopPredictions
from tests.tiny_models import TinyCAMNet


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyCAMNet(num_classes=6)


def _nearest_logit_classes(logits, targets, k):
    distance = (logits - logits.gather(1, targets[:, None])).abs()
    distance[torch.arange(len(targets)), targets] = float("inf")
    return distance.argsort(dim=1)[:, :k]


def test_one_reference_closed_form(net):
    """∂y_c/∂A_k(i,j) = W[c,k]/(hw): α^{c,d} = (W[c] − γ W[d])/(hw) (Eq. 7), L = ReLU(Σ α A)."""
    images = torch.randn(3, 3, 8, 8)
    targets = torch.tensor([0, 3, 5])
    method = create_method("finer_cam", net, "features", references=LogitNeighbours(1))
    maps = method(images, targets)
    with torch.no_grad():
        reference = _nearest_logit_classes(net(images), targets, 1)[:, 0]
        weights = (net.head.weight[targets] - 0.6 * net.head.weight[reference]) / 64.0
        expected = torch.einsum("bc,bchw->bhw", weights, net.features(images)).relu()
    assert maps.shape == (3, 1, 8, 8) and expected.max() > 0
    torch.testing.assert_close(maps[:, 0], expected, atol=1e-6, rtol=1e-5)


def test_references_are_averaged_before_the_relu(net):
    """Eq. 8: ReLU(1/T Σ_t Σ_k α^{c,t}_k A_k), not the mean of the T ReLU'd maps."""
    images, targets = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 0, 4])
    maps = create_method("finer_cam", net, "features", gamma=0.8)(images, targets)  # T = 3
    with torch.no_grad():
        references = _nearest_logit_classes(net(images), targets, 3)
        activations = net.features(images)
        weights = (net.head.weight[targets][:, None] - 0.8 * net.head.weight[references]) / 64.0
        per_reference = torch.einsum("btc,bchw->bthw", weights, activations)
    torch.testing.assert_close(maps[:, 0], per_reference.mean(dim=1).relu(), atol=1e-6, rtol=1e-5)
    assert (maps[:, 0] - per_reference.relu().mean(dim=1)).abs().max() > 1e-4


def test_softmax_weighted_code_variant_closed_form(net):
    images, targets = torch.randn(3, 3, 8, 8), torch.tensor([0, 3, 5])
    method = create_method(
        "finer_cam", net, "features", references=TopPredictions(3), weighting="softmax"
    )
    assert method.gamma == 1.0
    maps = method(images, targets)
    with torch.no_grad():
        logits = net(images)
        others = logits.clone()
        others[torch.arange(3), targets] = float("-inf")
        references = others.argsort(dim=1, descending=True)[:, :3]
        p = logits.softmax(dim=1).gather(1, references)
        p = p / (p.sum(dim=1, keepdim=True) + 1e-9)
        weight = net.head.weight
        weights = (p[..., None] * (weight[targets][:, None] - weight[references])).sum(1) / 64.0
        expected = torch.einsum("bc,bchw->bhw", weights, net.features(images)).relu()
    torch.testing.assert_close(maps[:, 0], expected, atol=1e-6, rtol=1e-5)


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
    with pytest.raises(ConfigurationError, match=r"'mean' \(paper\) or 'softmax'"):
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
