"""Gradient-weighted attention rollout ("Grad-Rollout", jacobgil/vit-explain) for timm ViTs."""

from __future__ import annotations

import torch
from torch import nn

from contrastive_saliency.methods._vit_attention import ViTAttentionMethod
from contrastive_saliency.methods.attention_rollout import attention_rollout, check_fusion
from contrastive_saliency.methods.registry import register_method
from contrastive_saliency.vit_attention import (
    class_attention_gradients,
    class_scores,
    class_token_row,
    differentiable_eval,
    trace_vit,
)
from contrastive_saliency.vit_blocks import patch_grid


@register_method("grad_rollout")
class GradRollout(ViTAttentionMethod):
    """Grad-Rollout: attention rollout (Abnar & Zuidema, ACL 2020, Sec. 3) of the attention
    weighted by its gradient, as jacobgil/vit-explain's ``grad_rollout`` (the method VAR's
    Table 1 lists as Grad-Rollout; there is no paper of its own).

    Per block b and class c, ``Â_b = max(0, mean_h(A_b ⊙ ∂y_c/∂A_b))`` (A: the attention
    probabilities ``[heads, T, T]``; the ReLU after the head mean, as the reference); with
    ``discard_ratio = r`` the ``⌊r·T²⌋`` smallest entries of ``Â_b`` are set to 0, the class
    token's own entry excepted; then ``M_b = rownorm(0.5·Â_b + 0.5·I)`` and the map is the
    class token's row of ``M_L ⋯ M_1`` at the patch tokens (raw, no normalisation).

    Differences from the reference code, all of which are bugs there: it pairs each block's
    attention with the gradient of the block in the reversed order (backward hooks fire last
    block first; vit-explain issue #6), here each block gets its own gradient; its
    ``a / a.sum(dim=-1)`` divides column j by row sum j (a broadcasting slip), here the rows
    are normalised as in the rollout equation; it discards entries of the first image of the
    batch only and may discard the class token's own entry (the exclusion is commented out),
    here every image is treated alike and the ``[0, 0]`` entry is kept, as in this project's
    ``attention_rollout``; it divides the map by its maximum, here raw values. The default
    ``discard_ratio=0.9`` is the reference's (``VITAttentionGradRollout``).

    Cost: one forward pass and one backward pass per class (K classes per call, batched over
    the images), only activation gradients.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, discard_ratio: float = 0.9):
        super().__init__(model, layer)
        check_fusion("mean", discard_ratio)
        self.discard_ratio = discard_ratio

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        grid = patch_grid(self.vit, images)
        prefix = self.vit.num_prefix_tokens
        with differentiable_eval(self.vit):
            trace = trace_vit(self.vit, images)
            attentions = [block.attention for block in trace.blocks]
            maps = []
            for gradients in class_attention_gradients(class_scores(trace, classes), attentions):
                weighted = [
                    (attention.detach() * gradient).mean(dim=1, keepdim=True).clamp(min=0)
                    for attention, gradient in zip(attentions, gradients, strict=True)
                ]
                rollout = attention_rollout(weighted, "mean", self.discard_ratio)
                maps.append(class_token_row(rollout, prefix, grid))
        return torch.stack(maps, dim=1)
