"""LRP via zennit: parity with zennit's Gradient attributor, conservation, hygiene, VAR."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import contrastive_saliency.methods.lrp  # noqa: F401  (registers "lrp")
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.methods.var import var_refine
from contrastive_saliency.targets import ClassSet

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_batch_norms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that folding the batch norms changes the weights."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomise_batch_norms(torchvision.models.resnet18(num_classes=10))


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def small_images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def hook_count(model: nn.Module) -> int:
    return sum(len(getattr(module, name)) for module in model.modules() for name in HOOK_DICTS)


def zennit_relevance(model, composite, images, classes) -> torch.Tensor:
    """zennit's own usage: the Gradient attributor with output relevance one-hot × logit."""
    with Gradient(model, composite) as attributor:
        one_hot = torch.eye(model(images).shape[1])[classes]
        _, relevance = attributor(images, lambda out: out * one_hot)
    return relevance.sum(dim=1)


def assert_close_to(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    scale = expected.abs().max()
    assert scale > 0
    assert (got - expected).abs().max() <= tol * scale


def test_resnet18_parity_with_zennit_gradient(resnet, images):
    classes = torch.tensor([3, 7])
    maps = create_method("lrp", resnet)(images, classes)
    assert maps.shape == (2, 1, 64, 64) and maps.isfinite().all()
    expected = zennit_relevance(
        resnet, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]), images, classes
    )
    assert_close_to(maps[:, 0], expected)


def test_vgg11_epsilon_gamma_box_parity(small_images):
    """vgg11's features with a slimmer classifier, built on the meta device and initialised
    after the swap: the 25088×4096 head would dominate the test's time (its initialisation,
    and zennit copies every weight at each backward pass) for no extra coverage."""
    with torch.device("meta"):
        vgg = torchvision.models.vgg11(num_classes=6)
        vgg.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 6)
        )
    vgg.to_empty(device="cpu")
    torch.manual_seed(2)
    for module in vgg.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    vgg.eval()
    classes = torch.tensor([4, 1])
    kwargs = {"low": -3.0, "high": 3.0, "gamma": 0.25}
    maps = create_method("lrp", vgg, composite="epsilon_gamma_box", composite_kwargs=kwargs)(
        small_images, classes
    )
    assert maps.shape == (2, 1, 32, 32) and maps.isfinite().all()
    composite = EpsilonGammaBox(canonizers=[VGGCanonizer()], **kwargs)
    assert_close_to(maps[:, 0], zennit_relevance(vgg, composite, small_images, classes))


def test_k_classes_equal_single_calls_and_batch_rows(resnet, small_images):
    lrp = create_method("lrp", resnet)
    classes = torch.tensor([[3, 7], [1, 1]])
    together = lrp(small_images, classes)
    for k in range(2):
        assert_close_to(together[:, k], lrp(small_images, classes[:, k])[:, 0], tol=1e-6)
    # another batch size may pick another convolution algorithm: float32 rounding only
    assert_close_to(together[1:], lrp(small_images[1:], classes[1:]), tol=1e-5)


def relu_net() -> nn.Sequential:
    """Bias-free ReLU network: every rule of the composites conserves relevance exactly (up to
    the ε/stabiliser), since a unit with relevance is active and so has a positive z⁺."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5, bias=False),
    ).eval()


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_plus"])
def test_conservation_on_bias_free_relu_net(composite):
    net = relu_net()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    classes = torch.tensor([[0, 3], [1, 4], [2, 0], [4, 2]])
    logits = net(images).detach().gather(1, classes)
    assert logits.abs().min() > 1e-3  # a meaningful comparison
    maps = create_method("lrp", net, composite=composite)(images, classes)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), logits, rtol=1e-4, atol=1e-6)
    ones = create_method("lrp", net, composite=composite, output_relevance="one")(images, classes)
    torch.testing.assert_close(ones.sum(dim=(2, 3)), torch.ones_like(logits), rtol=1e-4, atol=0)


class BatchNormCNN(nn.Module):
    """SmallCNN's structure: bias-free conv-BN-ReLU blocks in nested nn.Sequential stages, a
    max-pool, then GAP and a linear head called from the root's own forward()."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            nn.Sequential(block(3, 8)), nn.Sequential(nn.MaxPool2d(2), block(8, 12))
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def test_hooks_canonizers_and_flags_restored_also_on_error():
    torch.manual_seed(5)
    model = randomise_batch_norms(BatchNormCNN())
    conv = model.features[0][0][0]
    model.train()
    conv.weight.requires_grad_(False)  # a mixed set of flags to restore
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 16, 16)
    lrp = create_method("lrp", model)

    maps = lrp(images, torch.tensor([1, 2]))
    assert maps.abs().sum() > 0
    assert hook_count(model) == 0
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert conv.bias is None  # the bias the canonizer added is gone
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    with pytest.raises(ConfigurationError, match=r"class indices must lie in \[0, 3\]"):
        lrp(images, torch.tensor([1, 4]))  # fails after the composite was registered
    assert hook_count(model) == 0
    assert model.training and conv.bias is None
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    # eval-mode maps (batch norms folded with their running statistics), zennit parity
    expected = zennit_relevance(
        model.eval(), EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]), images, [1, 2]
    )
    assert_close_to(maps[:, 0], expected)


def test_works_under_no_grad_and_inference_mode(resnet, small_images):
    lrp = create_method("lrp", resnet)
    classes = torch.tensor([2, 5])
    reference = lrp(small_images, classes)
    with torch.no_grad():
        assert torch.equal(lrp(small_images, classes), reference)
    with torch.inference_mode():
        inference_images = small_images.clone()
        assert torch.equal(lrp(inference_images, classes), reference)


def test_unsupported_models_are_refused():
    with pytest.raises(ConfigurationError, match=r"VisionTransformer.*torchvision ResNets"):
        create_method(
            "lrp", timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
        )
    with pytest.raises(ConfigurationError, match=r"timm ResNets"):
        create_method("lrp", timm.create_model("resnet18", pretrained=False, num_classes=3))
    with pytest.raises(ConfigurationError, match=r"'1' \(GELU\) has no LRP rule"):
        create_method("lrp", nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)))
    with pytest.raises(ConfigurationError, match=r"not an LRP composite"):
        create_method("lrp", relu_net(), composite="guided_backprop")
    with pytest.raises(ConfigurationError, match=r"needs composite_kwargs with 'low' and 'high'"):
        create_method("lrp", relu_net(), composite="epsilon_gamma_box")
    with pytest.raises(ConfigurationError, match=r"does not take composite_kwargs \['gama'\]"):
        create_method("lrp", relu_net(), composite="epsilon_plus", composite_kwargs={"gama": 1})


def test_var_wraps_lrp():
    net = relu_net()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    classes = torch.tensor([[0, 3], [4, 1]])
    var = create_method("var", net, base="lrp", class_set=ClassSet(k=2))
    maps = var(images, classes)
    assert maps.shape == (2, 2, 16, 16) and maps.isfinite().all()
    assert maps.abs().sum() > 0
    sets = var.class_sets(images, classes)  # [B, K, K′]
    base = create_method("lrp", net)(images, sets.flatten(1)).unflatten(1, sets.shape[1:])
    torch.testing.assert_close(maps, var_refine(base), rtol=1e-5, atol=1e-7)
