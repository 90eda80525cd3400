"""Attention rollout (Abnar & Zuidema, ACL 2020) for timm ViTs."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.registry import register_method
from contrastive_saliency.vit_blocks import (
    check_vision_transformer,
    evaluating,
    patch_grid,
    query_key_value,
)

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS = ("mean", "max", "min")


@register_method("attention_rollout")
class AttentionRollout(SaliencyMethod):
    """Attention rollout (Abnar & Zuidema, ACL 2020, Sec. 3, the rollout equation
    ``Ã(l_i) = A(l_i) Ã(l_{i-1})`` with ``A = 0.5 W_att + 0.5 I``).

    Per block, the attention probabilities ``softmax(q kᵀ/√d)`` are fused over heads
    (``head_fusion``: ``"mean"`` as the paper, or ``"max"``/``"min"`` as common
    implementations offer); with ``discard_ratio = r > 0`` the ``⌊r·T²⌋`` smallest entries of
    each fused ``T × T`` matrix are set to 0, never the class token's entry on itself (as the
    common implementation, jacobgil/vit-explain); then ``A = 0.5·fused + 0.5·I`` with rows
    re-normalised to sum to 1, and the rollout is the product ``A_L ⋯ A_1``. The map is the
    class token's row restricted to the patch tokens, on the ``[h, w]`` grid (register tokens
    take part in the products but are not in the map). Raw values, no normalisation.

    Class-agnostic: the rollout does not depend on the class, so every requested class gets
    the same map. The probabilities are recomputed from each block's attention input (a
    forward pre-hook on ``blocks[i].attn``) with the module's own ``qkv``, ``q_norm``,
    ``k_norm`` and ``scale``, since timm's fused attention does not expose them. Needs a timm
    ViT with a class token read by the head (``global_pool='token'``).
    """

    class_agnostic = True

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        head_fusion: HeadFusion = "mean",
        discard_ratio: float = 0.0,
    ) -> None:
        super().__init__(model)
        if layer is not None:
            raise ConfigurationError(
                f"attention_rollout multiplies the attention of every block; it takes no "
                f"layer, got layer={layer!r}"
            )
        vit = check_vision_transformer(model, "attention_rollout")
        if not vit.has_class_token or vit.global_pool != "token":
            raise ConfigurationError(
                f"attention_rollout reads the class token's row, so it needs a timm ViT with "
                f"class_token=True and global_pool='token'; got class_token="
                f"{vit.has_class_token}, global_pool={vit.global_pool!r}"
            )
        check_fusion(head_fusion, discard_ratio)
        self.vit = vit
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        height, width = patch_grid(self.vit, images)
        with evaluating(self.vit):
            attentions = attention_probabilities(self.vit, images)
            rollout = attention_rollout(attentions, self.head_fusion, self.discard_ratio)
        patches = rollout[:, 0, self.vit.num_prefix_tokens :]
        maps = patches.reshape(images.shape[0], 1, height, width)
        return maps.expand(-1, classes.shape[1], -1, -1).contiguous()


def check_fusion(head_fusion: str, discard_ratio: float) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ConfigurationError(
            f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}"
        )
    if not 0.0 <= discard_ratio < 1.0:
        raise ConfigurationError(f"discard_ratio must lie in [0, 1), got {discard_ratio}")


def attention_probabilities(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """``softmax(q kᵀ · scale)`` of every block, ``[B, heads, T, T]`` each, from one forward
    pass of ``model.forward_features`` (a timm ViT, see
    :func:`contrastive_saliency.vit_blocks.check_vision_transformer`); the hooks are removed on exit."""
    attentions: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple) -> None:
        query, key, _ = query_key_value(module, args[0])
        attentions.append(((query * module.scale) @ key.transpose(-2, -1)).softmax(dim=-1))

    handles = [block.attn.register_forward_pre_hook(record) for block in model.blocks]
    try:
        model.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    return attentions


def attention_rollout(
    attentions: list[torch.Tensor], head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """The rollout ``A_L ⋯ A_1`` ``[B, T, T]`` of per-block probabilities ``[B, heads, T, T]``
    (first block first), ``A = rownorm(0.5·fuse(P) + 0.5·I)``; rows sum to 1."""
    check_fusion(head_fusion, discard_ratio)
    rollout: torch.Tensor | None = None
    for probabilities in attentions:
        if head_fusion == "mean":
            fused = probabilities.mean(dim=1)
        elif head_fusion == "max":
            fused = probabilities.amax(dim=1)
        else:
            fused = probabilities.amin(dim=1)
        if discard_ratio > 0:
            fused = discard_smallest(fused, discard_ratio)
        identity = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        step = 0.5 * fused + 0.5 * identity
        step = step / step.sum(dim=-1, keepdim=True)
        rollout = step if rollout is None else step @ rollout
    if rollout is None:
        raise ConfigurationError("attention rollout needs at least one block's attention")
    return rollout


def discard_smallest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[B, T, T]`` with the ``⌊ratio·T²⌋`` smallest entries of each matrix set to 0, the
    ``[0, 0]`` (class token on itself) entry excepted."""
    flat = fused.flatten(1)
    count = int(flat.shape[1] * ratio)
    if count == 0:
        return fused
    candidates = flat.clone()
    candidates[:, 0] = float("inf")
    smallest = candidates.topk(min(count, flat.shape[1] - 1), dim=1, largest=False).indices
    return flat.scatter(1, smallest, 0.0).view_as(fused)
