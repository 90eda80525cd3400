"""Layer-wise relevance propagation through a timm ViT, with the rules of Chefer, Gur & Wolf
(CVPR 2021, "Transformer Interpretability Beyond Attention Visualization", Sec. 3 "Relevance
propagation" and "Non parametric relevance propagation") as their public code implements
them (hila-chefer/Transformer-Explainability, ``modules/layers_ours.py``, ``ViT_LRP.py``).

zennit has no rules for attention, matrix products of two activations or LayerNorm, so the
rules are written here as tensor operations on the traced forward
(:func:`contrastive_saliency.vit_attention.trace_vit`), batched over the images and over K classes (the
relevances carry a class dimension; the class-independent denominators are computed once):

- ``nn.Linear`` (qkv, proj, fc1, fc2, head): the αβ rule with α = 1, β = 0 (paper Eq. 4,
  only the positive contributions ``x_j w_ji > 0``), bias excluded:
  ``R_j = x⁺_j Σ_i w⁺_ij s_i + x⁻_j Σ_i w⁻_ij s_i``, ``s = R / (W⁺x⁺ + W⁻x⁻)``.
- ``A·B`` of two activations (``q kᵀ`` and ``attention · v``): the z-rule on both operands
  (paper Eq. 6), ``R_A = A ⊙ ((R/Z) Bᵀ)``, ``R_B = B ⊙ (Aᵀ (R/Z))``, each halved (the
  code's ``/ 2``; Eq. 8's normalisation gives the same when both halves carry equal mass).
- residual additions ``a + b``: the z-rule, then each operand rescaled so that its share of
  the total relevance is ``|Σ R_a| / (|Σ R_a| + |Σ R_b|)`` (paper Eqs. 7–8); sums per image
  (the code sums over its batch of one).
- LayerNorm, GELU (any elementwise activation), softmax, dropout, LayerScale, identity norms:
  relevance passes unchanged, as in the code (an approximation: these layers are not
  conservative-by-rule, their relevance is simply copied).
- a tensor used twice (the residual stream before each branch) and the class-token pool:
  the code's z-rule ``R_x = x ⊙ Σ_i safe_divide(R_i, x)`` (``Clone``, ``IndexSelect``), the
  sum of the branches' relevances up to the stabiliser.

Division: ``safe_divide(a, b) = a / (b + 1e-9) · 1[b ≠ 0]`` (the code's stabiliser). Not
supported (a clear error): gated attention (the gate's product has no rule here) and MLPs
other than fc1 → elementwise activation → fc2 (GLU/SwiGLU MLPs multiply two activations).
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.vit_attention import BlockTrace, ViTTrace

STABILISER = 1e-9


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / (denominator + 1e-9)``, 0 where the denominator is exactly 0."""
    shifted = denominator + STABILISER
    shifted = torch.where(shifted == 0, torch.full_like(shifted, STABILISER), shifted)
    return torch.where(denominator != 0, numerator / shifted, torch.zeros_like(shifted))


def linear_relevance(
    inputs: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor
) -> torch.Tensor:
    """αβ rule (α = 1, β = 0) of ``y = x Wᵀ`` (bias excluded): ``inputs`` ``[B, ..., in]``,
    ``weight`` ``[out, in]``, ``relevance`` of the outputs for K classes ``[B, K, ..., out]``
    → ``[B, K, ..., in]`` (the class-independent denominators computed once)."""
    inputs, weight = inputs.unsqueeze(1).to(relevance.dtype), weight.to(relevance.dtype)
    positive_w, negative_w = weight.clamp(min=0), weight.clamp(max=0)
    positive_x, negative_x = inputs.clamp(min=0), inputs.clamp(max=0)
    activation = positive_x @ positive_w.T + negative_x @ negative_w.T
    scaled = safe_divide(relevance, activation)
    return positive_x * (scaled @ positive_w) + negative_x * (scaled @ negative_w)


def product_relevance(
    left: torch.Tensor, right: torch.Tensor, relevance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """z-rule of ``Z = left @ right`` (``[B, ..., n, m]`` @ ``[B, ..., m, p]``) on both operands,
    each halved, for ``relevance`` ``[B, K, ..., n, p]``: ``(R_left, R_right)``."""
    left, right = left.unsqueeze(1).to(relevance.dtype), right.unsqueeze(1).to(relevance.dtype)
    scaled = safe_divide(relevance, left @ right)
    return (
        left * (scaled @ right.transpose(-2, -1)) / 2,
        right * (left.transpose(-2, -1) @ scaled) / 2,
    )


def sum_relevance(
    first: torch.Tensor, second: torch.Tensor, relevance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of the operands of ``first + second`` (``[B, ...]``) for ``relevance``
    ``[B, K, ...]``, each operand's total rescaled to its share
    ``|Σ R_first| / (|Σ R_first| + |Σ R_second|)`` of ``Σ R`` per image and class."""
    first = first.unsqueeze(1).to(relevance.dtype)
    second = second.unsqueeze(1).to(relevance.dtype)
    scaled = safe_divide(relevance, first + second)
    parts = first * scaled, second * scaled
    dims = tuple(range(2, relevance.dim()))
    totals = [part.sum(dim=dims, keepdim=True) for part in parts]
    magnitude = totals[0].abs() + totals[1].abs()
    whole = relevance.sum(dim=dims, keepdim=True)
    return tuple(
        part * safe_divide(safe_divide(total.abs(), magnitude) * whole, total)
        for part, total in zip(parts, totals, strict=True)
    )


def copy_relevance(inputs: torch.Tensor, relevances: list[torch.Tensor]) -> torch.Tensor:
    """Relevance ``[B, K, ...]`` of a tensor ``[B, ...]`` that feeds several branches:
    ``x ⊙ Σ_i safe_divide(R_i, x)``."""
    inputs = inputs.unsqueeze(1).to(relevances[0].dtype)
    return inputs * sum(safe_divide(relevance, inputs) for relevance in relevances)


def linear_weight(module: nn.Module, name: str) -> torch.Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear``, or of the stacked query/key/value
    projections of a Hugging Face ViT seen as timm's ``qkv``."""
    if isinstance(module, nn.Linear):
        return module.weight
    parts = [getattr(module, part, None) for part in ("query", "key", "value")]
    if all(isinstance(part, nn.Linear) for part in parts):
        return torch.cat([part.weight for part in parts])
    raise ConfigurationError(
        f"transformer_attribution propagates relevance through {name} as a linear layer; it "
        f"is {type(module).__name__}"
    )


def check_lrp_blocks(vit: VisionTransformer) -> None:
    """The blocks and head the rules above cover; a clear error otherwise."""
    if not isinstance(vit.head, nn.Linear):
        raise ConfigurationError(
            f"transformer_attribution needs a linear classification head; got "
            f"{type(vit.head).__name__}"
        )
    for index, block in enumerate(vit.blocks):
        if getattr(block.attn, "gate", None) is not None:
            raise ConfigurationError(
                f"transformer_attribution has no LRP rule for gated attention (blocks.{index}"
                f".attn.gate multiplies two activations)"
            )
        mlp = block.mlp
        plain = type(mlp) is Mlp or type(mlp).__name__ == "ViTMLP"
        if not plain or not isinstance(getattr(mlp, "fc1", None), nn.Linear):
            raise ConfigurationError(
                f"transformer_attribution's rules cover MLPs fc1 → activation → fc2 (timm Mlp, "
                f"Hugging Face ViTMLP); blocks.{index}.mlp is {type(mlp).__name__}"
            )
        linear_weight(block.attn.qkv, f"blocks.{index}.attn.qkv")


def relevance_propagation(
    vit: VisionTransformer, trace: ViTTrace, output_relevance: torch.Tensor, first_block: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """LRP from the logits down to the input of block ``first_block``, for K relevances
    ``output_relevance`` ``[B, K, N]`` of the logits at once (Chefer et al.: the one-hot of
    each explained class): ``(relevance of that block's input tokens [B, K, T, D], relevance
    of the attention probabilities [B, K, H, T, T] of blocks first_block … L−1, first block
    first)``; the latter are the halved ``R_A`` the code saves as ``attn_cam``. Every rule
    above conserves the total up to the stabiliser, so the tokens' relevance sums to
    ``Σ output_relevance`` per image and class."""
    head_relevance = linear_relevance(trace.head_input, vit.head.weight, output_relevance)
    tokens = trace.blocks[-1].tokens
    relevance = head_relevance.new_zeros((*head_relevance.shape[:2], *tokens.shape[1:]))
    relevance[:, :, 0] = copy_relevance(trace.head_input, [head_relevance])  # class-token pool
    found = []
    pairs = zip(vit.blocks[first_block:], trace.blocks[first_block:], strict=True)
    for block, record in reversed(list(pairs)):
        relevance, attention_relevance = _block_relevance(block, record, relevance)
        found.append(attention_relevance)
    return relevance, found[::-1]


def _block_relevance(
    block: nn.Module, record: BlockTrace, relevance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(relevance of the block's input tokens, relevance of its attention probabilities)."""
    middle, mlp_part = sum_relevance(record.middle, record.mlp_update, relevance)
    hidden = linear_relevance(record.hidden, block.mlp.fc2.weight, mlp_part)
    mlp_input = linear_relevance(record.normed_middle, block.mlp.fc1.weight, hidden)
    middle = copy_relevance(record.middle, [middle, mlp_input])
    tokens, update = sum_relevance(record.tokens, record.attention_update, middle)
    merged = linear_relevance(record.merged, block.attn.proj.weight, update)
    heads, head_dim = record.attended.shape[1], record.attended.shape[-1]
    attended = merged.unflatten(-1, (heads, head_dim)).transpose(-3, -2)  # [B, K, H, T, d]
    attention, value = product_relevance(record.attention, record.value, attended)
    query, key = product_relevance(record.query, record.key.transpose(-2, -1), attention)
    stacked = torch.cat(
        [part.transpose(-3, -2).flatten(-2) for part in (query, key.transpose(-2, -1), value)],
        dim=-1,
    )
    qkv_weight = linear_weight(block.attn.qkv, "attn.qkv")
    attention_input = linear_relevance(record.normed, qkv_weight, stacked)
    return copy_relevance(record.tokens, [tokens, attention_input]), attention
