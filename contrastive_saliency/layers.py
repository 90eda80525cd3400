"""Finding a layer by dotted path and capturing its output for one forward pass.

Hooks exist only inside :func:`capture_layer`; on exit they are removed and the model's
train/eval mode and every parameter's ``requires_grad`` flag are restored, also on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError, UnknownLayerError, closest


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (e.g. ``"features.3"``, ``"layer4.2.conv3"``).

    Raises :class:`UnknownLayerError` naming the nearest valid paths when there is none.
    """
    names = [name for name, _ in model.named_modules() if name]
    if path in names:
        return model.get_submodule(path)
    suggestions = closest(path, names)
    raise UnknownLayerError(
        f"layer {path!r} is not a submodule of {type(model).__name__}; "
        f"nearest valid names: {', '.join(suggestions) or '(none)'}; "
        f"list them all with [n for n, _ in model.named_modules()]"
    )


def default_layer(model: nn.Module) -> str:
    """The layer explained when ``layer=None``, per architecture (first matching row wins).

    The choice follows each family's usual Grad-CAM layer: the last spatial feature map a
    convolutional classifier pools, or for ViTs the input of the last block, whose patch
    tokens reach the class token through the last attention. Paper protocols that use another
    layer pass it explicitly (last column), or by name: ``protocol:case`` (:func:`case_layer`,
    via :func:`layer_path`). The layout column is what
    :func:`contrastive_saliency.feature_layout.detect_layout` finds for that layer.

    | architecture | ``layer=None`` gives | layout | protocol layers (pass as ``layer=``) |
    |---|---|---|---|
    | model with ``default_saliency_layer: str`` | that attribute (``SmallCNN``: ``features.3``) | nchw | |
    | timm ViT / DeiT / CLIP / DINOv2 / EVA / BEiT | ``blocks.<last>.norm1`` (ViT-B: ``blocks.11.norm1``) | tokens | Finer-CAM: ``blocks[-1].norm1`` (the same) |
    | torchvision ViT (``vit_b_16``, ...) | ``encoder.layers.encoder_layer_<last>.ln_1`` | tokens | |
    | torchvision / timm VGG (± BN) | ``features.<last>``, the final max-pool (vgg16 ``features.30``, vgg19_bn ``features.52``) | nchw | CASE VGG-19-bn: ``features.49`` (last conv); Grad-CAM paper: relu5_3 (vgg16 ``features.29``) |
    | other timm models (``feature_info``) | ``feature_info[-1]["module"]``: ResNet ``layer4``, ConvNeXt ``stages.3``, DenseNet ``features.norm5``, VGG ``features.<last>``, Swin ``layers.3`` | nchw; Swin nhwc | |
    | torchvision ResNet / ResNeXt / Wide ResNet | ``layer4`` | nchw | CASE ResNet-50: ``layer4.2.conv3`` |
    | torchvision RegNet | ``trunk_output`` | nchw | |
    | torchvision DenseNet | ``features.norm5`` (last child of ``features``) | nchw | CASE DenseNet-201: ``features.denseblock4.denselayer32.conv2``; ablation ``features.norm5`` |
    | torchvision ConvNeXt | ``features.7`` (last stage) | nchw | CASE ConvNeXt-L: ``features.7.2.block.0`` |
    | torchvision EfficientNet / MobileNet / Swin | ``features.<last>`` | nchw; Swin nhwc | |

    Why not timm's ``feature_info`` for ViTs: its last entry is the output of the last block.
    With class-token pooling the logits depend on that output only through the class token, so
    the patch tokens' gradients there are exactly zero and every gradient CAM is blank;
    ``norm1`` of the last block (Finer-CAM's protocol layer) is the normalised input of that
    block, whose patch tokens feed the class token through attention.
    Why the final max-pool for VGG (as timm's ``feature_info``), not the last ReLU before it
    (the Grad-CAM paper's relu5_3, twice the resolution): the gradient reaching the pre-pool
    map is non-zero only at each 2x2 window's maximum, which gives element-wise CAMs
    (LayerCAM, HiResCAM) a checkerboard; pass the pre-pool layer explicitly to reproduce papers.
    Raises :class:`ConfigurationError` for other models: pass ``layer='<dotted path>'``.
    """
    declared = getattr(model, "default_saliency_layer", None)
    if isinstance(declared, str):
        return declared
    vit_layer = _vision_transformer_layer(model)
    if vit_layer is not None:
        return vit_layer
    feature_info = getattr(model, "feature_info", None)  # timm models
    if feature_info is not None:
        info = feature_info[-1] if isinstance(feature_info, list) else feature_info.info[-1]
        return info["module"]
    names = {name for name, _ in model.named_modules()}
    for candidate in ("layer4", "trunk_output"):  # torchvision ResNet family; RegNet
        if candidate in names:
            return candidate
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and len(features) > 0:
        return f"features.{list(features._modules)[-1]}"  # VGG pool, DenseNet norm5, ConvNeXt
    if "features" in names:
        return "features"
    raise ConfigurationError(
        f"no default saliency layer is known for {type(model).__name__}: pass layer='<dotted "
        f"path>' (list the candidates with [n for n, _ in model.named_modules()])"
    )


def _vision_transformer_layer(model: nn.Module) -> str | None:
    """``norm1``/``ln_1`` of the last block of a timm or torchvision ViT, else ``None``."""
    blocks = getattr(model, "blocks", None)
    if (
        isinstance(getattr(model, "num_prefix_tokens", None), int)
        and isinstance(blocks, nn.Sequential | nn.ModuleList)
        and len(blocks) > 0
        and hasattr(blocks[-1], "norm1")
    ):
        return f"blocks.{list(blocks._modules)[-1]}.norm1"
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if (
        isinstance(getattr(model, "class_token", None), torch.Tensor)
        and isinstance(layers, nn.Sequential)
        and len(layers) > 0
        and hasattr(layers[-1], "ln_1")
    ):
        return f"encoder.layers.{list(layers._modules)[-1]}.ln_1"
    return None


PROTOCOL_PREFIX = "protocol:"


def case_layer(model: nn.Module) -> str:
    """The layer CASE explains (``case.md`` Sec. IV-D, Figs. 5–6; PROTOCOLS.md), found from the
    architecture's structure, for torchvision and timm names alike:

    | architecture | CASE layer | CASE's models |
    |---|---|---|
    | model with ``default_saliency_layer: str`` | that attribute (``SmallCNN``: ``features.3``) | |
    | ResNet / ResNeXt / Wide ResNet (``layer4``) | last convolution of the last block: ``layer4.<last>.conv3`` (bottleneck) or ``.conv2`` (basic block) | ResNet-50 ``layer4.2.conv3`` |
    | DenseNet | ``features.denseblock<last>.denselayer<last>.conv2`` | DenseNet-201 ``features.denseblock4.denselayer32.conv2`` |
    | ConvNeXt | depthwise convolution of the last block: ``features.<last>.<last>.block.0`` (torchvision), ``stages.<last>.blocks.<last>.conv_dw`` (timm) | ConvNeXt-L ``features.7.2.block.0`` |
    | VGG (a flat ``features`` stack) | its last convolution | VGG-19-bn ``features.49`` |

    These are not the generic defaults of :func:`default_layer` (``layer4``,
    ``features.norm5``, ...): CASE Table II shows that the layer changes RQ1's result.
    Raises :class:`ConfigurationError` for any other architecture (no silent fallback).
    """
    for finder in (_declared_layer, _resnet_layer, _densenet_layer, _convnext_layer, _vgg_layer):
        found = finder(model)
        if found is not None:
            return found
    raise ConfigurationError(
        f"the CASE layer protocol does not cover {type(model).__name__}: it knows models with a "
        f"default_saliency_layer, ResNet/ResNeXt/Wide ResNet (layer4.<last>.conv3 or .conv2), "
        f"DenseNet (features.denseblock<last>.denselayer<last>.conv2), ConvNeXt "
        f"(features.<last>.<last>.block.0 / stages.<last>.blocks.<last>.conv_dw) and VGG (the "
        f"last convolution of features); name the layer explicitly in evaluation.layers"
    )


LAYER_PROTOCOLS: dict[str, Callable[[nn.Module], str]] = {"case": case_layer}
"""Named layer protocols, written ``protocol:<name>`` wherever a layer is configured."""


def layer_path(model: nn.Module, layer: str | None) -> str | None:
    """A configured layer as the dotted path to explain: ``None`` stays ``None`` (each method
    takes :func:`default_layer`), ``"protocol:<name>"`` becomes the layer that protocol uses
    for this architecture (:data:`LAYER_PROTOCOLS`, e.g. ``protocol:case`` →
    :func:`case_layer`), and a dotted path is checked (:func:`resolve_layer`)."""
    if layer is None:
        return None
    if layer.startswith(PROTOCOL_PREFIX):
        name = layer[len(PROTOCOL_PREFIX) :]
        if name not in LAYER_PROTOCOLS:
            known = ", ".join(PROTOCOL_PREFIX + key for key in LAYER_PROTOCOLS)
            raise ConfigurationError(f"unknown layer protocol {layer!r}; known: {known}")
        path = LAYER_PROTOCOLS[name](model)
    else:
        path = layer
    resolve_layer(model, path)
    return path


def _declared_layer(model: nn.Module) -> str | None:
    declared = getattr(model, "default_saliency_layer", None)
    return declared if isinstance(declared, str) else None


def _last(container: nn.Module, prefix: str = "") -> tuple[str, nn.Module] | None:
    """The last child of ``container`` whose name starts with ``prefix``."""
    children = [
        (name, child) for name, child in container.named_children() if name.startswith(prefix)
    ]
    return children[-1] if children else None


def _resnet_layer(model: nn.Module) -> str | None:
    stage = getattr(model, "layer4", None)
    block = _last(stage) if isinstance(stage, nn.Module) else None
    if block is None:
        return None
    for conv in ("conv3", "conv2"):  # bottleneck, basic block
        if isinstance(getattr(block[1], conv, None), nn.Conv2d):
            return f"layer4.{block[0]}.{conv}"
    return None


def _densenet_layer(model: nn.Module) -> str | None:
    features = getattr(model, "features", None)
    block = _last(features, "denseblock") if isinstance(features, nn.Module) else None
    dense = _last(block[1], "denselayer") if block is not None else None
    if dense is None or not isinstance(getattr(dense[1], "conv2", None), nn.Conv2d):
        return None
    return f"features.{block[0]}.{dense[0]}.conv2"


def _convnext_layer(model: nn.Module) -> str | None:
    if "ConvNeXt" not in type(model).__name__:
        return None
    stages = getattr(model, "stages", None)  # timm
    if isinstance(stages, nn.Sequential) and len(stages) > 0:
        stage = _last(stages)
        block = _last(stage[1].blocks) if hasattr(stage[1], "blocks") else None
        if block is not None and isinstance(getattr(block[1], "conv_dw", None), nn.Conv2d):
            return f"stages.{stage[0]}.blocks.{block[0]}.conv_dw"
        return None
    features = getattr(model, "features", None)  # torchvision: stages of CNBlocks
    stage = _last(features) if isinstance(features, nn.Sequential) else None
    block = _last(stage[1]) if stage is not None else None
    inner = getattr(block[1], "block", None) if block is not None else None
    if isinstance(inner, nn.Sequential) and isinstance(inner[0], nn.Conv2d):
        return f"features.{stage[0]}.{block[0]}.block.0"
    return None


def _vgg_layer(model: nn.Module) -> str | None:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or any(
        next(child.children(), None) is not None for child in features
    ):
        return None  # not a flat stack of layers
    convolutions = [
        name for name, child in features.named_children() if isinstance(child, nn.Conv2d)
    ]
    return f"features.{convolutions[-1]}" if convolutions else None


@dataclass
class LayerCapture:
    """What :func:`capture_layer` recorded: the layer's output during the forward pass."""

    path: str
    activation: torch.Tensor | None = None
    calls: int = field(default=0)

    def output(self) -> torch.Tensor:
        if self.activation is None:
            raise RuntimeError(
                f"layer {self.path!r} was not called during the forward pass: "
                f"choose a layer on the path from the input to the logits"
            )
        if self.calls > 1:
            raise ConfigurationError(
                f"layer {self.path!r} ran {self.calls} times in one forward pass (a shared "
                f"module); choose a layer that runs once per forward"
            )
        return self.activation


@contextmanager
def capture_layer(
    model: nn.Module, path: str, track_gradient: bool = True
) -> Iterator[LayerCapture]:
    """Record the output of layer ``path`` during forward passes inside the block.

    With ``track_gradient`` the recorded activation is a fresh leaf that requires grad and the
    network continues from a copy of it, so ``torch.autograd.grad(score, capture.output())``
    gives d score / d activation while nothing before the layer is traced. Parameters are
    frozen and the model is in eval mode inside the block (batch statistics would couple the
    samples of a batch); both are restored on exit.
    """
    layer = resolve_layer(model, path)
    capture = LayerCapture(path)
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            raise ConfigurationError(
                f"layer {path!r} returns {type(output).__name__}, not a tensor; choose a layer "
                f"whose output is a feature map"
            )
        capture.calls += 1
        if not track_gradient:
            capture.activation = output.detach()
            return None
        leaf = output.detach().requires_grad_(True)
        capture.activation = leaf
        # A clone lets later in-place ops (ReLU(inplace=True)) run without touching the leaf.
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        for parameter, _ in grad_flags:
            parameter.requires_grad_(False)
        yield capture
    finally:
        handle.remove()
        for parameter, flag in grad_flags:
            parameter.requires_grad_(flag)
        model.train(was_training)
