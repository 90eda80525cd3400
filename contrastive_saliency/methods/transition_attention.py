"""Transition attention maps ("T-attn", Yuan et al. 2021) for timm ViTs."""

from __future__ import annotations

import torch
from torch import nn

from contrastive_saliency.methods._vit_attention import IntegratedAttentionMethod
from contrastive_saliency.methods.registry import register_method
from contrastive_saliency.vit_attention import (
    class_attention_gradients,
    class_scores,
    differentiable_eval,
    trace_vit,
)
from contrastive_saliency.vit_blocks import patch_grid


@register_method("transition_attention")
class TransitionAttention(IntegratedAttentionMethod):
    """Transition attention maps (T-attn; Yuan, Li, Xiong, Cao & Dou, "Explaining Information
    Flow Inside Vision Transformers Using Markov Chain", NeurIPS 2021 XAI4Debugging workshop):
    the class token's state propagated backwards through the attention Markov chain, weighted
    by an integrated gradient of the last attention map (the class-specific part).

    With ``Ā_b = mean_h A_b`` (head-averaged attention probabilities of block b, blocks
    0 … L−1) and ``s_{L−1} = Ā_{L−1}[cls, :]``, the state is propagated down to ``first_block``
    with the residual: ``s ← s·Ā_b + s`` for b = L−2, …, first_block. The class weights are
    ``W_c = mean_h max(0, (1/S) Σ_{α ∈ linspace(0, 1, S)} ∂y_c(α·x)/∂A_{L−1}(α·x))[cls, :]``
    (``steps`` S = 20; the ReLU before the head mean; the baseline α = 0 is the zero input of
    the model, i.e. the normalisation's mean colour), and the map is ``s ⊙ W_c`` at the patch
    tokens (raw values).

    Source: the paper's text is not in this project's library; the equations are those of
    the authors' public code (XianrenYty/Transition_Attention_Maps, ``transition_attention_
    maps``, ``with_integral=True``, ``first_state=False``), which the paper links. Its
    evaluation scripts (``interpret_methods.py``, ``del_ins.py``) use ``start_layer=4``, the
    default ``first_block=4`` here (0-based, as theirs); its ``Baselines`` class defaults to 0.
    The code explains one target per image and runs one scaled image batch per α; here K
    classes share the passes: one traced forward of the images (α = 1, whose attentions give
    the state) and the S − 1 other scaled images in forward passes of at most ``batch_size``
    images, each with one backward per class through the last block only.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        first_block: int = 4,
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
            last = trace.blocks[-1].attention
            gradients = class_attention_gradients(class_scores(trace, classes), [last])
            at_one = torch.stack([g for (g,) in gradients], dim=1)  # [B, K, H, T, T]
            weights = self.integrated_feedback(images, classes, at_one)[:, :, 0]  # [B, K, T]
            state = last.detach().mean(dim=1)[:, :1]  # [B, 1, T]
            for block in reversed(trace.blocks[self.first_block : -1]):
                state = state @ block.attention.detach().mean(dim=1) + state
        return (state * weights)[..., prefix:].unflatten(-1, grid)
