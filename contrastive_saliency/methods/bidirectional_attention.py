"""Bidirectional attention ("Bi-attn", Chen et al. 2023) for timm ViTs."""

from __future__ import annotations

import torch
from torch import nn

from contrastive_saliency.methods._vit_attention import IntegratedAttentionMethod
from contrastive_saliency.methods.registry import register_method
from contrastive_saliency.vit_attention import (
    class_attention_gradients,
    class_scores,
    class_token_row,
    differentiable_eval,
    identity_like,
    trace_vit,
)
from contrastive_saliency.vit_blocks import patch_grid


@register_method("bidirectional_attention")
class BidirectionalAttention(IntegratedAttentionMethod):
    """Bi-attn (Chen, Li, Yu, Dou & Xiong, "Beyond Intuition: Rethinking Token Attributions
    inside Transformers", TMLR 2023), the head-wise variant ("Ours-H"): attention perception
    (a head-weighted attention rollout) times reasoning feedback (an integrated gradient of
    the last attention map).

    Attention perception, for class c: per block b ≥ ``first_block`` with probabilities
    ``A_{b,h}`` and gradients ``G_{b,h} = ∂y_c/∂A_{b,h}`` at the image, the head importance
    ``I_h = mean_{ij} |A_{b,h}ᵀ G_{b,h}|``, normalised to sum 1 over the heads (all-zero
    importances stay 0), the fused map ``Ã_b = Σ_h I_h A_{b,h}``, and ``R ← R + Ã_b R`` from
    ``R = I``. Reasoning feedback: ``W_c = mean_h max(0, (1/S) Σ_{α ∈ linspace(0, 1, S)}
    ∂y_c(α·x)/∂A_{L−1}(α·x))`` (``steps`` S = 20; baseline α = 0: the zero input). The map is
    the class token's row of ``W_c ⊙ R`` (element-wise) at the patch tokens, raw.

    Source: the paper's text is not in this project's library (its abstract names the two
    parts and the integrated gradient of the last attention map); the equations are the
    authors' public code (jiaminchen-1031/transformerinterp, ``Baselines.generate_ours``, the
    head-wise method its README runs). Their ``start_layer=4`` skips blocks with index
    < start_layer − 1, i.e. the first block used is index 3: the default ``first_block=3``
    here (0-based). Their code normalises the head importances over the heads of the whole
    batch (it runs one image at a time); here per image. K classes share the passes: one
    traced forward of the images with one backward per class (the gradients of every used
    block, and the α = 1 term of the integral), and the S − 1 other scaled images in forward
    passes of at most ``batch_size`` images, each with one backward per class through the
    last block only.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        first_block: int = 3,
        steps: int = 20,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, layer, first_block, steps, batch_size)

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        grid = patch_grid(self.vit, images)
        prefix = self.vit.num_prefix_tokens
        classes = classes.to(images.device)
        with differentiable_eval(self.vit):
            trace = trace_vit(self.vit, images, self.first_block)
            attentions = [block.attention for block in trace.blocks[self.first_block :]]
            perceptions, last_gradients = [], []
            for gradients in class_attention_gradients(class_scores(trace, classes), attentions):
                perceptions.append(attention_perception(attentions, gradients))
                last_gradients.append(gradients[-1])
            feedback = self.integrated_feedback(images, classes, torch.stack(last_gradients, 1))
        return class_token_row(feedback * torch.stack(perceptions, dim=1), prefix, grid)


def attention_perception(
    attentions: list[torch.Tensor], gradients: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """``R = Π_b (I + Ã_b)`` (last block leftmost), ``Ã_b = Σ_h I_h A_{b,h}`` with the
    normalised head importances ``I_h ∝ mean |A_hᵀ G_h|``; ``[B, T, T]``."""
    relevance: torch.Tensor | None = None
    for attention, gradient in zip(attentions, gradients, strict=True):
        attention = attention.detach()
        importance = (attention.transpose(-2, -1) @ gradient).abs().mean(dim=(-2, -1))  # [B, H]
        importance = importance / importance.sum(dim=1, keepdim=True).clamp_min(
            torch.finfo(importance.dtype).tiny
        )
        fused = (importance[..., None, None] * attention).sum(dim=1)
        if relevance is None:
            relevance = identity_like(fused).expand_as(fused)
        relevance = relevance + fused @ relevance
    if relevance is None:
        raise ValueError("attention_perception needs at least one block")
    return relevance
