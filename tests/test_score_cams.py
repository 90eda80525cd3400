"""Score-CAM, Ablation-CAM and score-based Finer-CAM: parity with pytorch-grad-cam, closed forms,
invariants (classes, batch rows, batch_size, channel subsampling) and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import AblationCAM, ScoreCAM
from pytorch_grad_cam.ablation_layer import AblationLayerVit
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models import resnet18

import contrastive_saliency.methods.score_cams  # noqa: F401  (registers the methods)
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.methods.score_cams import normalised_masks, select_channels
from contrastive_saliency.targets import ExplicitReferences

METHODS = ["score_cam", "ablation_cam", "finer_score_cam"]


pytestmark = pytest.mark.usefixtures("one_thread")


class SmallCNN(nn.Module):
    """conv-ReLU-conv(stride 2)-BN-ReLU (layer ``features``, ``features.3`` = the BN output with
    negative values), then conv-ReLU, global average pool and a linear head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.post = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, num_classes)
        with torch.no_grad():  # f(0) = 0, logits that vary with x, non-trivial BN variances
            for module in self.modules():
                if isinstance(module, nn.Conv2d | nn.Linear):
                    module.bias.zero_()
            self.features[3].running_var.uniform_(0.5, 2.0)
            self.head.weight.normal_(0.0, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.post(self.features(x)).mean(dim=(2, 3)))


def _post_processing(low: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam after ``get_cam_image``: ReLU, min-max + cv2 resize, and the min-max of
    its multi-layer aggregation (as tests/test_cam_parity.py)."""
    return scale_cam_image(scale_cam_image(np.maximum(low, 0), size))


def _vit_reshape(tensor: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ViT reshape_transform: drop the class token, [B, D, h, w]."""
    side = int((tensor.shape[1] - 1) ** 0.5)
    return tensor[:, 1:].reshape(tensor.shape[0], side, side, -1).permute(0, 3, 1, 2)


def _setup(name: str):
    torch.manual_seed(0)
    if name == "small_cnn":
        model, layer, size = SmallCNN(), "features", 32
    elif name == "resnet18":
        model, layer, size = resnet18(num_classes=6), "layer1", 32
    else:
        model = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
        )  # timm's ViT, small: a 4x4 patch grid and 32 channels
        layer, size = "blocks.1.norm1", 32
    model.eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        classes = model(images).topk(2, dim=1).indices
    return model, layer, images, classes


def _assert_parity(ours: torch.Tensor, reference, images, classes) -> None:
    size = (images.shape[-1], images.shape[-2])
    for k in range(classes.shape[1]):
        targets = [ClassifierOutputTarget(int(c)) for c in classes[:, k]]
        expected = reference(input_tensor=images, targets=targets)
        got = _post_processing(ours[:, k].numpy(), size)
        assert got.max() > 0.5, "a degenerate all-zero comparison proves nothing"
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "vit"])
def test_score_cam_matches_pytorch_grad_cam(arch):
    model, layer, images, classes = _setup(arch)
    ours = create_method("score_cam", model, layer=layer, batch_size=24).compute(images, classes)
    reshape = _vit_reshape if arch == "vit" else None
    with ScoreCAM(model, [model.get_submodule(layer)], reshape_transform=reshape) as reference:
        _assert_parity(ours, reference, images, classes)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_ablation_cam_matches_pytorch_grad_cam_on_relu_layers(arch):
    model, layer, images, classes = _setup(arch)
    shared, full = (
        create_method("ablation_cam", model, layer=layer, batch_size=7, share_prefix=share).compute(
            images, classes
        )
        for share in (True, False)
    )
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-4)
    with AblationCAM(model, [model.get_submodule(layer)], batch_size=7) as reference:
        _assert_parity(shared, reference, images, classes)


@pytest.mark.parametrize("arch", ["small_cnn", "vit"])
def test_ablation_cam_matches_pytorch_grad_cam_where_the_minimum_is_not_zero(arch):
    """min(A) − 1e7 ablation (BN output, ViT LayerNorm tokens); theirs at batch_size=1, where
    its loop writes every copy with the same value as ours."""
    model, layer, images, classes = _setup(arch)
    layer = "features.3" if arch == "small_cnn" else layer
    module = model.get_submodule(layer)
    ours = create_method("ablation_cam", model, layer=layer).compute(images, classes)
    if arch == "vit":
        reference = AblationCAM(
            model,
            [module],
            reshape_transform=_vit_reshape,
            ablation_layer=AblationLayerVit(),
            batch_size=1,
        )
    else:
        reference = AblationCAM(model, [module], batch_size=1)
    with reference:
        _assert_parity(ours, reference, images, classes)


@pytest.mark.parametrize("name", METHODS)
def test_classes_rows_and_batch_size_are_independent(name):
    model, layer, _, _ = _setup("small_cnn")
    images = torch.randn(3, 3, 32, 32)
    classes = torch.tensor([[0, 4, 2], [1, 1, 3], [4, 0, 2]])
    method = create_method(name, model, layer=layer, batch_size=5)
    together = method(images, classes)
    assert together.shape == (3, 3, 32, 32)
    assert (together.amax(dim=(2, 3)) > 0).sum() >= 4, "a degenerate all-zero comparison"
    for k in range(3):
        torch.testing.assert_close(method(images, classes[:, k]), together[:, k : k + 1])
    for b in range(3):
        single = method(images[b : b + 1], classes[b : b + 1])
        torch.testing.assert_close(single[0], together[b], atol=1e-5, rtol=1e-4)
    for batch_size in (1, 16, 1000):
        other = create_method(name, model, layer=layer, batch_size=batch_size)
        torch.testing.assert_close(other(images, classes), together, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["ablation_cam", "finer_score_cam"])
def test_vit_tokens_share_prefix_and_finer(name):
    model, layer, images, classes = _setup("vit")
    if name == "ablation_cam":  # the residual stream broadcasts over the ablated copies
        shared = create_method(name, model, ablation_value=0.0)(images, classes)
        full = create_method(name, model, ablation_value=0.0, share_prefix=False)(images, classes)
        torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-4)
    method = create_method(name, model)
    assert method.layer == layer  # layer=None: the last block's norm1, a token layer
    maps = method(images, classes)
    assert maps.shape == (2, 2, 32, 32)
    assert torch.isfinite(maps).all() and maps.amax(dim=(2, 3)).min() > 0


class ConstantChannels(nn.Module):
    """Layer ``features``: 1x1 conv whose channel 0 is the constant 2 and channel 1 the constant
    0; the others vary. Then ReLU, GAP and a linear head."""

    def __init__(self, channels: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, channels, 1)
        with torch.no_grad():
            self.features.weight[:2] = 0
            self.features.bias[:2] = torch.tensor([2.0, 0.0])
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).relu().mean(dim=(2, 3)))


def test_constant_channels_give_zero_masks_and_no_nan():
    constant = torch.full((2, 4, 4), 3.5)
    assert torch.equal(normalised_masks(constant, (8, 8)), torch.zeros(2, 1, 8, 8))
    torch.manual_seed(0)
    model = ConstantChannels().eval()
    images, classes = torch.randn(2, 3, 8, 8), torch.tensor([[0, 1], [2, 0]])
    for name in METHODS:
        for kwargs in ({}, {"channel_softmax": False}) if name == "score_cam" else ({},):
            maps = create_method(name, model, layer="features", **kwargs)(images, classes)
            assert torch.isfinite(maps).all(), (name, kwargs)
            assert maps.amax() > 0


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("selection", ["variance", "random"])
def test_subsampling_all_channels_equals_no_subsampling(name, selection):
    model, layer, images, classes = _setup("small_cnn")
    full = create_method(name, model, layer=layer)(images, classes)
    for max_channels in (16, 40):  # the layer has 16 channels
        sub = create_method(
            name, model, layer=layer, max_channels=max_channels, channel_selection=selection
        )
        torch.testing.assert_close(sub(images, classes), full)
    fewer = create_method(name, model, layer=layer, max_channels=4, channel_selection=selection)
    assert not torch.allclose(fewer(images, classes), full)


def test_select_channels_keeps_the_largest_variance_or_one_seeded_subset():
    torch.manual_seed(0)
    activations = torch.randn(3, 10, 5, 5) * torch.rand(3, 10, 1, 1)
    kept = select_channels(activations, 4, "variance")
    variance = activations.flatten(2).numpy().var(axis=2)
    for b in range(3):
        assert kept[b].tolist() == sorted(np.argsort(-variance[b])[:4].tolist())
    random = select_channels(activations, 4, "random", seed=3)
    assert (random == random[0]).all() and random.shape == (3, 4)
    assert torch.equal(random, select_channels(activations, 4, "random", seed=3))
    assert not torch.equal(random, select_channels(activations, 4, "random", seed=4))
    assert (random[0, 1:] > random[0, :-1]).all()


class LinearProbe(nn.Module):
    """Layer ``features``: a 1x1 conv without bias, ``A = P x`` per pixel; then the spatial mean
    and a linear head, so ``f(z) = W P mean_ij(z) + b`` in closed form."""

    def __init__(self, channels: int = 6, num_classes: int = 7) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, channels, 1, bias=False)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _closed_form_scores(model, images) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`LinearProbe`'s activations ``A`` [B, C, h, w] and masked-image logits
    ``f(x∘H_k)`` [B, C, N], in float64."""
    weight = model.features.weight[:, :, 0, 0].double()  # P [C, 3]
    W, b = model.head.weight.double(), model.head.bias.double()
    A = torch.einsum("cd,bdhw->bchw", weight, images.double())
    flat = A.flatten(2)
    low, high = flat.min(2).values[..., None, None], flat.max(2).values[..., None, None]
    H = (A - low) / (high - low + 1e-8)  # same size as the image: no upsampling
    masked_mean = torch.einsum("bdhw,bkhw->bkd", images.double(), H) / H[0, 0].numel()
    return A, torch.einsum("nc,cd,bkd->bkn", W, weight, masked_mean) + b


def _closed_form_finer(model, images, classes, references, gamma) -> torch.Tensor:
    """Eq. 9 averaged over the references (Eq. 8) on :class:`LinearProbe`, pre-upsampling."""
    A, scores = _closed_form_scores(model, images)
    channels = A.shape[1]
    target = scores.gather(2, classes[:, None, :].expand(-1, channels, -1))  # [B, C, K]
    idx = references.flatten(1)[:, None, :].expand(-1, channels, -1)
    ref = scores.gather(2, idx).unflatten(2, references.shape[1:]).mean(-1)  # [B, C, K]
    baseline = model.head.bias.double()[classes][:, None, :]  # f(x_b) = f(0) = b
    alpha = target - gamma * ref - baseline
    return torch.einsum("bck,bchw->bkhw", alpha, A).relu().float()


def test_score_cam_probability_scores_closed_form():
    """``score="probability"``: softmax over classes; raw weights p(x∘H_k)_c − p(0)_c, or their
    softmax over channels (the baseline cancels)."""
    torch.manual_seed(2)
    model = LinearProbe().eval()
    images, classes = torch.randn(2, 3, 8, 8), torch.tensor([[1, 6], [0, 2]])
    with torch.no_grad():
        A, scores = _closed_form_scores(model, images)
        probabilities = scores.softmax(dim=2)
        base = model.head.bias.double().softmax(dim=0)[classes]  # [B, K]
        target = probabilities.gather(2, classes[:, None, :].expand(-1, A.shape[1], -1))
        for softmax in (False, True):
            weights = target.softmax(dim=1) if softmax else target - base[:, None, :]
            expected = torch.einsum("bck,bchw->bkhw", weights, A).relu().float()
            assert expected.amax() > 0
            method = create_method(
                "score_cam",
                model,
                layer="features",
                score="probability",
                channel_softmax=softmax,
            )
            torch.testing.assert_close(
                method.compute(images, classes), expected, atol=1e-6, rtol=1e-4
            )


def test_finer_score_cam_closed_form_gamma_zero_and_references():
    torch.manual_seed(0)
    model = LinearProbe().eval()
    images = torch.randn(2, 3, 8, 8)
    classes = torch.tensor([[0, 5], [3, 1]])
    first = torch.tensor([[[1, 2], [0, 6]], [[4, 6], [2, 5]]])  # [B, K, T]
    second = torch.tensor([[[3, 4], [2, 3]], [[0, 5], [6, 4]]])

    def finer(references, gamma):
        method = create_method(
            "finer_score_cam",
            model,
            layer="features",
            references=ExplicitReferences(references),
            gamma=gamma,
        )
        return method.compute(images, classes)

    with torch.no_grad():
        for refs in (first, second):
            expected = _closed_form_finer(model, images, classes, refs, 0.6)
            assert expected.amax() > 0
            torch.testing.assert_close(finer(refs, 0.6), expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(finer(first, 0.6), finer(second, 0.6), atol=1e-3)
        # γ = 0: the reference no longer matters; Score-CAM's raw weights f(x∘H_k)^c − f(x_b)^c.
        zero = finer(first, 0.0)
        torch.testing.assert_close(zero, finer(second, 0.0))
        torch.testing.assert_close(
            zero, _closed_form_finer(model, images, classes, first, 0.0), atol=1e-5, rtol=1e-4
        )
        raw = create_method("score_cam", model, layer="features", channel_softmax=False)
        torch.testing.assert_close(zero, raw.compute(images, classes), atol=1e-6, rtol=1e-5)
        # Default references: the 3 classes ranked just below the target (LogitNeighbours(3);
        # the ones just above it where fewer than 3 rank below).
        logits = model(images)
        order = logits.argsort(dim=1, descending=True, stable=True).tolist()

        def below_then_above(ranked: list[int], target: int) -> list[int]:
            rank = ranked.index(target)
            return (ranked[rank + 1 :] + ranked[:rank][::-1])[:3]

        below = torch.tensor(
            [[below_then_above(order[b], c) for c in row] for b, row in enumerate(classes.tolist())]
        )
        default = create_method("finer_score_cam", model, layer="features").compute(images, classes)
        expected = _closed_form_finer(model, images, classes, below, 0.6)
        torch.testing.assert_close(default, expected, atol=1e-5, rtol=1e-4)


class ConcatNet(nn.Module):
    """DenseNet-style: the layer's output is concatenated with the tensor before it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.layer = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem(x)
        return self.head(torch.cat([stem, self.layer(stem)], dim=1).mean(dim=(2, 3)))


class BatchCoupledNet(ConcatNet):
    """Samples of a batch interact after the layer (centred over the batch): un-ablated copies
    of one image then score differently than in the plain forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.layer(self.stem(x))
        hidden = hidden - 0.5 * hidden.mean(dim=0, keepdim=True)
        return self.head(torch.cat([hidden, hidden], dim=1).mean(dim=(2, 3)))


def test_ablation_share_prefix_refuses_networks_it_cannot_serve():
    torch.manual_seed(0)
    images, classes = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    model = ConcatNet().train()
    with pytest.raises(ConfigurationError, match="share_prefix=False"):
        create_method("ablation_cam", model, layer="layer")(images, classes)
    assert not model.layer._forward_hooks and model.training  # restored after the error
    model.eval()
    full = create_method("ablation_cam", model, layer="layer", share_prefix=False)
    ours = full.compute(images, classes[:, None])
    with AblationCAM(model, [model.layer], batch_size=3) as reference:
        _assert_parity(ours, reference, images, classes[:, None])
    with pytest.raises(ConfigurationError, match="un-ablated copies scored"):
        create_method("ablation_cam", BatchCoupledNet().eval(), layer="layer")(images, classes)


def test_state_is_restored_and_arguments_are_checked():
    model, layer, images, classes = _setup("small_cnn")
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    for name in METHODS:
        create_method(name, model, layer=layer)(images, classes)
        assert model.training and [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())
        assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ConfigurationError, match="batch_size"):
        create_method("score_cam", model, layer=layer, batch_size=0)
    with pytest.raises(ConfigurationError, match="max_channels"):
        create_method("ablation_cam", model, layer=layer, max_channels=0)
    with pytest.raises(ConfigurationError, match="channel_selection"):
        create_method("score_cam", model, layer=layer, channel_selection="top")
    with pytest.raises(ConfigurationError, match="score must be"):
        create_method("finer_score_cam", model, layer=layer, score="softmax")
    with pytest.raises(ConfigurationError, match="not a submodule"):
        create_method("ablation_cam", model, layer="features.9")
    with pytest.raises(ConfigurationError, match="class indices"):
        create_method("score_cam", model, layer=layer)(images, torch.tensor([0, 5]))
