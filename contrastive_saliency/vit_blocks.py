"""Running a timm ``VisionTransformer`` piece by piece with the model's own weights.

Methods that intervene inside a ViT (CAAP) or read its attention probabilities (attention
rollout) need the pieces of timm's forward separately: the token embedding, each block's
queries/keys/values, the rest of a block for a chosen set of query tokens, and the head on
class-token states. The order of operations is timm's (``vision_transformer.py``, ``Block``,
``Attention``): ``patch_embed → _pos_embed → patch_drop → norm_pre``, then per block
``x + drop_path1(ls1(proj(norm(attention(q_norm(q), k_norm(k), v)) · gate)))`` on
``norm1(x)``, then ``x + drop_path2(ls2(mlp(norm2(x))))``; finally ``norm`` and
``forward_head`` (pool, ``fc_norm``, ``head``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from contrastive_saliency.errors import ConfigurationError

SUPPORTED_MODELS = (
    "timm VisionTransformer models (ViT, DeiT, DeiT III, CLIP and DINOv2 image towers as timm "
    "builds them, with or without register tokens) whose blocks are timm Block with Attention"
)

# Methods timm subclasses override when they change the token sequence or the head (e.g.
# VisionTransformerDistilled adds a distillation token and a second head).
_FORWARD_METHODS = ("forward", "forward_features", "forward_head", "_pos_embed")


def check_vision_transformer(model: nn.Module, method: str) -> VisionTransformer:
    """``model`` if it is a supported timm ViT, else a :class:`ConfigurationError` naming what
    ``method`` supports and why ``model`` is not it. A model that offers
    ``as_vision_transformer()`` (e.g. :class:`contrastive_saliency.huggingface.HuggingFaceClassifier` of a
    Hugging Face ViT) is checked and used in that form."""
    if not isinstance(model, VisionTransformer) and callable(
        getattr(model, "as_vision_transformer", None)
    ):
        model = model.as_vision_transformer()
    if not isinstance(model, VisionTransformer):
        raise ConfigurationError(
            f"{method} works on {SUPPORTED_MODELS}; got {type(model).__name__}, which is not a "
            f"timm VisionTransformer (CNNs and other architectures have no token sequence to "
            f"intervene on)"
        )
    overridden = [
        name
        for name in _FORWARD_METHODS
        if getattr(type(model), name) is not getattr(VisionTransformer, name)
    ]
    if overridden:
        raise ConfigurationError(
            f"{method} works on {SUPPORTED_MODELS}; {type(model).__name__} overrides "
            f"{', '.join(overridden)} (e.g. a distilled DeiT with a distillation token), so its "
            f"token sequence or head differs from VisionTransformer's"
        )
    for index, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise ConfigurationError(
                f"{method} works on {SUPPORTED_MODELS}; blocks.{index} is "
                f"{type(block).__name__} with {type(getattr(block, 'attn', None)).__name__} "
                f"attention (post-norm, parallel, differential and RoPE blocks compute "
                f"differently)"
            )
    return model


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block: eval mode (dropout, drop-path and patch dropout off) and
    ``torch.no_grad``; the train/eval mode is restored on exit, also on error."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def embed(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The sequence entering ``blocks[0]``, ``[B, T, D]`` with ``T = prefix + h·w`` (class
    token, register tokens, then patch tokens in row-major order), as ``forward_features``."""
    tokens = model.patch_embed(images)
    tokens = model._pos_embed(tokens)
    tokens = model.patch_drop(tokens)
    return model.norm_pre(tokens)


def patch_grid(model: VisionTransformer, images: torch.Tensor) -> tuple[int, int]:
    """``(h, w)`` of the patch-token grid for ``images`` ``[B, C, H, W]``."""
    if model.dynamic_img_size:
        height, width = model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        return int(height), int(width)
    height, width = model.patch_embed.grid_size
    return int(height), int(width)


def block_inputs(model: VisionTransformer, tokens: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``[X_0, ..., X_count]`` where ``X_0 = tokens`` and ``X_{b+1} = blocks[b](X_b)``: the
    residual stream entering each block (``X_L`` is the output of the last block)."""
    states = [tokens]
    for block in model.blocks[:count]:
        states.append(block(states[-1]))
    return states


def query_key_value(
    attention: Attention, normed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` of ``attention`` for ``normed = norm1(x)`` ``[..., N, D]``, each
    ``[..., heads, N, head_dim]``, with timm's ``q_norm``/``k_norm`` applied."""
    *lead, tokens, _ = normed.shape
    qkv = attention.qkv(normed).reshape(*lead, tokens, 3, attention.num_heads, -1)
    qkv = qkv.movedim(-3, 0).transpose(-3, -2)  # [3, ..., heads, N, head_dim]
    query, key, value = qkv.unbind(0)
    return attention.q_norm(query), attention.k_norm(key), value


def finish_block(
    block: Block, x: torch.Tensor, attended: torch.Tensor, normed: torch.Tensor
) -> torch.Tensor:
    """The block's output for the query tokens ``x`` ``[..., N, D]`` given their attention
    result ``attended`` ``[..., heads, N, head_dim]`` (softmax(q kᵀ/√d) v, before the head
    merge) and ``normed = norm1(x)`` (the gate's input in gated attention)."""
    attention = block.attn
    merged = attended.transpose(-3, -2).flatten(-2)  # [..., N, heads·head_dim]
    merged = attention.norm(merged)
    gate = getattr(attention, "gate", None)
    if gate is not None:
        merged = merged * gate(normed).sigmoid()
    update = attention.proj_drop(attention.proj(merged))
    x = x + block.drop_path1(block.ls1(update))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def class_token_logits(model: VisionTransformer, class_tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[M, classes]`` from final class-token states ``[M, D]`` (the output of the last
    block at position 0): ``forward_head(norm(x))`` with token pooling."""
    return model.forward_head(model.norm(class_tokens.unsqueeze(1)))
