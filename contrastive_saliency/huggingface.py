"""Hugging Face ``transformers`` image classifiers as plain networks ``images → logits``.

``AutoModelForImageClassification`` models return a ``ModelOutput``, not a tensor, and their
feature layers come in three layouts. :class:`HuggingFaceClassifier` wraps such a model so
every saliency method can explain it (pytorch-grad-cam #355, #386, #503):

- ``forward`` returns ``ModelOutput.logits`` ``[B, C]`` (positional embeddings interpolated
  when the model supports it, so other input sizes work as in ``transformers``);
- ``default_saliency_layer`` per family (found from the model's structure, so it follows
  renamed attributes across ``transformers`` versions):

  | family | ``layer=None`` gives | layout |
  |---|---|---|
  | ViT, DeiT, BEiT, DINOv2 (a stack of blocks with ``layernorm_before`` / ``norm1``) | that norm of the last block (as timm's ``blocks[-1].norm1``) | tokens ``[B, T, D]``; the class, distillation and register tokens (``num_prefix_tokens``) are dropped and the patch grid comes from ``patch_size`` |
  | Swin, Swin V2 | ``<base>.layernorm``, the normalised last stage | tokens ``[B, L, C]`` without prefix, on a square ``√L × √L`` grid |
  | ConvNeXt, ResNet, RegNet (``encoder.stages``) | the last stage | ``[B, C, H, W]`` |

  Paths carry the wrapper's prefix ``hf.`` (``hf.vit.layers.11.layernorm_before``).
- :meth:`HuggingFaceClassifier.as_vision_transformer` gives a ViT to the methods that run a
  timm ``VisionTransformer`` block by block (CAAP, attention rollout): a timm module built
  around the HF model's own submodules (shared, not copied), with HF's order of operations.

Pure torch: nothing here imports ``transformers``; loading a model by name or directory is
:func:`lightning_modules.backbones.build_backbone` (``hf:<repo id or directory>``).
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError

PREFIX = "hf"
_TOKEN_NORMS = ("layernorm_before", "norm1")
_SWIN_TYPES = ("swin", "swinv2", "donut-swin")


class HuggingFaceClassifier(nn.Module):
    """A ``transformers`` image-classification model as ``images [B, 3, H, W] → logits [B, C]``.

    Args:
        model: e.g. ``AutoModelForImageClassification.from_pretrained(...)``; kept as
            ``self.hf`` (its layers are ``hf.<path>``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_labels"):
            raise ConfigurationError(
                f"{type(model).__name__} is not a Hugging Face image classifier (no config with "
                f"num_labels); load one with AutoModelForImageClassification"
            )
        self.hf = model
        self.train(model.training)  # the wrapper follows the model's mode
        self.num_classes = int(config.num_labels)
        parameters = inspect.signature(model.forward).parameters
        self._interpolate = "interpolate_pos_encoding" in parameters
        layer, tokens = _default_layer(model)
        if layer is not None:
            self.default_saliency_layer = f"{PREFIX}.{layer}"
        if tokens is not None:  # what contrastive_saliency.feature_layout reads for token layers
            self.num_prefix_tokens = tokens[0]
            if tokens[1] is not None:
                self.patch_size = tokens[1]
                self.image_size = int(getattr(config, "image_size", 0)) or None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        extra = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return self.hf(pixel_values=images, **extra).logits

    def as_vision_transformer(self) -> nn.Module:
        """This ViT as a timm ``VisionTransformer`` sharing the HF submodules (see module)."""
        return _timm_vision_transformer(self.hf)


def _base(model: nn.Module) -> tuple[str, nn.Module]:
    """The backbone inside a ``*ForImageClassification`` (``vit``, ``swin``, ``convnext``, ...)."""
    name = getattr(model, "base_model_prefix", "")
    base = getattr(model, name, None) if name else None
    return (name, base) if isinstance(base, nn.Module) else ("", model)


def _default_layer(model: nn.Module) -> tuple[str | None, tuple[int, int | None] | None]:
    """``(layer path inside the HF model, (prefix tokens, patch size) for token layers)``."""
    config = model.config
    prefix, base = _base(model)
    dotted = f"{prefix}." if prefix else ""
    if getattr(config, "model_type", "") in _SWIN_TYPES and isinstance(
        getattr(base, "layernorm", None), nn.LayerNorm
    ):
        return f"{dotted}layernorm", (0, None)
    blocks = _last_block_stack(base)
    if blocks is not None:
        path, last, norm = blocks
        patch = getattr(config, "patch_size", None)
        return f"{dotted}{path}.{last}.{norm}", (_prefix_tokens(base), patch)
    stages = getattr(getattr(base, "encoder", None), "stages", None)
    if isinstance(stages, nn.ModuleList | nn.Sequential) and len(stages) > 0:
        return f"{dotted}encoder.stages.{len(stages) - 1}", None
    return None, None


def _last_block_stack(base: nn.Module) -> tuple[str, str, str] | None:
    """``(path, last index, norm name)`` of the last list of transformer blocks whose blocks
    all have a pre-attention norm (``layernorm_before`` or ``norm1``)."""
    found = None
    for path, module in base.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential) or len(module) == 0:
            continue
        for norm in _TOKEN_NORMS:
            if all(isinstance(getattr(block, norm, None), nn.LayerNorm) for block in module):
                found = (path, list(module._modules)[-1], norm)
    return found


def _prefix_tokens(base: nn.Module) -> int:
    """Class + distillation + register tokens that precede the patch tokens."""
    embeddings = getattr(base, "embeddings", None)
    count = sum(
        isinstance(getattr(embeddings, name, None), torch.Tensor)
        for name in ("cls_token", "distillation_token")
    )
    registers = getattr(embeddings, "register_tokens", None)
    if isinstance(registers, torch.Tensor):
        count += registers.shape[1]
    return count


# ------------------------------------------------------------------------------ for CAAP


class _StackedLinear(nn.Module):
    """timm's fused ``qkv`` from HF's separate query, key and value projections (shared)."""

    def __init__(self, query: nn.Linear, key: nn.Linear, value: nn.Linear) -> None:
        super().__init__()
        self.query, self.key, self.value = query, key, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)


def _timm_vision_transformer(model: nn.Module) -> nn.Module:
    """A timm ``VisionTransformer`` computing exactly what the HF ViT ``model`` computes (at
    its configured image size), built from the HF modules: patch projection, class token and
    position embeddings, per block ``layernorm_before`` → ``q/k/v_proj`` → ``o_proj`` and
    ``layernorm_after`` → ``mlp``, the final ``layernorm`` and the ``classifier``. Supports
    ``ViTForImageClassification`` of ``transformers`` ≥ 5 (other layouts: a clear error)."""
    from timm.models.vision_transformer import VisionTransformer

    config = model.config
    _, base = _base(model)
    layers = getattr(base, "layers", None)
    embeddings = getattr(base, "embeddings", None)
    needed = {
        "model_type == 'vit'": getattr(config, "model_type", None) == "vit",
        "vit.layers with q_proj/k_proj/v_proj/o_proj and mlp": isinstance(layers, nn.ModuleList)
        and all(
            all(hasattr(layer.attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and hasattr(layer, "mlp")
            for layer in layers
        ),
        "embeddings with cls_token and position_embeddings": all(
            isinstance(getattr(embeddings, n, None), torch.Tensor)
            for n in ("cls_token", "position_embeddings")
        ),
        "a linear classifier": isinstance(getattr(model, "classifier", None), nn.Linear),
    }
    missing = [what for what, present in needed.items() if not present]
    if missing:
        raise ConfigurationError(
            f"this method runs a ViT block by block; for a Hugging Face model that needs a "
            f"ViTForImageClassification (transformers >= 5); {type(model).__name__} lacks: "
            f"{'; '.join(missing)}"
        )
    heads = config.num_attention_heads
    if getattr(config, "head_dim", config.hidden_size // heads) * heads != config.hidden_size:
        raise ConfigurationError(
            f"{type(model).__name__} has head_dim x heads != hidden_size; timm's attention "
            f"cannot represent it"
        )
    with torch.device("meta"):  # every parameter is replaced by the HF model's own below
        vit = VisionTransformer(
            img_size=config.image_size, patch_size=config.patch_size,
            in_chans=config.num_channels, num_classes=config.num_labels,
            embed_dim=config.hidden_size, depth=config.num_hidden_layers, num_heads=heads,
            mlp_ratio=config.intermediate_size / config.hidden_size, qkv_bias=config.qkv_bias,
            class_token=True, global_pool="token",
            norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        )  # fmt: skip
    vit.patch_embed.proj = embeddings.patch_embeddings.projection
    vit.cls_token = embeddings.cls_token
    vit.pos_embed = embeddings.position_embeddings
    for block, layer in zip(vit.blocks, layers, strict=True):
        attention = layer.attention
        block.norm1 = layer.layernorm_before
        block.attn.qkv = _StackedLinear(attention.q_proj, attention.k_proj, attention.v_proj)
        block.attn.proj = attention.o_proj
        block.norm2 = layer.layernorm_after
        block.mlp = layer.mlp
    vit.norm = base.layernorm
    vit.head = model.classifier
    left = [name for name, p in [*vit.named_parameters(), *vit.named_buffers()] if p.is_meta]
    if left:
        raise ConfigurationError(
            f"the timm view of {type(model).__name__} has parameters without HF weights: {left}"
        )
    return vit.train(model.training)
