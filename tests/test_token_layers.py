"""ViT token layers and channels-last layers for the gradient-CAM family; default layers.

Random-init tiny models only: a 2-block timm ViT on 32x32 images (with and without register
tokens), a 2-stage torchvision ConvNeXt, and architectures built on the meta device (no
weights, no forward) for the default-layer table.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.feature_layout import detect_layout
from contrastive_saliency.gradients import class_gradients
from contrastive_saliency.layers import default_layer
from contrastive_saliency.methods import create_method
from contrastive_saliency.methods.gradient_cams import first_component_projection
from contrastive_saliency.targets import ConfusionContrast

NUM_CLASSES = 5
REFERENCES = {"grad_cam": GradCAM, "grad_cam_pp": GradCAMPlusPlus, "layer_cam": LayerCAM}


def tiny_vit(reg_tokens: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        num_classes=NUM_CLASSES, reg_tokens=reg_tokens, **kwargs,
    )  # fmt: skip
    return model.eval()


def tiny_convnext() -> ConvNeXt:
    """stem (/4) → stage 8 ch → downsample (/2) → stage 16 ch: ``features.3.0.block`` is
    Conv2d, Permute, LayerNorm (channels-last), Linear, GELU, Linear, Permute."""
    torch.manual_seed(0)
    settings = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]
    return ConvNeXt(settings, num_classes=NUM_CLASSES).eval()


def grid_of(tokens: torch.Tensor, prefix: int, side: int) -> torch.Tensor:
    """The hand-written ViT reshape (as pytorch-grad-cam's tutorials): ``[B, T, D]`` →
    ``[B, D, side, side]`` without the ``prefix`` leading tokens."""
    patches = tokens[:, prefix:, :]
    return patches.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def post_process(low: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam after ``get_cam_image``: ReLU, min-max + resize, min-max again."""
    return scale_cam_image(scale_cam_image(np.maximum(low, 0), size))


@pytest.fixture(scope="module", params=[0, 2], ids=["cls", "cls+2reg"])
def vit_setup(request):
    model = tiny_vit(reg_tokens=request.param)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        classes = model(images).topk(2, dim=1).indices  # [2, 2]
    return model, images, classes


# --------------------------------------------------------------------------- ViT tokens


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_vit_token_layer_matches_pytorch_grad_cam_with_a_reshape(vit_setup, name):
    model, images, classes = vit_setup
    layer = "blocks.1.norm1"  # Finer-CAM's blocks[-1].norm1
    prefix = model.num_prefix_tokens
    assert prefix == 1 + model.num_reg_tokens
    ours = create_method(name, model, layer=layer).compute(images, classes)  # one call, K = 2
    assert ours.shape == (2, 2, 4, 4)
    size = (images.shape[-1], images.shape[-2])
    with REFERENCES[name](
        model=model,
        target_layers=[model.get_submodule(layer)],
        reshape_transform=lambda tokens: grid_of(tokens, prefix, 4),
    ) as reference:
        for k in range(classes.shape[1]):
            targets = [ClassifierOutputTarget(int(c)) for c in classes[:, k]]
            expected = reference(input_tensor=images, targets=targets)
            got = post_process(ours[:, k].numpy(), size)
            assert got.max() > 0.5, "a degenerate all-zero comparison proves nothing"
            np.testing.assert_allclose(got, expected, atol=1e-4)
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam leaves parameter gradients behind


def test_prefix_tokens_are_dropped_from_activations_and_gradients(vit_setup):
    model, images, classes = vit_setup
    prefix = model.num_prefix_tokens
    captured = class_gradients(model, images, "blocks.1.norm1", classes)
    with torch.no_grad():
        hidden = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(images))))
    block = model.blocks[1]
    leaf = block.norm1(hidden).detach().requires_grad_(True)  # [B, prefix + 16, 32]
    assert captured.activations.shape == (2, 32, 4, 4)
    assert captured.gradients.shape == (2, 2, 32, 4, 4)
    torch.testing.assert_close(captured.activations, grid_of(leaf.detach(), prefix, 4))
    # Gradients by plain autograd on the token tensor (timm's Block with norm1 cut open).
    after = hidden + block.ls1(block.attn(leaf))
    after = after + block.ls2(block.mlp(block.norm2(after)))
    logits = model.forward_head(model.norm(after))
    for k in range(2):
        score = logits.gather(1, classes[:, k : k + 1]).sum()
        (grad,) = torch.autograd.grad(score, leaf, retain_graph=True)
        torch.testing.assert_close(captured.gradients[:, k], grid_of(grad, prefix, 4))


def test_contrastive_cams_run_on_vit_tokens(vit_setup):
    model, images, classes = vit_setup
    grad_cam = create_method("grad_cam", model)(images, classes)  # default: blocks.1.norm1
    finer = create_method("finer_cam", model, gamma=0.0)(images, classes)
    torch.testing.assert_close(finer, grad_cam)  # γ = 0 gives the base CAM (Eq. 7)
    explicit = create_method("finer_cam", model, layout="tokens")(images, classes)
    assert explicit.shape == (2, 2, 32, 32) and (explicit >= 0).all()
    torch.testing.assert_close(explicit, create_method("finer_cam", model)(images, classes))
    # CASE (projection of pooled weights) against the algebra on class_gradients' tensors.
    counts = np.arange(NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES) % 7
    contrast = ConfusionContrast(counts, k=2)
    case = create_method("case", model, contrast=contrast, projection="weights")
    got = case.compute(images, classes)
    with torch.no_grad():
        logits = model(images)
    contrasts = contrast(logits.repeat_interleave(2, dim=0), classes.reshape(-1)).reshape(2, 2, 2)
    captured = class_gradients(
        model, images, "blocks.1.norm1", torch.cat([classes, contrasts.reshape(2, -1)], dim=1)
    )
    pooled = captured.gradients.mean(dim=(-2, -1))  # [B, 2 + 4, C]
    target, mean_contrast = pooled[:, :2], pooled[:, 2:].unflatten(1, (2, 2)).mean(dim=2)
    coefficient = (target * mean_contrast).sum(-1, keepdim=True) / (
        mean_contrast.pow(2).sum(-1, keepdim=True) + 1e-8
    )
    weights = target - coefficient * mean_contrast
    expected = torch.einsum("bkc,bchw->bkhw", weights, captured.activations).relu()
    torch.testing.assert_close(got, expected)
    assert got.abs().sum() > 0


def test_eigen_cam_on_vit_tokens_projects_the_patch_grid(vit_setup):
    model, images, classes = vit_setup
    maps = create_method("eigen_cam", model).compute(images, classes)
    tokens = {}
    handle = model.blocks[1].norm1.register_forward_hook(lambda m, i, o: tokens.setdefault("t", o))
    with torch.no_grad():
        model(images)
    handle.remove()
    expected = first_component_projection(grid_of(tokens["t"], model.num_prefix_tokens, 4))
    torch.testing.assert_close(maps[:, 0], expected.relu())
    assert torch.equal(maps[:, 0], maps[:, 1])


def test_dynamic_image_size_restores_the_grid_from_the_image():
    model = tiny_vit(dynamic_img_size=True)
    images = torch.randn(2, 3, 48, 40)  # 6 x 5 patches, not the declared 4 x 4 grid
    captured = class_gradients(model, images, "blocks.1.norm1", torch.tensor([0, 3]))
    assert captured.activations.shape == (2, 32, 6, 5)
    maps = create_method("grad_cam", model)(images, torch.tensor([0, 3]))
    assert maps.shape == (2, 1, 48, 40) and maps.abs().sum() > 0


def test_last_block_output_gives_blank_maps_which_is_why_norm1_is_the_default():
    """With class-token pooling the logits see the last block's output only through the class
    token: its patch-token gradients are zero (the reason for ``blocks[-1].norm1``)."""
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    captured = class_gradients(model, images, "blocks.1", torch.tensor([1, 2]))
    assert torch.equal(captured.gradients, torch.zeros_like(captured.gradients))
    assert default_layer(model) == "blocks.1.norm1"


# ------------------------------------------------------------------------- channels-last


@pytest.mark.parametrize("name", ["grad_cam", "layer_cam", "hires_cam"])
def test_channels_last_layer_equals_the_same_map_read_channels_first(name):
    model = tiny_convnext()
    images, classes = torch.randn(2, 3, 32, 32), torch.tensor([[0, 1], [2, 4]])
    # block.1 (Permute) holds block.0's conv output permuted: the same map, so the same CAM.
    conv = create_method(name, model, layer="features.3.0.block.0").compute(images, classes)
    permuted = create_method(name, model, layer="features.3.0.block.1").compute(images, classes)
    assert conv.shape == permuted.shape == (2, 2, 4, 4)
    assert conv.abs().sum() > 0
    torch.testing.assert_close(permuted, conv)


@pytest.mark.parametrize("layer", ["features.3.0.block.2", "features.3.0.block.4"])
def test_channels_last_layer_matches_pytorch_grad_cam_with_a_permute(layer):
    """block.2: LayerNorm over the last dim; block.4: GELU after a Linear in the Sequential."""
    model = tiny_convnext()
    images, classes = torch.randn(2, 3, 32, 32), torch.tensor([[0, 1], [2, 4]])
    captured = class_gradients(model, images, layer, classes)
    assert captured.activations.shape[-2:] == (4, 4)
    ours = create_method("grad_cam", model, layer=layer).compute(images, classes)
    with GradCAM(
        model=model,
        target_layers=[model.get_submodule(layer)],
        reshape_transform=lambda x: x.permute(0, 3, 1, 2),
    ) as reference:
        for k in range(2):
            targets = [ClassifierOutputTarget(int(c)) for c in classes[:, k]]
            expected = reference(input_tensor=images, targets=targets)
            got = post_process(ours[:, k].numpy(), (32, 32))
            assert got.max() > 0.5
            np.testing.assert_allclose(got, expected, atol=1e-4)
    model.zero_grad(set_to_none=True)
    # The explicit override agrees with the detection; the wrong one reads another tensor.
    explicit = create_method("grad_cam", model, layer=layer, layout="nhwc").compute(images, classes)
    torch.testing.assert_close(explicit, ours)


def test_nchw_blocks_of_a_channels_last_family_stay_channels_first():
    model = tiny_convnext()
    output = torch.zeros(2, 16, 4, 4)
    for layer in ("features.3.0", "features.3", "features.3.0.block"):
        assert detect_layout(model, layer, output, (32, 32)).kind == "nchw"
    assert default_layer(model) == "features.3"


# ------------------------------------------------------------------------------- errors


class OpaqueBlock(nn.Module):
    """A custom module: its type says nothing about its output layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return nn.functional.max_pool2d(self.conv(x), 4).relu()


class OpaqueNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = OpaqueBlock()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block(x).mean(dim=(2, 3)))


def test_ambiguous_4d_layout_asks_for_layout_and_the_override_resolves_it():
    torch.manual_seed(0)
    model, images = OpaqueNet().eval(), torch.randn(2, 3, 16, 16)  # block: [2, 4, 4, 4]
    with pytest.raises(ConfigurationError, match=r"ambiguous layout.*'block'.*layout='nchw'"):
        create_method("grad_cam", model, layer="block")(images, torch.tensor([0, 1]))
    maps = create_method("grad_cam", model, layer="block", layout="nchw")(
        images, torch.tensor([0, 1])
    )
    assert maps.shape == (2, 1, 16, 16)
    with pytest.raises(ConfigurationError, match="layout="):
        detect_layout(model, "block", torch.zeros(2, 5, 3, 9), (16, 16))  # neither fits


def test_non_grid_vit_layers_and_bad_layouts_are_clear_errors():
    model, images = tiny_vit(), torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigurationError, match=r"'head'.*not a feature map.*'blocks.1.norm1'"):
        create_method("grad_cam", model, layer="head")(images, torch.tensor([0, 1]))
    with pytest.raises(ConfigurationError, match=r"layout must be one of 'nchw', 'nhwc'"):
        create_method("grad_cam", model, layout="NHWC")
    with pytest.raises(ConfigurationError, match=r"layout='nhwc' needs a 4-D output"):
        create_method("layer_cam", model, layout="nhwc")(images, torch.tensor([0, 1]))
    with pytest.raises(ConfigurationError, match=r"outputs 20 tokens.*1 prefix tokens"):
        detect_layout(model, "blocks.0", torch.zeros(2, 20, 32), (32, 32))
    with pytest.raises(ConfigurationError, match=r"first dim is not the batch"):
        detect_layout(model, "blocks.0", torch.zeros(8, 17, 32), (32, 32), batch_size=2)


def test_3d_outputs_of_models_without_token_knowledge_need_layout_tokens():
    model = nn.Sequential(nn.Linear(8, 8))  # stands in for any layer emitting [B, T, D]
    with pytest.raises(ConfigurationError, match=r"pass layout='tokens'"):
        detect_layout(model, "0", torch.zeros(2, 16, 8), (32, 32))
    layout = detect_layout(model, "0", torch.zeros(2, 16, 8), (32, 32), layout="tokens")
    assert (layout.num_prefix_tokens, layout.grid) == (0, (4, 4))
    model.num_prefix_tokens = 1
    with pytest.raises(ConfigurationError, match=r"15 remain, which is not a square"):
        detect_layout(model, "0", torch.zeros(2, 16, 8), (32, 32))


# ------------------------------------------------------------------------ default layers

TORCHVISION_DEFAULTS = {
    "resnet50": "layer4",
    "vgg16": "features.30",
    "vgg19_bn": "features.52",
    "densenet201": "features.norm5",
    "convnext_large": "features.7",
    "efficientnet_b0": "features.8",
    "swin_t": "features.7",
    "vit_b_16": "encoder.layers.encoder_layer_11.ln_1",
}
TIMM_DEFAULTS = {
    "resnet18": "layer4",
    "densenet121": "features.norm5",
    "vgg11": "features.20",
    "convnext_atto": "stages.3",
    "vit_tiny_patch16_224": "blocks.11.norm1",
    "deit_tiny_distilled_patch16_224": "blocks.11.norm1",
    "vit_small_patch14_reg4_dinov2": "blocks.11.norm1",
    "vit_base_patch16_clip_224": "blocks.11.norm1",
    "swin_tiny_patch4_window7_224": "layers.3",
}


def test_default_layers_of_torchvision_architectures():
    with torch.device("meta"):  # architecture only: no weight initialisation, no forward
        models = {name: torchvision.models.get_model(name) for name in TORCHVISION_DEFAULTS}
    assert {name: default_layer(model) for name, model in models.items()} == TORCHVISION_DEFAULTS
    # CASE's protocol layers exist under these names (ResNet-50, VGG-19-bn, DenseNet-201).
    for name, layer in [
        ("resnet50", "layer4.2.conv3"),
        ("vgg19_bn", "features.49"),
        ("densenet201", "features.denseblock4.denselayer32.conv2"),
    ]:
        assert isinstance(models[name].get_submodule(layer), nn.Conv2d)
    # Layouts: torchvision's ViT has one class token; its Swin stages are channels-last.
    vit = detect_layout(models["vit_b_16"], TORCHVISION_DEFAULTS["vit_b_16"],
                        torch.empty(2, 197, 768, device="meta"), (224, 224))  # fmt: skip
    assert (vit.kind, vit.num_prefix_tokens, vit.grid) == ("tokens", 1, (14, 14))
    swin = detect_layout(models["swin_t"], "features.7", torch.empty(2, 7, 7, 768), (224, 224))
    assert swin.kind == "nhwc" and "Swin" in swin.reason


def test_default_layers_of_timm_architectures():
    with torch.device("meta"):
        models = {
            name: timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
            for name in TIMM_DEFAULTS
        }
    assert {name: default_layer(model) for name, model in models.items()} == TIMM_DEFAULTS
    reg = detect_layout(
        models["vit_small_patch14_reg4_dinov2"], "blocks.11.norm1",
        torch.empty(2, 5 + 16 * 16, 384), (224, 224),
    )  # fmt: skip
    assert (reg.num_prefix_tokens, reg.grid) == (5, (16, 16))  # class + 4 register tokens
    swin = detect_layout(
        models["swin_tiny_patch4_window7_224"], "layers.3", torch.empty(2, 7, 7, 7), (224, 224)
    )  # geometry alone would be ambiguous: the model's output_fmt decides
    assert swin.kind == "nhwc" and "output_fmt" in swin.reason
    with pytest.raises(ConfigurationError, match=r"no default saliency layer.*layer="):
        default_layer(nn.Sequential(nn.Conv2d(3, 4, 3)))
