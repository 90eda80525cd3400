"""What the class-sensitive attention attributions of timm ViTs share: the model checks, the
call under eval mode with gradients, and the integrated attention gradient of T-attn and
Bi-attn (their "reasoning feedback")."""

from __future__ import annotations

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.vit_attention import (
    check_class_token_vit,
    check_mlp,
    class_attention_gradients,
    trace_vit,
)


class ViTAttentionMethod(SaliencyMethod):
    """A method over the attention of every block of a timm ViT whose head reads the class
    token (also a Hugging Face ViT through ``as_vision_transformer()``); it takes no layer."""

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        super().__init__(model)
        name = getattr(type(self), "registered_name", type(self).__name__)
        if layer is not None:
            raise ConfigurationError(
                f"{name} combines the attention of the ViT's blocks; it takes no layer, got "
                f"layer={layer!r}"
            )
        self.vit = check_class_token_vit(model, name)
        check_mlp(self.vit, name)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def check_block(self, option: str, value: int) -> int:
        """``value`` if it indexes a block (0-based), else an error naming ``option``."""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.depth:
            name = getattr(type(self), "registered_name", type(self).__name__)
            raise ConfigurationError(
                f"{name}: {option} is a 0-based block index in [0, {self.depth - 1}] for this "
                f"ViT of {self.depth} blocks, got {value!r}"
            )
        return value


class IntegratedAttentionMethod(ViTAttentionMethod):
    """A method weighted by the integrated gradient of the last attention map (T-attn's
    class weights, Bi-attn's reasoning feedback): ``first_block``, ``steps`` S of
    α ∈ linspace(0, 1, S), ``batch_size`` scaled images per forward pass."""

    def __init__(
        self,
        model: nn.Module,
        layer: str | None,
        first_block: int,
        steps: int,
        batch_size: int | None,
    ) -> None:
        super().__init__(model, layer)
        self.first_block = self.check_block("first_block", first_block)
        check_steps(steps, batch_size)
        self.steps = steps
        self.batch_size = batch_size

    def integrated_feedback(
        self, images: torch.Tensor, classes: torch.Tensor, at_one: torch.Tensor
    ) -> torch.Tensor:
        """``mean_h max(0, (1/S) Σ_α ∂y_c(α·x)/∂A_{L−1}(α·x))`` ``[B, K, T, T]`` given the
        α = 1 term ``at_one`` ``[B, K, H, T, T]`` (the caller's traced forward of the images);
        the other S − 1 scaled images run here."""
        alphas = torch.linspace(0.0, 1.0, self.steps, dtype=torch.float64)[:-1]
        total = at_one + scaled_attention_gradients(self, images, classes, alphas, self.batch_size)
        return (total / self.steps).clamp(min=0).mean(dim=2)


def check_steps(steps: int, batch_size: int | None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigurationError(
            f"steps is the number of points α ∈ linspace(0, 1, steps) of the integrated "
            f"gradient (α = 1 included); it must be an integer ≥ 2, got {steps!r}"
        )
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ConfigurationError(
            f"batch_size bounds the scaled images per forward pass: a positive integer or None "
            f"(all at once), got {batch_size!r}"
        )


def scaled_attention_gradients(
    method: ViTAttentionMethod,
    images: torch.Tensor,
    classes: torch.Tensor,
    alphas: torch.Tensor,
    batch_size: int | None,
) -> torch.Tensor:
    """``Σ_α ∂ y_c(α·x) / ∂ A_L(α·x)`` over ``alphas`` ``[S]``: the gradient of each class score
    w.r.t. the last block's attention probabilities on the scaled images, ``[B, K, H, T, T]``.

    The S·B scaled images run in forward passes of at most ``batch_size`` images (None: all
    at once); only the last block is traced (the earlier ones run without a graph), and each
    pass takes one backward per class through that block and the head. ``classes`` must be
    valid indices on the images' device (the caller's :func:`class_scores` checks them), so
    the passes ask the device for no host value."""
    batch = images.shape[0]
    scaled = (alphas.to(images)[:, None, None, None, None] * images).flatten(0, 1)
    rows = torch.arange(scaled.shape[0], device=images.device) % batch  # the image of each row
    chunk = scaled.shape[0] if batch_size is None else batch_size
    total: torch.Tensor | None = None
    for start in range(0, scaled.shape[0], chunk):
        owners = rows[start : start + chunk]
        trace = trace_vit(method.vit, scaled[start : start + chunk], method.depth - 1)
        attention = trace.blocks[-1].attention
        scores = trace.logits.gather(1, classes[owners])  # checked by the caller's trace
        gradients = torch.stack(
            [g for (g,) in class_attention_gradients(scores, [attention])], dim=1
        )  # [rows, K, H, T, T]
        if total is None:
            total = gradients.new_zeros((batch, *gradients.shape[1:]))
        total.index_add_(0, owners, gradients)
    if total is None:
        raise ConfigurationError("the integrated attention gradient needs at least one α")
    return total
