"""Attention rollout (Abnar & Zuidema 2020): parity with a naive per-image rollout of the
probabilities timm's own non-fused attention computes, row sums, closed forms, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import contrastive_saliency.methods.attention_rollout  # noqa: F401  (registers "attention_rollout")
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.methods.attention_rollout import (
    AttentionRollout,
    attention_probabilities,
    attention_rollout,
)
from tests.tiny_models import TinyCAMNet

NUM_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def small_vit(depth: int = 3, **kwargs) -> VisionTransformer:
    """32×32 images, 8×8 patches; query/key weights scaled up so attention is not uniform."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=4,
        num_classes=NUM_CLASSES, **kwargs,
    )  # fmt: skip
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model.eval()


def timm_probabilities(model: VisionTransformer, images: torch.Tensor) -> list[np.ndarray]:
    """Probabilities from timm's non-fused path: the input of ``attn_drop`` in every block."""
    reference = copy.deepcopy(model)
    recorded: list[np.ndarray] = []
    for block in reference.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(
            lambda module, args, output: recorded.append(args[0].double().numpy())
        )
    with torch.no_grad():
        reference(images)
    return recorded


def naive_rollout(
    probabilities: list[np.ndarray], image: int, fusion: str, discard_ratio: float
) -> np.ndarray:
    """One image, explicit matrices, block by block: ``R ← rownorm(0.5·A + 0.5·I) R``."""
    result = None
    for block in probabilities:
        heads = block[image]
        fused = {"mean": heads.mean(0), "max": heads.max(0), "min": heads.min(0)}[fusion]
        size = fused.shape[0]
        count = int(size * size * discard_ratio)
        if count:
            flat = fused.reshape(-1).copy()
            order = [i for i in np.argsort(flat, kind="stable") if i != 0][:count]
            flat[order] = 0.0
            fused = flat.reshape(size, size)
        step = 0.5 * fused + 0.5 * np.eye(size)
        step = step / step.sum(axis=1, keepdims=True)
        result = step if result is None else step @ result
    return result


@pytest.mark.parametrize(
    ("fusion", "discard_ratio"), [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.3)]
)
@pytest.mark.parametrize("registers", [0, 2])
def test_equals_naive_rollout_of_timm_attention(fusion, discard_ratio, registers) -> None:
    model = small_vit(reg_tokens=registers)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([[0, 3], [4, 1]])
    maps = AttentionRollout(model, head_fusion=fusion, discard_ratio=discard_ratio).compute(
        images, classes
    )
    probabilities = timm_probabilities(model, images)
    assert len(probabilities) == 3
    prefix = 1 + registers
    for image in range(2):
        rollout = naive_rollout(probabilities, image, fusion, discard_ratio)
        expected = torch.from_numpy(rollout[0, prefix:].reshape(4, 4)).float()
        for k in range(2):  # class-agnostic: the same map for every class
            torch.testing.assert_close(maps[image, k], expected, atol=1e-6, rtol=1e-5)
    assert float(maps.amax() - maps.amin()) > 1e-3  # attention is far from uniform


def test_rollout_rows_sum_to_one() -> None:
    model = small_vit(reg_tokens=1)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        attentions = attention_probabilities(model, images)
    for fusion, ratio in [("mean", 0.0), ("max", 0.5), ("min", 0.9)]:
        rollout = attention_rollout(attentions, fusion, ratio)
        assert rollout.shape == (2, 18, 18)
        assert (rollout >= 0).all()
        torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 18))


def test_identity_attention_one_block_closed_form() -> None:
    """One block attending only to itself: ``0.5·I + 0.5·I = I``; the class token's row has
    no mass on any patch."""
    identity = torch.eye(17).expand(2, 3, 17, 17)
    torch.testing.assert_close(attention_rollout([identity]), torch.eye(17).expand(2, 17, 17))


@pytest.mark.parametrize("depth", [1, 3])
def test_uniform_attention_closed_form(depth: int) -> None:
    """Zero queries give uniform attention ``U = 11ᵀ/T``; ``(0.5U + 0.5I)^L = 0.5^L I +
    (1 − 0.5^L) U``, so every patch gets ``(1 − 0.5^L)/T`` from the class token."""
    model = small_vit(depth=depth)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:32].zero_()
            block.attn.qkv.bias[:32].zero_()
    maps = create_method("attention_rollout", model)(torch.randn(1, 3, 32, 32), torch.tensor([2]))
    assert maps.shape == (1, 1, 32, 32)
    expected = (1 - 0.5**depth) / 17
    torch.testing.assert_close(maps, torch.full_like(maps, expected))


def test_model_left_unchanged_and_hooks_removed() -> None:
    model = small_vit().train()
    AttentionRollout(model)(torch.randn(1, 3, 32, 32), torch.tensor([0]))
    assert model.training
    assert all(not block.attn._forward_pre_hooks for block in model.blocks)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("build", "kwargs", "message"),
    [
        (lambda: TinyCAMNet(), {}, "not a timm VisionTransformer"),
        (lambda: small_vit(global_pool="avg"), {}, "global_pool='token'"),
        (lambda: small_vit(), {"head_fusion": "median"}, "mean, max, min"),
        (lambda: small_vit(), {"discard_ratio": 1.0}, r"\[0, 1\)"),
        (lambda: small_vit(), {"layer": "blocks.0"}, "takes no layer"),
    ],
)
def test_clear_errors(build, kwargs, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        AttentionRollout(build(), **kwargs)
