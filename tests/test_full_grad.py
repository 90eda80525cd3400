"""FullGrad: parity with pytorch-grad-cam's FullGrad, completeness of the full-gradient
decomposition, the authors' per-layer rescale, K classes from one forward, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import FullGrad as LibraryFullGrad
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(head_scale: float = 1.0) -> nn.Sequential:
    """conv-BN-ReLU(inplace) → max-pool → conv(no bias)-BN-ReLU(inplace) → conv-ReLU → GAP →
    linear: biased convolutions, batch norms, a bias-free convolution and half-size layers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5),
    )  # fmt: skip
    with torch.no_grad():
        for norm in (model[1], model[5]):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
        model[-1].weight *= head_scale
    return model.eval()


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=(-2, -1), keepdim=True)
    return (maps - low) / (maps.amax(dim=(-2, -1), keepdim=True) - low)


def test_parity_with_pytorch_grad_cam():
    """pytorch-grad-cam min-max rescales its sum for display (compared after the same rescale)
    and divides each channel by ``max + 1e-7``: with this model's small gradients that ε moves
    its maps by up to 8e-3 (measured at head scale 1), so the head is scaled by 1e4, which makes
    ε negligible (then 8e-7); the maps are otherwise invariant to the logits' scale."""
    model = _cnn(head_scale=1e4)
    images, classes = _images(), torch.tensor([[0, 3], [2, 2], [4, 1]])
    maps = create_method("full_grad", model)(images, classes)
    library = LibraryFullGrad(model, [])
    for k in range(2):
        reference = library(images, [ClassifierOutputTarget(int(c)) for c in classes[:, k]])
        np.testing.assert_allclose(_min_max(maps[:, k]).numpy(), reference, atol=1e-5)
    library.activations_and_grads.release()


def test_completeness_of_the_full_gradient_decomposition():
    """Srinivas & Fleuret Eq. 3 for a ReLU network: ``y_c = ∇_x y_c · x + Σ_l b_l · ∇_{z_l} y_c``
    over every bias (the batch norms' eval-mode biases and the head's included)."""
    model = _cnn().double()
    images = _images().double()
    classes = torch.tensor([[0, 3], [2, 2], [4, 1]])
    method = create_method("full_grad", model)
    input_term, bias_terms = method.decomposition(images, classes)
    assert input_term.shape == (3, 2, 3, 16, 16) and len(bias_terms) == 4  # conv, BN, BN, conv
    total = input_term.sum(dim=(2, 3, 4)) + sum(t.sum(dim=(2, 3, 4)) for t in bias_terms)
    with torch.no_grad():
        logits = model(images)[torch.arange(3)[:, None], classes]
    head_bias = model[-1].bias.detach()[classes]
    torch.testing.assert_close(total + head_bias, logits, rtol=1e-10, atol=1e-10)


def test_authors_rescale_per_layer():
    """``rescale="layer"``: each term min-max rescaled over all its channels and positions,
    summed over channels, resized with ``align_corners=True`` (idiap/fullgrad-saliency)."""
    model = _cnn()
    images, classes = _images(2), torch.tensor([[1], [4]])
    method = create_method("full_grad", model, rescale="layer")
    input_term, bias_terms = method.decomposition(images, classes)
    expected = torch.zeros(2, 16, 16)
    for term in (input_term[:, 0], *(t[:, 0] for t in bias_terms)):
        term = term.abs()
        flat = term.flatten(1)
        low, high = flat.min(dim=1).values, flat.max(dim=1).values
        scaled = ((term - low.view(-1, 1, 1, 1)) / (high - low).view(-1, 1, 1, 1)).sum(1)
        resized = nn.functional.interpolate(
            scaled[:, None], size=(16, 16), mode="bilinear", align_corners=True
        )
        expected += resized[:, 0]
    torch.testing.assert_close(method(images, classes)[:, 0], expected)


def test_k_classes_from_one_forward_and_class_dependence():
    model = _cnn()
    images, classes = _images(), torch.tensor([[0, 3, 1], [2, 4, 0], [4, 1, 3]])
    method = create_method("full_grad", model)
    maps = method(images, classes)
    assert maps.shape == (3, 3, 16, 16) and torch.isfinite(maps).all()
    for b in range(3):
        for k in range(3):
            single = method(images[b : b + 1], classes[b : b + 1, k])
            torch.testing.assert_close(single[0, 0], maps[b, k], rtol=1e-5, atol=1e-6)
    assert (maps[:, 0] - maps[:, 1]).abs().amax(dim=(1, 2)).min() > 1e-3
    assert all(p.grad is None for p in model.parameters())


class NormThenAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: the activation runs inside the batch norm's forward()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_errors():
    with pytest.raises(ConfigurationError, match=r"layer '1' \(NormThenAct\) is a batch norm"):
        create_method("full_grad", nn.Sequential(nn.Conv2d(3, 4, 1), NormThenAct(4)))
    stateless = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ConfigurationError, match=r"'1' has no running statistics"):
        create_method("full_grad", stateless)
    with pytest.raises(ConfigurationError, match=r"rescale must be 'channel'.*got 'image'"):
        create_method("full_grad", _cnn(), rescale="image")
