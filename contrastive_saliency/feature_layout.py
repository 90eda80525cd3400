"""Turning a layer's output into a ``[B, C, h, w]`` feature grid.

Every CAM is a function of a grid of channel vectors. Layers do not all emit one:

- ``"nchw"``: a convolutional map ``[B, C, h, w]`` (ResNet, VGG, DenseNet, ConvNeXt stages);
- ``"nhwc"``: a channels-last map ``[B, h, w, C]`` (timm/torchvision Swin stages, the
  ``LayerNorm``/``Linear`` layers inside ConvNeXt blocks), permuted to ``[B, C, h, w]``;
- ``"tokens"``: a ViT token sequence ``[B, T, D]`` whose first ``num_prefix_tokens`` tokens
  (class, distillation and register tokens) are dropped and whose remaining ``h·w`` patch
  tokens are laid back on the patch grid as ``[B, D, h, w]``.

:func:`detect_layout` decides which applies from explicit knowledge first and never guesses:
an explicit ``layout=`` wins; then the layer's module type (convolutions and 2-D norms/pools
are NCHW; ``nn.LayerNorm``/``nn.Linear`` act on the last dim, so a 4-D output whose last dim
is their ``normalized_shape``/``out_features`` is channels-last; torchvision ``Permute``;
timm ``output_fmt``; an element-wise module inside ``nn.Sequential`` keeps its predecessor's
layout; a ``Sequential`` has its last child's layout); then the model's declaration (timm
``output_fmt="NHWC"``, torchvision Swin); and only then the geometry: a 4-D output is read as
NCHW (or NHWC) only if that reading alone has spatial dims fitting the image at one common
stride. When both or neither fit, a :class:`~contrastive_saliency.errors.ConfigurationError` asks for
``layout=``. The :class:`FeatureLayout` it returns converts activations ``[B, ...]`` and
gradients ``[B, K, ...]`` the same way, so ``gradients[b, k]`` stays aligned with
``activations[b]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.layers import default_layer, resolve_layer

Layout = Literal["nchw", "nhwc", "tokens"]
LAYOUTS: tuple[str, ...] = ("nchw", "nhwc", "tokens")

# Modules whose output keeps the layout of their input (element-wise or shape-preserving).
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
)  # fmt: skip
_ELEMENTWISE_NAMES = ("DropPath", "StochasticDepth")  # timm / torchvision stochastic depth
# Modules that only accept or produce channels-first maps.
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)


@dataclass(frozen=True)
class FeatureLayout:
    """How one layer's output maps to ``[B, C, h, w]``.

    ``kind``: ``"nchw"``, ``"nhwc"`` or ``"tokens"``; for tokens, ``num_prefix_tokens`` leading
    tokens are dropped and the rest restored to ``grid = (h, w)`` in row-major order (the order
    of timm's and torchvision's patch embeddings). ``reason`` says how the layout was decided.
    """

    kind: Layout
    num_prefix_tokens: int = 0
    grid: tuple[int, int] | None = None
    reason: str = ""

    def to_grid(self, output: torch.Tensor) -> torch.Tensor:
        """Activations ``[B, ...]`` in this layout → ``[B, C, h, w]`` (a view where possible)."""
        if self.kind == "nchw":
            _check_dims(output, 4, self)
            return output
        if self.kind == "nhwc":
            _check_dims(output, 4, self)
            return output.permute(0, 3, 1, 2)
        _check_dims(output, 3, self)
        assert self.grid is not None
        height, width = self.grid
        expected = self.num_prefix_tokens + height * width
        if output.shape[1] != expected:
            raise ConfigurationError(
                f"a tensor of shape {tuple(output.shape)} does not fit this token layout "
                f"({self.num_prefix_tokens} prefix tokens + a {height}x{width} grid = "
                f"{expected} tokens); detect the layout again for this input size"
            )
        patches = output[:, self.num_prefix_tokens :]  # [B, h·w, D]
        return patches.unflatten(1, (height, width)).permute(0, 3, 1, 2)

    def gradients_to_grid(self, gradients: torch.Tensor) -> torch.Tensor:
        """Gradients ``[B, K, ...]`` (one per class, same layout as the activations) →
        ``[B, K, C, h, w]``, converted exactly as :meth:`to_grid` converts the activations."""
        if gradients.dim() < 2:
            raise ConfigurationError(
                f"gradients must be [B, K, ...], got shape {tuple(gradients.shape)}"
            )
        return self.to_grid(gradients.flatten(0, 1)).unflatten(0, gradients.shape[:2])


def check_layout(layout: str | None) -> Layout | None:
    """Validate a user-given ``layout`` (``None`` = detect); raise naming the valid values."""
    if layout is None or layout in LAYOUTS:
        return layout  # type: ignore[return-value]
    raise ConfigurationError(
        f"layout must be one of {', '.join(repr(name) for name in LAYOUTS)} or None (detect), "
        f"got {layout!r}"
    )


def detect_layout(
    model: nn.Module,
    layer: str,
    output: torch.Tensor,
    image_size: tuple[int, int] | torch.Size | None = None,
    layout: str | None = None,
    batch_size: int | None = None,
) -> FeatureLayout:
    """The :class:`FeatureLayout` of ``output``, the tensor layer ``layer`` of ``model`` emitted
    for images of spatial size ``image_size`` ``(H, W)``.

    ``layout`` forces the kind (validated against the tensor's rank); token grids are still
    derived from the model (prefix tokens, patch grid). ``image_size`` is needed for the
    geometric 4-D fallback and for ViTs run at a size other than their ``patch_embed.grid_size``
    (``dynamic_img_size``). Raises :class:`ConfigurationError` for outputs that are not a
    feature grid (e.g. a ViT's ``head``) and for ambiguous 4-D outputs, asking for ``layout=``;
    with ``batch_size``, also for outputs whose first dim is not the batch (Swin's windows).
    """
    layout = check_layout(layout)
    shape = tuple(output.shape)
    if batch_size is not None and output.dim() > 0 and shape[0] != batch_size:
        raise ConfigurationError(
            f"layer {layer!r} outputs shape {shape} for a batch of {batch_size} images: its "
            f"first dim is not the batch (e.g. windowed attention); choose a layer whose output "
            f"is [B, ...], such as a whole block or stage"
        )
    if layout is not None:
        rank = 3 if layout == "tokens" else 4
        if output.dim() != rank:
            raise ConfigurationError(
                f"layout={layout!r} needs a {rank}-D output but layer {layer!r} outputs shape "
                f"{shape}; choose another layer or layout (nchw/nhwc: 4-D, tokens: 3-D)"
            )
        if layout == "tokens":
            return _token_layout(model, layer, shape, image_size, "given as layout='tokens'")
        return FeatureLayout(layout, reason=f"given as layout={layout!r}")
    if output.dim() == 3:
        if _num_prefix_tokens(model) is None and getattr(model, "patch_embed", None) is None:
            raise ConfigurationError(
                f"layer {layer!r} outputs a 3-D tensor {shape} but {type(model).__name__} "
                f"declares no token layout (no num_prefix_tokens or patch_embed); if these are "
                f"patch tokens [B, T, D] pass layout='tokens' (no prefix tokens are assumed; set "
                f"model.num_prefix_tokens = n for n class/register tokens), else choose a "
                f"[B, C, h, w] layer"
            )
        return _token_layout(model, layer, shape, image_size, "3-D output of a token model")
    if output.dim() == 4:
        module = resolve_layer(model, layer)
        known = _module_layout(model, layer, module, shape)
        if known is not None:
            return FeatureLayout(known[0], reason=known[1])
        declared = _model_layout(model)
        if declared is not None:
            return FeatureLayout(declared[0], reason=declared[1])
        return FeatureLayout(_geometric_layout(layer, module, shape, image_size), reason="shape")
    hint = _token_layer_hint(model)
    raise ConfigurationError(
        f"layer {layer!r} outputs shape {shape}, which is not a feature map [B, C, h, w], a "
        f"channels-last map [B, h, w, C] or a token grid [B, T, D]; choose a layer before the "
        f"pooling/classifier{hint}"
    )


def to_feature_grid(
    model: nn.Module,
    layer: str,
    output: torch.Tensor,
    image_size: tuple[int, int] | torch.Size | None = None,
    layout: str | None = None,
) -> torch.Tensor:
    """``output`` of ``layer`` as ``[B, C, h, w]``: :func:`detect_layout` then
    :meth:`FeatureLayout.to_grid`."""
    return detect_layout(model, layer, output, image_size, layout).to_grid(output)


def _check_dims(tensor: torch.Tensor, rank: int, layout: FeatureLayout) -> None:
    if tensor.dim() != rank:
        raise ConfigurationError(
            f"layout {layout.kind!r} expects a {rank}-D tensor, got shape {tuple(tensor.shape)}"
        )


# ---------------------------------------------------------------------------------- tokens


def _num_prefix_tokens(model: nn.Module) -> int | None:
    """Leading non-patch tokens: timm's ``num_prefix_tokens`` (class + distillation + register
    tokens); 1 for torchvision's ViT (its ``class_token``); ``None`` when the model says nothing."""
    declared = getattr(model, "num_prefix_tokens", None)
    if isinstance(declared, int):
        return declared
    if isinstance(getattr(model, "class_token", None), torch.Tensor) and hasattr(
        model, "conv_proj"
    ):
        return 1
    return None


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = tuple(value)[:2]
    return int(first), int(second)


def _patch_grids(
    model: nn.Module, image_size: tuple[int, int] | torch.Size | None
) -> list[tuple[int, int]]:
    """Candidate patch grids, most specific first: from the actual image size and the patch size
    (a ViT run at another size with ``dynamic_img_size``), then the declared grid."""
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None:
        patch = getattr(model, "patch_size", None)  # torchvision VisionTransformer
    grids: list[tuple[int, int]] = []
    if patch is not None and image_size is not None:
        patch_height, patch_width = _pair(patch)
        height, width = (int(side) for side in image_size)
        if getattr(patch_embed, "dynamic_img_pad", False):
            grids.append((math.ceil(height / patch_height), math.ceil(width / patch_width)))
        else:
            grids.append((height // patch_height, width // patch_width))
    declared = getattr(patch_embed, "grid_size", None)
    if (
        declared is None
        and patch is not None
        and isinstance(getattr(model, "image_size", None), int)
    ):
        declared = (model.image_size // _pair(patch)[0], model.image_size // _pair(patch)[1])
    if declared is not None:
        grids.append(_pair(declared))
    return [grid for index, grid in enumerate(grids) if grid not in grids[:index]]


def _token_layout(
    model: nn.Module,
    layer: str,
    shape: tuple[int, ...],
    image_size: tuple[int, int] | torch.Size | None,
    reason: str,
) -> FeatureLayout:
    """Prefix count and patch grid of a ``[B, T, D]`` output: ``T = prefix + h·w`` for the
    model's patch grid, or ``T = h·w`` (tokens before the prefix is prepended, e.g.
    ``patch_embed``), or a square ``T - prefix`` when the model declares no grid."""
    num_tokens = shape[1]
    prefix = _num_prefix_tokens(model) or 0
    grids = _patch_grids(model, image_size)
    for grid in grids:
        if num_tokens == prefix + grid[0] * grid[1]:
            return FeatureLayout("tokens", prefix, grid, reason)
    for grid in grids:
        if prefix and num_tokens == grid[0] * grid[1]:
            return FeatureLayout("tokens", 0, grid, reason + " (no prefix tokens yet)")
    if grids:
        expected = ", ".join(f"{prefix} + {h}x{w} = {prefix + h * w}" for h, w in grids)
        raise ConfigurationError(
            f"layer {layer!r} outputs {num_tokens} tokens (shape {shape}); {type(model).__name__} "
            f"has {prefix} prefix tokens and a patch grid giving {expected} tokens; choose a "
            f"layer whose tokens are the patch tokens (e.g. 'blocks.<i>.norm1'){_token_layer_hint(model)}"
        )
    patches = num_tokens - prefix
    side = math.isqrt(max(patches, 0))
    if patches <= 0 or side * side != patches:
        raise ConfigurationError(
            f"layer {layer!r} outputs {num_tokens} tokens (shape {shape}); after {prefix} prefix "
            f"tokens {patches} remain, which is not a square grid and {type(model).__name__} "
            f"declares none (patch_embed.grid_size / patch_size); use square images or set "
            f"model.num_prefix_tokens to the number of leading non-patch tokens"
        )
    return FeatureLayout("tokens", prefix, (side, side), reason + " (square grid)")


def _token_layer_hint(model: nn.Module) -> str:
    """``"; this model's default layer is '...'"`` for error messages, or nothing."""
    try:
        return f"; this model's default layer is {default_layer(model)!r}"
    except ConfigurationError:
        return ""


# ------------------------------------------------------------------------------------ 4-D


def _format_layout(fmt: object) -> Layout | None:
    name = str(getattr(fmt, "value", fmt)).upper()
    return {"NCHW": "nchw", "NHWC": "nhwc"}.get(name)  # type: ignore[return-value]


def _module_layout(
    model: nn.Module, path: str, module: nn.Module, shape: tuple[int, ...]
) -> tuple[Layout, str] | None:
    """The layout of a 4-D output known from the module that produced it, else ``None``."""
    name = type(module).__name__
    declared = _format_layout(getattr(module, "output_fmt", None))
    if declared is not None:
        return declared, f"{name}.output_fmt"
    if isinstance(module, _CHANNELS_FIRST):
        return "nchw", f"{name} is channels-first"
    if isinstance(module, nn.LayerNorm):
        if "2d" in name.lower():  # timm/torchvision LayerNorm2d normalise dim 1 of NCHW
            return "nchw", f"{name} is channels-first"
        if len(module.normalized_shape) == 1 and shape[-1] == module.normalized_shape[0]:
            return "nhwc", f"{name} normalises the last dim ({shape[-1]} channels)"
        return None
    if isinstance(module, nn.Linear):
        if shape[-1] == module.out_features:
            return "nhwc", f"{name} maps the last dim ({shape[-1]} channels)"
        return None
    if name == "LayerScale":  # timm: x * gamma over the last dim
        return "nhwc", f"{name} scales the last dim"
    if name == "LayerScale2d":
        return "nchw", f"{name} scales dim 1"
    dims = getattr(module, "dims", None)
    if name == "Permute" and isinstance(dims, list | tuple):  # torchvision.ops.misc.Permute
        order = [int(dim) for dim in dims]
        if order == [0, 2, 3, 1]:
            return "nhwc", "Permute to channels-last"
        if order == [0, 3, 1, 2]:
            return "nchw", "Permute to channels-first"
        return None
    if isinstance(module, nn.Sequential) and len(module) > 0:  # its output is its last child's
        last = list(module._modules)[-1]
        return _module_layout(model, f"{path}.{last}", module[-1], shape)
    if isinstance(module, _ELEMENTWISE) or name in _ELEMENTWISE_NAMES:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(parent, nn.Sequential):
            children = list(parent._modules)
            index = children.index(child)
            if index > 0:
                previous = children[index - 1]
                prefix = f"{parent_path}." if parent_path else ""
                return _module_layout(model, prefix + previous, parent[index - 1], shape)
    return None


def _model_layout(model: nn.Module) -> tuple[Layout, str] | None:
    """A whole-model declaration of channels-last features (timm ``output_fmt``, e.g. Swin;
    torchvision's ``SwinTransformer``, whose stages are ``[B, h, w, C]``)."""
    declared = _format_layout(getattr(model, "output_fmt", None))
    if declared == "nhwc":
        return "nhwc", f"{type(model).__name__}.output_fmt is NHWC"
    if type(model).__name__ == "SwinTransformer" and type(model).__module__.startswith(
        "torchvision."
    ):
        return "nhwc", "torchvision SwinTransformer stages are channels-last"
    return None


def _fits_image(first: int, second: int, image_size: tuple[int, int]) -> bool:
    """Whether ``(first, second)`` can be the spatial size of a map of a ``(H, W)`` image at one
    common stride ``s``: ``|first − H/s| < 1`` and ``|second − W/s| < 1`` (floor or ceil)."""
    height, width = image_size
    if not (1 <= first <= height and 1 <= second <= width):
        return False
    low = max((first - 1) / height, (second - 1) / width)
    high = min((first + 1) / height, (second + 1) / width)
    return low < high


def _geometric_layout(
    layer: str,
    module: nn.Module,
    shape: tuple[int, ...],
    image_size: tuple[int, int] | torch.Size | None,
) -> Layout:
    """NCHW or NHWC from the shape alone, only when exactly one reading fits the image."""
    ask = "pass layout='nchw' ([B, C, h, w]) or layout='nhwc' ([B, h, w, C])"
    if image_size is None:
        raise ConfigurationError(
            f"the layout of layer {layer!r} ({type(module).__name__}, output {shape}) is not "
            f"known from its module type and no image size was given; {ask}"
        )
    size = (int(image_size[0]), int(image_size[1]))
    channels_first = _fits_image(shape[2], shape[3], size)
    channels_last = _fits_image(shape[1], shape[2], size)
    if channels_first and not channels_last:
        return "nchw"
    if channels_last and not channels_first:
        return "nhwc"
    which = "both readings fit" if channels_first else "neither reading fits"
    raise ConfigurationError(
        f"ambiguous layout for layer {layer!r} ({type(module).__name__}, output {shape}) on "
        f"{size[0]}x{size[1]} images: {which} ([B, C, h, w] vs [B, h, w, C]) and the module "
        f"type does not say; {ask}"
    )
