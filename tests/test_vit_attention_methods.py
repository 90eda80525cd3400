"""The class-sensitive attention attributions of ViTs (VAR's Table 1 ViT rows): Grad-Rollout,
T-attn, Bi-attn, T-LRP and InFlow.

Checked: parity with one-image float64 references of the authors' code
(tests/vit_attention_references.py: attention and gradients recorded by hooks on timm's
non-fused attention, LRP rules evaluated with autograd as the authors' ``relprop``),
class dependence, one call for K classes of B images = one call per image and class,
closed forms (uniform attention: T-attn's and Bi-attn's rollouts are powers of two times the
last map; a head without class evidence gives zero maps; LRP conserves relevance), the
Hugging Face ViT through its timm view, VAR over T-attn and T-LRP (and its refusal of
class-agnostic rollout and Eigen-CAM on the same ViT), and the errors.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.transformer_lrp import relevance_propagation
from contrastive_saliency.vit_attention import differentiable_eval, trace_vit
from tests import vit_attention_references as reference
from tests.tiny_models import TinyCAMNet

pytestmark = pytest.mark.usefixtures("one_thread")
NUM_CLASSES = 5
METHODS = (
    "grad_rollout",
    "transition_attention",
    "bidirectional_attention",
    "transformer_attribution",
    "inflow",
)
# Sized for a 3-block ViT (the papers' defaults assume 12 blocks).
OPTIONS = {
    "transition_attention": {"first_block": 1, "steps": 5},
    "bidirectional_attention": {"first_block": 1, "steps": 5},
}


def small_vit(depth: int = 3, **kwargs) -> torch.nn.Module:
    """32×32 images, 8×8 patches; query/key weights scaled up so attention is not uniform."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
        num_classes=NUM_CLASSES, **kwargs,
    )  # fmt: skip
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return small_vit()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


CLASSES = torch.tensor([[0, 3], [4, 1]])


def grid_maps64(name: str, model, images, classes, **options) -> torch.Tensor:
    """The method's float64 maps on the patch grid ``[B, K, h, w]``."""
    method = create_method(name, copy.deepcopy(model).double(), **options)
    return method.compute(images.double(), classes)


def test_trace_reproduces_the_model(vit, images) -> None:
    with differentiable_eval(vit):
        trace = trace_vit(vit, images)
    with torch.no_grad():
        expected = vit(images)
    torch.testing.assert_close(trace.logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "options", "compute_reference"),
    [
        pytest.param(
            "grad_rollout", {"discard_ratio": 0.0},
            lambda r, x, c: reference.grad_rollout(r, x, c, 0.0), id="grad_rollout",
        ),
        pytest.param(
            "grad_rollout", {"discard_ratio": 0.9},
            lambda r, x, c: reference.grad_rollout(r, x, c, 0.9), id="grad_rollout-discard",
        ),
        pytest.param(
            "transition_attention", {"first_block": 1, "steps": 5, "batch_size": 3},
            lambda r, x, c: reference.transition_attention(r, x, c, 1, 5), id="t_attn",
        ),
        pytest.param(
            "bidirectional_attention", {"first_block": 1, "steps": 5},
            lambda r, x, c: reference.bidirectional_attention(r, x, c, 2, 5), id="bi_attn",
        ),
        pytest.param(
            "transformer_attribution", {},
            lambda r, x, c: reference.transformer_attribution(r, x, c), id="t_lrp",
        ),
        pytest.param(
            "transformer_attribution", {"first_block": 1},
            lambda r, x, c: reference.transformer_attribution(r, x, c, 1), id="t_lrp-start1",
        ),
        pytest.param("inflow", {}, reference.inflow, id="inflow"),
    ],
)  # fmt: skip
def test_equals_the_authors_formula_on_one_image_at_a_time(
    vit, images, name, options, compute_reference
) -> None:
    images = images.double()  # the references scale the images by α in float64 too
    maps = grid_maps64(name, vit, images, CLASSES, **options)
    recorder = reference.Recorder(vit)
    for image in range(2):
        for k in range(2):
            expected = compute_reference(
                recorder, images[image : image + 1], int(CLASSES[image, k])
            )
            torch.testing.assert_close(maps[image, k].flatten(), expected, rtol=1e-7, atol=1e-12)
    assert maps.abs().amax() > 0


@pytest.mark.parametrize("name", METHODS)
def test_maps_depend_on_the_class_and_batching_changes_nothing(vit, images, name) -> None:
    """Two classes of an image get different maps; one call for 2 images × 2 classes equals
    one call per image and class (rows are independent, classes share the passes)."""
    method = create_method(name, vit, **OPTIONS.get(name, {}))
    maps = method(images, CLASSES)
    assert maps.shape == (2, 2, 32, 32) and maps.dtype == torch.float32
    for image in range(2):
        difference = (maps[image, 0] - maps[image, 1]).abs().amax()
        assert difference > 1e-2 * maps[image].abs().amax() > 0, name
        for k in range(2):
            alone = method(images[image : image + 1], CLASSES[image : image + 1, k])
            torch.testing.assert_close(alone[0, 0], maps[image, k], rtol=1e-4, atol=1e-8)


def uniform_attention_vit() -> torch.nn.Module:
    """Zero query and key weights: every attention row is uniform, ``A = 11ᵀ/T``."""
    model = small_vit()
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * dim] = 0
            block.attn.qkv.bias[: 2 * dim] = 0
    return model


def test_uniform_attention_closed_forms(images) -> None:
    """With ``U = 11ᵀ/T`` (``U² = U``): T-attn's state is ``(1/T)·2^m`` after m blocks of
    ``s ← sU + s``, and Bi-attn's perception ``(I + U)^n = I + (2^n − 1)U``; both multiply the
    same integrated last-attention gradient, so
    T-attn(first_block = f) = 2^{L−1−f} · T-attn(first_block = L−1) and
    Bi-attn(first_block = f) = (2^{L−f} − 1) · T-attn(first_block = L−1)."""
    model = uniform_attention_vit()
    depth, steps = 3, 4
    last = grid_maps64("transition_attention", model, images, CLASSES, first_block=2, steps=steps)
    assert last.abs().amax() > 0
    for first in (0, 1):
        t_attn = grid_maps64(
            "transition_attention", model, images, CLASSES, first_block=first, steps=steps
        )
        torch.testing.assert_close(t_attn, 2 ** (depth - 1 - first) * last)
        bi_attn = grid_maps64(
            "bidirectional_attention", model, images, CLASSES, first_block=first, steps=steps
        )
        torch.testing.assert_close(bi_attn, (2 ** (depth - first) - 1) * last)


@pytest.mark.parametrize("name", METHODS)
def test_a_head_without_class_evidence_gives_zero_maps(images, name) -> None:
    """A head with zero weights (constant logits): every class gradient is zero, so no
    attention is class-weighted and every map is exactly 0 — a method that let class-agnostic
    attention through would not be."""
    model = small_vit()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.normal_()
    maps = create_method(name, model, **OPTIONS.get(name, {}))(images, CLASSES)
    assert torch.equal(maps, torch.zeros_like(maps))


def test_lrp_conserves_relevance(vit, images) -> None:
    """Chefer et al.'s rules redistribute the whole one-hot relevance: it sums to 1 over the
    tokens entering every block (up to the 1e-9 stabiliser)."""
    model = copy.deepcopy(vit).double()
    with differentiable_eval(model), torch.no_grad():
        trace = trace_vit(model, images.double())
        one_hot = torch.nn.functional.one_hot(CLASSES, NUM_CLASSES).double()  # [B, K, N]
        for first in range(3):
            tokens, attentions = relevance_propagation(model, trace, one_hot, first)
            assert len(attentions) == 3 - first
            totals = tokens.sum(dim=(2, 3))
            torch.testing.assert_close(totals, torch.ones(2, 2, dtype=torch.float64))


def test_register_tokens_stay_out_of_the_map(images) -> None:
    """With register tokens the map is the class token's row at the patch tokens only."""
    model = small_vit(reg_tokens=2)
    maps = grid_maps64("grad_rollout", model, images, CLASSES, discard_ratio=0.0)
    recorder = reference.Recorder(model)
    expected = reference.grad_rollout(recorder, images[:1], 0, 0.0)[2:]  # drop the registers
    torch.testing.assert_close(maps[0, 0].flatten(), expected)
    for name in METHODS:
        assert create_method(name, model, **OPTIONS.get(name, {}))(images, CLASSES).shape == (
            2, 2, 32, 32,
        )  # fmt: skip


@pytest.mark.parametrize("base", ["transition_attention", "transformer_attribution"])
def test_var_over_the_transformer_bases_is_non_zero_and_class_dependent(vit, images, base):
    """Issue 19's acceptance: VAR over T-attn and T-LRP on a small timm ViT."""
    var = create_method("var", vit, base=base, base_kwargs=OPTIONS.get(base, {}))
    maps = var(images, CLASSES)
    assert maps.abs().amax() > 0
    for image in range(2):
        assert (maps[image, 0] - maps[image, 1]).abs().amax() > 0


@pytest.mark.parametrize(
    ("base", "layer"), [("attention_rollout", None), ("eigen_cam", "blocks.2.norm1")]
)
def test_var_refuses_a_class_agnostic_base_on_the_vit(vit, base, layer) -> None:
    """Issue 19's acceptance: over rollout or Eigen-CAM every class gets the same map, so VAR
    refuses them on the same ViT (each builds on it alone)."""
    maps = create_method(base, vit, layer)(torch.randn(1, 3, 32, 32), torch.tensor([[0, 3]]))
    torch.testing.assert_close(maps[:, 0], maps[:, 1])  # class-agnostic indeed
    with pytest.raises(ConfigurationError, match=rf"var base '{base}' is class-agnostic"):
        create_method("var", vit, layer, base=base)


def test_the_hugging_face_vit_through_its_timm_view(images) -> None:
    transformers = pytest.importorskip("transformers")
    from contrastive_saliency.huggingface import HuggingFaceClassifier

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=64, num_labels=NUM_CLASSES,
    )  # fmt: skip
    model = HuggingFaceClassifier(transformers.ViTForImageClassification(config).eval())
    recorder = reference.Recorder(model.as_vision_transformer())
    for name, compute_reference in [
        ("transformer_attribution", reference.transformer_attribution),
        ("inflow", reference.inflow),
    ]:
        maps = grid_maps64(name, model, images, CLASSES)
        expected = compute_reference(recorder, images[1:].double(), int(CLASSES[1, 0]))
        torch.testing.assert_close(maps[1, 0].flatten(), expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", METHODS)
def test_errors_say_what_is_wrong(vit, name) -> None:
    with pytest.raises(ConfigurationError, match="no layer"):
        create_method(name, vit, layer="blocks.0")
    with pytest.raises(ConfigurationError, match="VisionTransformer"):
        create_method(name, TinyCAMNet())
    pooled = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
        num_classes=NUM_CLASSES, global_pool="avg",
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="global_pool='token'"):
        create_method(name, pooled)
    if name in ("transition_attention", "bidirectional_attention", "transformer_attribution"):
        with pytest.raises(ConfigurationError, match=r"first_block .* \[0, 2\]"):
            create_method(name, vit, first_block=3)
    if name in ("transition_attention", "bidirectional_attention"):
        with pytest.raises(ConfigurationError, match="steps"):
            create_method(name, vit, first_block=1, steps=1)
        with pytest.raises(ConfigurationError, match="batch_size"):
            create_method(name, vit, first_block=1, batch_size=0)
