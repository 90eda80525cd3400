"""DeepLIFT (Rescale): parity with Captum's DeepLift, summation-to-delta where Captum breaks it,
the closed form of a linear model, supported and refused models, hook hygiene."""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import DeepLift as CaptumDeepLift
from torch import nn
from torchvision.models import resnet18

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from tests.tiny_models import CountingCNN

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _every_rule_model() -> nn.Sequential:
    """Every supported Captum rule, each max pool between linear layers: conv-BN-ReLU, conv,
    max-pool, conv-ELU, conv-LeakyReLU, avg-pool, conv-Tanh, conv-Sigmoid, conv-Softplus, GAP,
    linear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ELU(),
        nn.Conv2d(8, 8, 1), nn.LeakyReLU(0.1), nn.AvgPool2d(2), nn.Conv2d(8, 8, 1), nn.Tanh(),
        nn.Conv2d(8, 8, 1), nn.Sigmoid(), nn.Conv2d(8, 8, 1), nn.Softplus(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _captum(model, images, baseline, target) -> tuple[torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its "hooks are set on non-linear modules" notices
        return CaptumDeepLift(model).attribute(
            images, baselines=baseline, target=target, return_convergence_delta=True
        )


@pytest.mark.parametrize("baseline", [0.0, "tensor"])
def test_parity_with_captum(baseline):
    model = _every_rule_model()
    images, classes = _images(), torch.tensor([[0, 3], [2, 2], [4, 1]])
    if baseline == "tensor":
        baseline = 0.5 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    attributions = create_method("deeplift", model, baseline=baseline).attributions(images, classes)
    for k in range(2):
        reference, delta = _captum(model, images, baseline, classes[:, k])
        assert reference.abs().max() > 1e-5 and delta.abs().max() < 1e-6
        torch.testing.assert_close(attributions[:, k], reference, rtol=1e-4, atol=1e-9)


def test_summation_to_delta_where_captum_fails_it():
    """A max pool right after (or before) another hooked nonlinearity: Captum's multipliers then
    miss its summation-to-delta by a lot (its own convergence delta; see also Captum #1276, the
    max-pool fallback reading row 0's gradient), while ours sum to ``S_c(x) − S_c(x')``."""
    model = CountingCNN().eval()  # conv-BN-ReLU → max-pool → conv-ReLU → mean → linear
    images, classes = _images(), torch.tensor([[0, 3], [2, 2], [4, 1]])
    baseline = 0.5 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    attributions = create_method("deeplift", model, baseline=baseline).attributions(images, classes)
    with torch.no_grad():
        differences = model(images) - model(baseline)
    rows = torch.arange(3)[:, None]
    torch.testing.assert_close(
        attributions.sum(dim=(2, 3, 4)), differences[rows, classes], rtol=1e-5, atol=1e-6
    )
    _, delta = _captum(model, images, baseline, classes[:, 0])
    assert delta.abs().max() > 1e-3  # Captum's own measure of its error


def test_summation_to_delta_on_a_torchvision_resnet():
    """torchvision ResNets reuse one ReLU per block (Captum refuses them) and pool with
    overlapping 3×3 windows (Captum's max_unpool drops shares of them)."""
    torch.manual_seed(0)
    model = resnet18(num_classes=7).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    classes = torch.tensor([[1, 6], [0, 3]])
    attributions = create_method("deeplift", model, baseline=0.1).attributions(images, classes)
    with torch.no_grad():
        differences = model(images) - model(torch.full_like(images, 0.1))
    expected = differences[torch.arange(2)[:, None], classes]
    torch.testing.assert_close(attributions.sum(dim=(2, 3, 4)), expected, rtol=1e-9, atol=1e-9)
    assert expected.abs().min() > 1e-6


def test_linear_model_closed_form():
    """No nonlinearity: DeepLIFT is gradient × (x − x'), here ``w ⊙ (x − x')``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64, 3))
    model = model.double().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    classes = torch.tensor([[2, 0], [1, 1]])
    gradient_input = images.clone().requires_grad_(True)
    weights = torch.stack(
        [
            torch.autograd.grad(model(gradient_input)[:, c].sum(), gradient_input)[0][0]
            for c in range(3)
        ]
    )  # the gradient does not depend on x: [3, C, H, W]
    maps = create_method("deeplift", model, baseline=-0.2, reduce="sum")(images, classes)
    expected = (weights[classes] * (images + 0.2)[:, None]).sum(dim=2)
    torch.testing.assert_close(maps, expected.float())


class FunctionalBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_unsupported_models_are_refused_naming_the_layer():
    with pytest.raises(ConfigurationError, match=r"submodule '0' \(FunctionalBlock\) computes its"):
        create_method("deeplift", nn.Sequential(FunctionalBlock(), nn.Flatten()))
    with pytest.raises(
        ConfigurationError, match=r"layer '1' \(AdaptiveMaxPool2d\) has no DeepLIFT"
    ):
        create_method("deeplift", nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveMaxPool2d(1)))
    with pytest.raises(ConfigurationError, match=r"layer '0' \(Softmax\) has no DeepLIFT rule"):
        create_method("deeplift", nn.Sequential(nn.Softmax(dim=1)))
    with pytest.raises(ConfigurationError, match=r"returns indices"):
        create_method("deeplift", nn.Sequential(nn.MaxPool2d(2, return_indices=True)))
    with pytest.raises(ConfigurationError, match=r"baseline must be a number or a tensor"):
        create_method("deeplift", _every_rule_model(), baseline="zeros")


def test_hooks_removed_and_model_state_restored():
    model = _every_rule_model()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    method = create_method("deeplift", model)
    method(_images(2), torch.tensor([0, 1]))
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert model[2].inplace  # ReLU(inplace=True) ran out of place during the call only
    for module in model.modules():
        assert all(not getattr(module, name) for name in HOOK_DICTS)
    assert all(p.grad is None for p in model.parameters())
