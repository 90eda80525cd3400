"""One forward pass of a timm ViT that keeps what attention-based attributions read.

Grad-Rollout, T-attn, Bi-attn, T-LRP and InFlow combine, per block, the attention
probabilities ``A = softmax(q kᵀ · scale)`` with their gradient w.r.t. a class score (and T-LRP
with an LRP relevance that needs the block's intermediate tensors). timm's fused attention
does not expose ``A``, so :func:`trace_vit` runs the model block by block with
:mod:`contrastive_saliency.vit_blocks` (timm's order of operations, the model's own modules) and keeps,
per block, the tensors listed in :class:`BlockTrace`; :func:`class_attention_gradients` then
gives ``∂ y_c / ∂ A_b`` for K classes from that one forward: one backward per class, only
activation gradients (never parameter gradients), batched over the images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import _check_classes
from contrastive_saliency.vit_blocks import check_vision_transformer, embed, query_key_value


@dataclass
class BlockTrace:
    """One block's tensors for a batch ``[B, T, D]`` of tokens (eval mode, so dropout,
    drop-path and patch dropout are identities): ``tokens`` X (the residual stream entering
    the block), ``normed`` = norm1(X); ``query``/``key``/``value`` ``[B, H, T, d]`` (after
    q_norm / k_norm); ``attention`` = softmax(q kᵀ · scale) ``[B, H, T, T]``; ``attended`` =
    attention @ value; ``merged`` = the heads merged (after attn.norm and the gate), the input
    of ``attn.proj``; ``attention_update`` = ls1(proj(merged)), the branch added to X;
    ``middle`` = X + attention_update; ``normed_middle`` = norm2(middle); ``hidden`` = the
    input of ``mlp.fc2``; ``mlp_update`` = ls2(mlp(normed_middle)); the block's output is
    ``middle + mlp_update``."""

    tokens: torch.Tensor
    normed: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention: torch.Tensor
    attended: torch.Tensor
    merged: torch.Tensor
    attention_update: torch.Tensor
    middle: torch.Tensor
    normed_middle: torch.Tensor
    hidden: torch.Tensor
    mlp_update: torch.Tensor

    @property
    def output(self) -> torch.Tensor:
        return self.middle + self.mlp_update


@dataclass
class ViTTrace:
    """``blocks`` (first block first; only blocks ``first_traced, …`` have a trace, the earlier
    entries are None), ``head_input`` = head_drop(fc_norm(norm(X_L)[:, 0])) ``[B, D]`` and the
    ``logits`` ``[B, N]`` = head(head_input), which equal ``model(images)``."""

    blocks: list[BlockTrace | None]
    head_input: torch.Tensor
    logits: torch.Tensor


def check_class_token_vit(model: nn.Module, method: str) -> VisionTransformer:
    """The timm ViT of ``model`` (:func:`~contrastive_saliency.vit_blocks.check_vision_transformer`) if its
    head reads the class token (``class_token=True``, ``global_pool='token'``, no attention
    pooling), which every attention rollout's class-token row explains."""
    vit = check_vision_transformer(model, method)
    if not vit.has_class_token or vit.global_pool != "token" or vit.attn_pool is not None:
        raise ConfigurationError(
            f"{method} explains the class token's row of the attention, so it needs a timm "
            f"ViT with class_token=True and global_pool='token' (no attention pooling); got "
            f"class_token={vit.has_class_token}, global_pool={vit.global_pool!r}"
        )
    return vit


@contextmanager
def differentiable_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode with gradients enabled (also inside ``torch.no_grad`` / ``inference_mode``
    callers); the train/eval mode is restored on exit, also on error."""
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def trace_vit(vit: VisionTransformer, images: torch.Tensor, first_traced: int = 0) -> ViTTrace:
    """Run ``vit`` on ``images`` block by block, keeping each block's :class:`BlockTrace`.

    Blocks before ``first_traced`` run without a graph (their traces are None); the residual
    stream entering block ``first_traced`` is made a graph leaf, so the attentions of blocks
    ``first_traced, …`` and everything after them are differentiable whether or not the
    model's parameters require gradients. Call inside :func:`differentiable_eval`."""
    if images.is_inference():
        images = images.clone()
    with torch.no_grad():
        tokens = embed(vit, images)
        for block in vit.blocks[:first_traced]:
            tokens = block(tokens)
    tokens = tokens.detach().requires_grad_()
    traces: list[BlockTrace | None] = [None] * first_traced
    for block in vit.blocks[first_traced:]:
        trace = _trace_block(block, tokens)
        traces.append(trace)
        tokens = trace.output
    head_input = vit.head_drop(vit.fc_norm(vit.norm(tokens)[:, 0]))
    return ViTTrace(traces, head_input, vit.head(head_input))


def _trace_block(block: nn.Module, tokens: torch.Tensor) -> BlockTrace:
    attention_module = block.attn
    normed = block.norm1(tokens)
    query, key, value = query_key_value(attention_module, normed)
    attention = ((query * attention_module.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
    attended = attention @ value
    merged = attention_module.norm(attended.transpose(-3, -2).flatten(-2))
    gate = getattr(attention_module, "gate", None)
    if gate is not None:
        merged = merged * gate(normed).sigmoid()
    attention_update = block.ls1(attention_module.proj(merged))
    middle = tokens + attention_update
    normed_middle = block.norm2(middle)
    captured: list[torch.Tensor] = []
    handle = block.mlp.fc2.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        mlp_update = block.ls2(block.mlp(normed_middle))
    finally:
        handle.remove()
    return BlockTrace(
        tokens, normed, query, key, value, attention, attended, merged, attention_update,
        middle, normed_middle, captured[0], mlp_update,
    )  # fmt: skip


def check_mlp(vit: VisionTransformer, method: str) -> None:
    """Every block's MLP has an ``fc2`` linear layer (its input is kept in the trace)."""
    for index, block in enumerate(vit.blocks):
        if not isinstance(getattr(block.mlp, "fc2", None), nn.Linear):
            raise ConfigurationError(
                f"{method} reads the input of each block's mlp.fc2; blocks.{index}.mlp is "
                f"{type(block.mlp).__name__} without an nn.Linear fc2"
            )


def class_scores(trace: ViTTrace, classes: torch.Tensor) -> torch.Tensor:
    """``logits[b, classes[b, k]]`` ``[B, K]`` (class indices checked)."""
    classes = classes.to(trace.logits.device)
    _check_classes(classes, trace.logits.shape[1])
    return trace.logits.gather(1, classes)


def class_attention_gradients(
    scores: torch.Tensor, attentions: Sequence[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, ...]]:
    """For k = 0 … K−1: ``(∂ Σ_b scores[b, k] / ∂ A)`` for every ``A`` in ``attentions`` — per
    image its own gradient, since the images do not interact in eval mode. One backward pass
    per class through the graph of one forward (kept until the last class)."""
    count = scores.shape[1]
    for k in range(count):
        yield torch.autograd.grad(scores[:, k].sum(), list(attentions), retain_graph=k < count - 1)


def class_token_row(matrix: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """The class token's row of ``matrix`` ``[..., T, T]`` at the patch tokens, as the patch
    grid ``[..., h, w]`` (register tokens are dropped)."""
    return matrix[..., 0, prefix:].unflatten(-1, grid)


def identity_like(matrix: torch.Tensor) -> torch.Tensor:
    """The identity ``[T, T]`` in the dtype and on the device of ``matrix`` ``[..., T, T]``."""
    return torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
