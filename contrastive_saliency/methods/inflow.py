"""InFlow (Walker, Ahmed, Jha & Ewetz, AISTATS 2025) for timm ViTs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastive_saliency.methods._vit_attention import ViTAttentionMethod
from contrastive_saliency.methods.registry import register_method
from contrastive_saliency.vit_attention import (
    BlockTrace,
    class_scores,
    class_token_row,
    differentiable_eval,
    trace_vit,
)
from contrastive_saliency.vit_blocks import patch_grid


@register_method("inflow")
class InFlow(ViTAttentionMethod):
    """InFlow (Walker, Ahmed, Jha & Ewetz, "Explaining ViTs Using Information Flow", AISTATS
    2025, PMLR 258:2440–2448): a rollout of per-block transition matrices that combine a
    class-weighted attention with the share of each token's norm carried by the attention and
    MLP branches of the two residual connections.

    Per block b (all blocks) and class c, with probabilities ``A_{b,h}``, ``G = ∂y_c/∂A_b``
    and ``G′ = ∂f_{b,c}/∂A_b`` where ``f_b`` are the logits the head gives on block b's output
    (``head(norm(X_{b+1})[cls])``; ``f_{L−1} = y``):

    - ``I_h = mean_{ij} |A_hᵀ G_h|`` normalised over the heads (all-zero stays 0);
      ``M = max(0, mean_h G′_h ⊙ max_h (I_h A_h))``;
    - per token t, from the L2 norms of the block input X, the attention branch U (added to
      X), their sum X′ and the MLP branch V: ``a_t, u_t = ‖X_t‖, ‖U_t‖`` divided by their sum,
      ``c_t, v_t = ‖X′_t‖, ‖V_t‖`` divided by their sum, ``ρ = (v/c) / Σ_t |v_t/c_t|``;
    - ``P_b = rownorm((M·diag(u) + diag(a)) · diag(ρ ⊙ v + c))``;

    and the map is the class token's row of ``P_{L−1} ⋯ P_0`` at the patch tokens (raw).

    Source: the paper's text is not in this project's library (its abstract describes the
    transition matrices of series, diverging and converging paths); the equations are the
    authors' public code (chasewalker26/InFlow-ViT-Explanation, ``Baselines.generate_InFlow``
    with ``withgrad=True``, ``ablate=0``, ``compute_InFlow``), which the paper links.
    Differences: the code runs one image (it squeezes the batch dimension); here a batch, with
    the per-image arithmetic unchanged. Its branch norms are taken of the attention output
    and of the MLP output as added to the stream; on timm blocks with LayerScale (absent from
    its model) the branches here include it, i.e. they are what is added to the stream.

    Cost: one traced forward; per class one backward for ``G`` of all blocks and one short
    backward per block for ``G′`` (through that block and the head only), batched over the
    images; only activation gradients.
    """

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        super().__init__(model, layer)

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        grid = patch_grid(self.vit, images)
        prefix = self.vit.num_prefix_tokens
        vit = self.vit
        with differentiable_eval(vit):
            trace = trace_vit(vit, images)
            scores = class_scores(trace, classes)
            blocks: list[BlockTrace] = list(trace.blocks)
            attentions = [block.attention for block in blocks]
            block_scores = [
                class_scores_of(vit, block.output, classes) for block in blocks[:-1]
            ] + [scores]
            with torch.no_grad():
                mixing = [residual_mixing(block) for block in blocks]
            maps = []
            for k in range(classes.shape[1]):
                # the short backwards first: the last class's full backward frees the graph
                own = [
                    torch.autograd.grad(score[:, k].sum(), block.attention, retain_graph=True)[0]
                    for score, block in zip(block_scores[:-1], blocks[:-1], strict=True)
                ]
                gradients = torch.autograd.grad(
                    scores[:, k].sum(), attentions, retain_graph=k < classes.shape[1] - 1
                )
                own.append(gradients[-1])  # the last block's classification is the output
                with torch.no_grad():
                    steps = [
                        transition(block.attention, gradient, own_gradient, *shares)
                        for block, gradient, own_gradient, shares in zip(
                            blocks, gradients, own, mixing, strict=True
                        )
                    ]
                    maps.append(rollout(steps))
        return class_token_row(torch.stack(maps, dim=1), prefix, grid)


def class_scores_of(vit: nn.Module, tokens: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The head's class scores ``[B, K]`` on intermediate tokens ``[B, T, D]`` (class token)."""
    logits = vit.head(vit.head_drop(vit.fc_norm(vit.norm(tokens)[:, 0])))
    return logits.gather(1, classes.to(logits.device))


def residual_mixing(block: BlockTrace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token ``[B, T]``: the attention branch's share u and the input's share a of the first
    residual connection, and the diagonal ``ρ ⊙ v + c`` of the second (see :class:`InFlow`)."""
    input_share, update_share = _shares(block.tokens, block.attention_update)
    middle_share, mlp_share = _shares(block.middle, block.mlp_update)
    ratio = F.normalize(mlp_share / middle_share, p=1, dim=-1)
    return input_share, update_share, ratio * mlp_share + middle_share


def _shares(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = torch.stack([first.norm(dim=-1), second.norm(dim=-1)])  # [2, B, T]
    shares = F.normalize(norms, p=1, dim=0)
    return shares[0], shares[1]


def transition(
    attention: torch.Tensor,
    gradient: torch.Tensor,
    own_gradient: torch.Tensor,
    input_share: torch.Tensor,
    update_share: torch.Tensor,
    second_diagonal: torch.Tensor,
) -> torch.Tensor:
    """One block's row-normalised transition matrix ``P_b`` ``[B, T, T]``."""
    attention = attention.detach()
    importance = (attention.transpose(-2, -1) @ gradient).abs().mean(dim=(-2, -1))  # [B, H]
    importance = importance / importance.sum(dim=1, keepdim=True).clamp_min(
        torch.finfo(importance.dtype).tiny
    )
    weighted = (importance[..., None, None] * attention).amax(dim=1)
    weighted = (own_gradient.mean(dim=1) * weighted).clamp(min=0)
    first = weighted * update_share[:, None, :] + torch.diag_embed(input_share)
    matrix = first * second_diagonal[:, None, :]
    return matrix / matrix.sum(dim=-1, keepdim=True)


def rollout(steps: list[torch.Tensor]) -> torch.Tensor:
    """``P_{L−1} ⋯ P_0`` ``[B, T, T]`` (first block first in ``steps``)."""
    result = steps[0]
    for step in steps[1:]:
        result = step @ result
    return result
