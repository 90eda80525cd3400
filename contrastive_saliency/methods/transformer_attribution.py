"""Transformer attribution ("T-LRP", Chefer, Gur & Wolf, CVPR 2021) for timm ViTs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastive_saliency.methods._vit_attention import ViTAttentionMethod
from contrastive_saliency.methods.registry import register_method
from contrastive_saliency.transformer_lrp import check_lrp_blocks, relevance_propagation
from contrastive_saliency.vit_attention import (
    class_attention_gradients,
    class_scores,
    class_token_row,
    differentiable_eval,
    identity_like,
    trace_vit,
)
from contrastive_saliency.vit_blocks import patch_grid


@register_method("transformer_attribution")
class TransformerAttribution(ViTAttentionMethod):
    """Transformer attribution (T-LRP; Chefer, Gur & Wolf, "Transformer Interpretability Beyond
    Attention Visualization", CVPR 2021, Sec. 3 "Relevance and gradient diffusion").

    For class c, per block b: ``R_b`` = the LRP relevance of the attention probabilities
    ``A_b`` for the output relevance one-hot(c) (:mod:`contrastive_saliency.transformer_lrp`: the paper's
    rules as the authors' code implements them), ``∇A_b = ∂y_c/∂A_b``, and
    ``Ā_b = I + E_h[(∇A_b ⊙ R_b)⁺]`` (the positive part taken per head, then the mean over
    heads, as the code); ``C = Ā_{L−1} ⋯ Ā_{first_block}`` (no row normalisation; the later
    block on the left, as the code's ``compute_rollout_attention``), and the map is the class
    token's row of C at the patch tokens, raw.

    Matches the authors' public code (hila-chefer/Transformer-Explainability,
    ``ViT_LRP.py`` ``relprop(method="transformer_attribution")``, ``start_layer=0`` =
    ``first_block``) except: their ``relprop`` reads image 0 of the batch only and the
    residual rule sums over the whole batch (they run one image); here every image is
    explained with its own sums. What the rules approximate (LayerNorm, GELU and softmax pass
    relevance unchanged, biases get none) is listed in :mod:`contrastive_saliency.transformer_lrp`.

    Cost: one traced forward, one relevance pass down to ``first_block`` for all K classes
    (the class-independent denominators of the rules computed once) and one backward per
    class (the attention gradients), batched over the images; only activation gradients.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, first_block: int = 0) -> None:
        super().__init__(model, layer)
        check_lrp_blocks(self.vit)
        self.first_block = self.check_block("first_block", first_block)

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        grid = patch_grid(self.vit, images)
        prefix = self.vit.num_prefix_tokens
        classes = classes.to(images.device)
        with differentiable_eval(self.vit):
            trace = trace_vit(self.vit, images, self.first_block)
            scores = class_scores(trace, classes)
            attentions = [block.attention for block in trace.blocks[self.first_block :]]
            # the relevance pass: arithmetic on the trace, all classes at once, in the
            # parameters' precision (under autocast its divisions would run in half precision)
            with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
                one_hot = F.one_hot(classes, trace.logits.shape[1])
                output_relevance = one_hot.to(self.vit.head.weight.dtype)  # [B, K, N]
                _, relevances = relevance_propagation(
                    self.vit, trace, output_relevance, self.first_block
                )
            maps = []
            for k, gradients in enumerate(class_attention_gradients(scores, attentions)):
                with torch.no_grad():
                    class_relevances = [relevance[:, k] for relevance in relevances]
                    maps.append(relevance_rollout(gradients, class_relevances))
        return class_token_row(torch.stack(maps, dim=1), prefix, grid)


def relevance_rollout(
    gradients: tuple[torch.Tensor, ...], relevances: list[torch.Tensor]
) -> torch.Tensor:
    """``Π_b (I + E_h[(∇A_b ⊙ R_b)⁺])`` with the later block on the left, ``[B, T, T]``."""
    rollout: torch.Tensor | None = None
    for gradient, relevance in zip(gradients, relevances, strict=True):
        step = (gradient * relevance).clamp(min=0).mean(dim=1)
        step = step + identity_like(step)
        rollout = step if rollout is None else step @ rollout
    if rollout is None:
        raise ValueError("relevance_rollout needs at least one block")
    return rollout
