"""The layer-capture primitive and Grad-CAM: closed form, hooks, modes, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive_saliency.errors import ConfigurationError, UnknownLayerError, UnknownMethodError
from contrastive_saliency.gradients import class_gradients
from contrastive_saliency.layers import resolve_layer
from contrastive_saliency.methods import create_method, list_methods
from tests.tiny_models import TinyCAMNet


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyCAMNet(num_classes=4)


def test_grad_cam_equals_cam_closed_form(net):
    """With GAP + linear, ∂y_c/∂A_k(i,j) = W[c,k]/(h·w), so Grad-CAM = ReLU(Σ_k W[c,k] A_k)/(h·w)."""
    images = torch.randn(3, 3, 8, 8)
    classes = torch.tensor([[0, 2], [1, 3], [3, 0]])
    maps = create_method("grad_cam", net, layer="features")(images, classes)
    activations = net.features(images)  # [B, C, 8, 8]; the layer's resolution equals the input's
    weights = net.head.weight[classes] / 64.0  # [B, K, C]
    expected = torch.einsum("bkc,bchw->bkhw", weights, activations).relu()
    assert maps.shape == (3, 2, 8, 8)
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)


def test_maps_are_upsampled_to_the_input_and_1d_classes_give_k_1():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 5),
    )  # fmt: skip
    images = torch.randn(2, 3, 16, 16)
    maps = create_method("grad_cam", net, layer="2")(images, torch.tensor([1, 4]))
    low = create_method("grad_cam", net, layer="2").compute(images, torch.tensor([[1], [4]]))
    assert maps.shape == (2, 1, 16, 16) and low.shape == (2, 1, 4, 4)
    torch.testing.assert_close(maps, F.interpolate(low, size=(16, 16), mode="bilinear"))


def test_one_forward_for_all_classes_and_per_class_gradients_match(net):
    calls = []
    net.register_forward_pre_hook(lambda module, args: calls.append(1))
    images = torch.randn(2, 3, 8, 8)
    classes = torch.tensor([[0, 1, 2], [3, 2, 1]])
    together = class_gradients(net, images, "features", classes)
    assert len(calls) == 1
    assert together.gradients.shape == (2, 3, 6, 8, 8)
    for k in range(3):
        alone = class_gradients(net, images, "features", classes[:, k])
        torch.testing.assert_close(together.gradients[:, k], alone.gradients[:, 0])
    assert all(p.grad is None for p in net.parameters()), "no parameter gradients"


def test_hooks_removed_and_model_state_restored(net):
    net.train()
    net.head.weight.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    method = create_method("grad_cam", net, layer="features")
    method(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert net.training and all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())
    # Also when the call fails half-way (class index out of range).
    with pytest.raises(ConfigurationError, match=r"class indices must lie in \[0, 3\]"):
        method(torch.randn(2, 3, 8, 8), torch.tensor([0, 7]))
    assert net.training and [p.requires_grad for p in net.parameters()] == flags
    assert all(not m._forward_hooks for m in net.modules())


def test_wrong_layer_lists_nearest_valid_names(net):
    with pytest.raises(UnknownLayerError, match=r"'featurse'.*nearest valid names: features"):
        resolve_layer(net, "featurse")
    with pytest.raises(UnknownLayerError, match=r"features\.0"):
        create_method("grad_cam", net, layer="features.00")


def test_unknown_method_suggests_the_registered_one(net):
    assert "grad_cam" in list_methods()
    with pytest.raises(UnknownMethodError, match=r"'gradcam'.*did you mean grad_cam"):
        create_method("gradcam", net)


def test_maps_under_inference_mode_and_no_grad_callers_equal_normal_ones(net):
    method = create_method("grad_cam", net, layer="features")
    images, classes = torch.randn(2, 3, 8, 8), torch.tensor([[0, 1], [2, 3]])
    expected = method(images, classes)
    assert expected.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(method(images, classes), expected)
    with torch.inference_mode():
        inference_images = images.clone()  # an inference tensor
        torch.testing.assert_close(method(inference_images, classes), expected)


def test_default_layer_of_the_small_cnn():
    from lightning_modules.small_cnn import SmallCNN

    model = SmallCNN(num_classes=10)
    maps = create_method("grad_cam", model)(
        torch.randn(2, 3, 64, 64), torch.tensor([[1, 2], [3, 4]])
    )
    assert maps.shape == (2, 2, 64, 64) and torch.isfinite(maps).all() and (maps >= 0).all()
