"""Input-gradient family: parity with Captum, batch invariance, closed forms, hygiene."""

from __future__ import annotations

import pytest
import torch
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from captum.attr import GuidedGradCam as CaptumGuidedGradCam
from captum.attr import InputXGradient as CaptumInputXGradient
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
from captum.attr import NoiseTunnel
from captum.attr import Saliency as CaptumSaliency
from torch import nn
from torchvision.models import resnet18

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.input_gradients import input_class_gradients
from contrastive_saliency.methods import create_method
from contrastive_saliency.methods.gradient_attributions import quadrature, reduce_channels

METHODS = [
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "guided_backprop",
    "guided_grad_cam",
]
FAST = {  # small settings that still chunk (batch_size below steps × B)
    "integrated_gradients": {"steps": 6, "batch_size": 4},
    "smoothgrad": {"n_samples": 5, "noise_level": 0.1, "batch_size": 4},
}
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


pytestmark = pytest.mark.usefixtures("one_thread")


class ReLUNet(nn.Module):
    """conv-BN-ReLU(inplace) → conv-ReLU → conv-ReLU(inplace) = 'features' → mean → linear."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(12, num_classes)
        with torch.no_grad():  # eval-mode BN then differs from train mode
            self.features[1].running_mean.uniform_(-0.3, 0.3)
            self.features[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = ReLUNet().eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        classes = model(images).topk(2, dim=1).indices  # [3, 2]
    return model, images, classes


def assert_maps_close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """Max abs difference ≤ tol × the expected map's max abs value (never a 0-vs-0 check)."""
    assert got.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0, "a degenerate all-zero comparison proves nothing"
    error = (got - expected).abs().max()
    assert error <= tol * scale, f"max error {error:.3g} > {tol} × {scale:.3g}"


def per_class(attribute, images: torch.Tensor, classes: torch.Tensor, **kwargs) -> torch.Tensor:
    """A Captum attribution run once per class column, stacked to ``[B, K, C, H, W]``."""
    columns = [attribute(images, target=classes[:, k], **kwargs) for k in range(classes.shape[1])]
    return torch.stack([column.detach() for column in columns], dim=1)


# ----------------------------------------------------------------------------- Captum parity


def _captum_tiny(name: str, model: nn.Module, images, classes, baseline):
    if name == "saliency":
        return per_class(CaptumSaliency(model).attribute, images, classes, abs=False)
    if name == "input_x_gradient":
        return per_class(CaptumInputXGradient(model).attribute, images, classes)
    if name == "ig_gausslegendre":
        ig = CaptumIntegratedGradients(model).attribute
        return per_class(ig, images, classes, baselines=baseline, n_steps=16)
    if name == "ig_trapezoid":  # Captum's weights sum to (n-1)/n, ours to 1 (documented)
        ig = CaptumIntegratedGradients(model).attribute
        raw = per_class(
            ig, images, classes, baselines=baseline, n_steps=16, method="riemann_trapezoid"
        )
        return raw * 16 / 15
    if name == "guided_backprop":
        return per_class(CaptumGuidedBackprop(model).attribute, images, classes)
    assert name == "guided_grad_cam"
    reference = CaptumGuidedGradCam(model, model.features).attribute
    return per_class(reference, images, classes, interpolate_mode="bilinear")


PARITY = {  # case → (our method, kwargs, reduction Captum's raw output gets)
    "saliency": ("saliency", {}, "max_abs"),
    "input_x_gradient": ("input_x_gradient", {}, "sum"),
    "ig_gausslegendre": ("integrated_gradients", {"steps": 16, "batch_size": 7}, "sum"),
    "ig_trapezoid": (
        "integrated_gradients",
        {"steps": 16, "method": "riemann_trapezoid", "batch_size": 100},
        "sum",
    ),
    "guided_backprop": ("guided_backprop", {}, "sum"),
    "guided_grad_cam": ("guided_grad_cam", {"layer": "features"}, "sum"),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_matches_captum_per_class_on_a_small_relu_cnn(tiny, case):
    model, images, classes = tiny
    name, kwargs, reduce = PARITY[case]
    baseline = 0.2 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    if name == "integrated_gradients":
        kwargs = {**kwargs, "baseline": baseline}
    ours = create_method(name, model, **kwargs)(images, classes)  # one call, K = 2
    expected = reduce_channels(_captum_tiny(case, model, images, classes, baseline), reduce)
    assert_maps_close(ours, expected)


def test_smoothgrad_draws_captum_noise_tunnels_noise_exactly(tiny):
    """Same seed → the same ε (one draw of [n, C, H, W]); Captum is run per image and class."""
    model, images, classes = tiny
    ours = create_method(
        "smoothgrad", model, n_samples=6, sigma=0.3, seed=11, batch_size=4, reduce="sum"
    )(images, classes)
    tunnel = NoiseTunnel(CaptumSaliency(model))
    expected = torch.zeros_like(ours)
    with torch.random.fork_rng():
        for b in range(images.shape[0]):
            for k in range(classes.shape[1]):
                torch.manual_seed(11)
                raw = tunnel.attribute(
                    images[b : b + 1],
                    nt_type="smoothgrad",
                    nt_samples=6,
                    stdevs=0.3,
                    target=int(classes[b, k]),
                    abs=False,
                )
                expected[b, k] = raw[0].sum(dim=0)
    assert_maps_close(ours, expected)
    plain = create_method("saliency", model, reduce="sum")(images, classes)
    assert (ours - plain).abs().max() > 1e-3 * plain.abs().max(), "the noise had no effect"


def test_smoothgrad_with_zero_noise_is_saliency_and_noise_level_is_relative(tiny):
    model, images, classes = tiny
    plain = create_method("saliency", model)(images, classes)
    zero_noise = create_method("smoothgrad", model, n_samples=3, sigma=0.0)(images, classes)
    assert_maps_close(zero_noise, plain, tol=1e-6)
    relative = create_method("smoothgrad", model, n_samples=4, noise_level=0.2, seed=3)
    batched = relative(images, classes)
    for b in range(images.shape[0]):
        value_range = float(images[b].max() - images[b].min())
        absolute = create_method("smoothgrad", model, n_samples=4, sigma=0.2 * value_range, seed=3)
        assert_maps_close(batched[b : b + 1], absolute(images[b : b + 1], classes[b : b + 1]))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        classes = model(images).topk(2, dim=1).indices
    return model, images, classes


@pytest.mark.parametrize("name", ["guided_grad_cam", "integrated_gradients", "guided_backprop"])
def test_matches_captum_on_random_resnet18(resnet, name):
    model, images, classes = resnet
    if name == "guided_grad_cam":
        ours = create_method(name, model)(images, classes)  # layer=None → "layer4"
        reference = CaptumGuidedGradCam(model, model.layer4).attribute
        raw = per_class(reference, images, classes, interpolate_mode="bilinear")
    elif name == "integrated_gradients":
        ours = create_method(name, model, steps=8, batch_size=6)(images, classes)
        raw = per_class(CaptumIntegratedGradients(model).attribute, images, classes, n_steps=8)
    else:
        ours = create_method(name, model)(images, classes)
        raw = per_class(CaptumGuidedBackprop(model).attribute, images, classes)
    assert_maps_close(ours, reduce_channels(raw, "sum"))


# ------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("name", METHODS)
def test_batched_call_equals_single_image_and_single_class_calls(tiny, name):
    model, images, classes = tiny
    method = create_method(name, model, **FAST.get(name, {}))
    batched = method(images, classes)
    assert batched.shape == (3, 2, 16, 16)
    for b in range(images.shape[0]):
        assert_maps_close(method(images[b : b + 1], classes[b : b + 1]), batched[b : b + 1], 1e-5)
    for k in range(classes.shape[1]):
        assert_maps_close(method(images, classes[:, k]), batched[:, k : k + 1], 1e-5)


def test_one_forward_for_all_classes_and_bounded_batches(tiny):
    model, images, classes = tiny
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        all_classes = torch.arange(5).expand(3, 5)
        create_method("saliency", model)(images, all_classes)
        assert sizes == [3], "K classes must cost one forward pass, not K"
        sizes.clear()
        create_method("integrated_gradients", model, steps=10, batch_size=7)(images, classes)
        assert sum(sizes) == 30 and max(sizes) <= 7
        sizes.clear()
        create_method("smoothgrad", model, n_samples=4, batch_size=2)(images, classes)
        assert sum(sizes) == 12 and max(sizes) <= 2
    finally:
        handle.remove()


# ------------------------------------------------------------------------------ closed forms


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    images = torch.randn(2, 3, 6, 6)
    classes = torch.tensor([[0, 2], [3, 1]])
    rows = model[1].weight[classes].detach().view(2, 2, 3, 6, 6)  # W[c_bk] as images
    return model, images, classes, rows


def test_linear_model_gradients_are_the_weight_rows(linear):
    model, images, classes, rows = linear
    logits, gradients = input_class_gradients(model, images, classes)
    torch.testing.assert_close(gradients, rows, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, model(images).detach())
    maps = create_method("saliency", model)(images, classes)
    torch.testing.assert_close(maps, rows.abs().amax(dim=2), rtol=0, atol=1e-6)
    maps = create_method("input_x_gradient", model)(images, classes)
    torch.testing.assert_close(maps, (images.unsqueeze(1) * rows).sum(dim=2), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "method", ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right"]
)
def test_integrated_gradients_on_a_linear_model_is_input_times_weight(linear, method):
    model, images, classes, rows = linear
    ig = create_method("integrated_gradients", model, steps=5, method=method)
    raw = ig.attributions(images, classes)
    torch.testing.assert_close(raw, images.unsqueeze(1) * rows, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # completeness: Σ IG = S_c(x) − S_c(0)
        difference = (model(images) - model(torch.zeros_like(images))).gather(1, classes)
    torch.testing.assert_close(ig(images, classes).sum(dim=(2, 3)), difference, atol=1e-4, rtol=0)


def test_quadrature_weights_sum_to_one_and_match_the_rules():
    for method in ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right"):
        alphas, weights = quadrature(7, method)
        assert alphas.shape == weights.shape == (7,)
        assert abs(float(weights.sum()) - 1) < 1e-12 and 0 <= alphas.min() <= alphas.max() <= 1
    alphas, weights = quadrature(5, "riemann_trapezoid")
    torch.testing.assert_close(alphas, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([1, 2, 2, 2, 1], dtype=torch.float64) / 8)
    alphas, weights = quadrature(3, "gausslegendre")  # ∫ α^5 = 1/6 exactly with 3 nodes
    assert abs(float((weights * alphas**5).sum()) - 1 / 6) < 1e-12


def test_guided_backprop_closed_form_on_a_two_layer_net():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    images = torch.randn(2, 3, 2, 2)
    classes = torch.tensor([[0, 2], [1, 0]])
    first, second = model[1], model[3]
    with torch.no_grad():
        active = (first(images.flatten(1)) > 0).float()  # [B, 6]
        guide = second.weight[classes].clamp(min=0) * active.unsqueeze(1)  # [B, K, 6]
        expected = (guide @ first.weight).view(2, 2, 3, 2, 2)
    raw = create_method("guided_backprop", model).attributions(images, classes)
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6)


def test_reductions():
    attributions = torch.tensor([1.0, -3.0, 2.0]).view(1, 1, 3, 1, 1)
    assert reduce_channels(attributions, "sum").item() == 0.0
    assert reduce_channels(attributions, "abs_sum").item() == 6.0
    assert reduce_channels(attributions, "max_abs").item() == 3.0


# ----------------------------------------------------------------------------------- hygiene


def _state(model: nn.Module):
    return (
        model.training,
        [p.requires_grad for p in model.parameters()],
        [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)],
    )


def _assert_clean(model: nn.Module, state) -> None:
    assert _state(model) == state
    assert all(p.grad is None for p in model.parameters()), "no parameter gradients"
    for name, module in model.named_modules():
        for hooks in HOOK_DICTS:
            assert not getattr(module, hooks), f"{hooks} left on {name or 'model'}"


@pytest.mark.parametrize("name", METHODS)
def test_mode_flags_and_hooks_restored_also_on_error(name):
    torch.manual_seed(0)
    model = ReLUNet().train()
    model.head.bias.requires_grad_(False)
    state = _state(model)
    assert state[0] and state[2] == [True, False, True]
    method = create_method(name, model, **FAST.get(name, {}))
    images = torch.randn(2, 3, 16, 16)
    maps = method(images, torch.tensor([[0, 1], [4, 2]]))
    assert maps.shape == (2, 2, 16, 16) and torch.isfinite(maps).all()
    _assert_clean(model, state)
    with pytest.raises(ConfigurationError, match="class indices"):
        method(images, torch.tensor([0, 9]))
    _assert_clean(model, state)


@pytest.mark.parametrize("name", METHODS)
def test_works_under_inference_mode_and_no_grad(tiny, name):
    model, images, classes = tiny
    method = create_method(name, model, **FAST.get(name, {}))
    expected = method(images, classes)
    with torch.inference_mode():
        inference_images = images.clone()
        maps = method(inference_images, classes)
    torch.testing.assert_close(maps, expected)
    with torch.no_grad():
        torch.testing.assert_close(method(images, classes), expected)


@pytest.mark.parametrize("name", METHODS)
def test_zero_images_and_dead_activations_give_finite_zero_maps(name):
    model = ReLUNet().eval()
    with torch.no_grad():  # no biases, BN centred: every activation of a zero image is 0
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.BatchNorm2d):
                module.bias.zero_()
        model.features[1].running_mean.zero_()
    method = create_method(name, model, **FAST.get(name, {}))
    maps = method(torch.zeros(2, 3, 16, 16), torch.tensor([[0, 1], [2, 3]]))
    assert torch.isfinite(maps).all()
    assert maps.abs().max() == 0


def test_configuration_errors_name_the_bad_value(tiny):
    model, images, classes = tiny
    linear_model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ConfigurationError, match=r"needs nn\.ReLU modules"):
        create_method("guided_backprop", linear_model)
    with pytest.raises(ConfigurationError, match="'median'"):
        create_method("saliency", model, reduce="median")
    with pytest.raises(ConfigurationError, match="'simpson'"):
        create_method("integrated_gradients", model, method="simpson")
    with pytest.raises(ConfigurationError, match="steps >= 2"):
        create_method("integrated_gradients", model, steps=1, method="riemann_trapezoid")
    with pytest.raises(ConfigurationError, match="n_samples"):
        create_method("smoothgrad", model, n_samples=0)
    with pytest.raises(ConfigurationError, match="sigma"):
        create_method("smoothgrad", model, sigma=-1.0)
    with pytest.raises(ConfigurationError, match="batch_size"):
        create_method("integrated_gradients", model, batch_size=0)
    ig = create_method("integrated_gradients", model, baseline=torch.zeros(5, 5), steps=2)
    with pytest.raises(ConfigurationError, match="broadcast"):
        ig(images, classes)
