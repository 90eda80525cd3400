"""CAAP (caap.md Alg. 1, Sec. 3.1–3.3): the parallel form equals the per-patch loop, which
runs timm's own blocks on each patched sequence; closed forms with every / no patch selected;
the E-CAAP approximation's deviation; errors. Random-init tiny ViTs (4×4 patch grids)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer

import contrastive_saliency.methods.caap  # noqa: F401  (registers "caap")
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.methods.caap import CAAP, selection_matrix
from tests.tiny_models import TinyCAMNet

NUM_CLASSES = 5
SELECTIONS = ["none", "box1", "box2", "manhattan"]


pytestmark = pytest.mark.usefixtures("one_thread")


def small_vit(**kwargs) -> VisionTransformer:
    """4 blocks on 32×32 images with 8×8 patches; query/key weights scaled up so attention is
    far from uniform and the maps vary across patches (parity is then not trivial)."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
        num_classes=NUM_CLASSES, **kwargs,
    )  # fmt: skip
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    # the normalisation timm.create_model records (CAAP's default white blank reads it)
    model.pretrained_cfg = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    return model.eval()


def without_normalisation(model: VisionTransformer) -> VisionTransformer:
    del model.pretrained_cfg
    return model


MODELS = {
    "vit": lambda: small_vit(),
    "registers": lambda: small_vit(reg_tokens=2),
    # DeiT III / CLIP / DINOv2 features: layer scale, qk-norm, pre-norm, no class pos-embed.
    "layerscale_qknorm_prenorm": lambda: small_vit(
        init_values=0.1, qk_norm=True, pre_norm=True, no_embed_class=True
    ),
    "vit_tiny_64": lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=64
    ).eval(),
}


def inputs(model: VisionTransformer) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.patch_embed.img_size
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, *size, generator=generator)
    return images, torch.tensor([[0, 3], [4, 1]])


def spread(maps: torch.Tensor) -> float:
    """Smallest max−min over the patches of any map: how far from constant the maps are."""
    return float((maps.amax(dim=(2, 3)) - maps.amin(dim=(2, 3))).min())


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_parallel_equals_per_patch_loop(name: str, selection: str) -> None:
    model = MODELS[name]()
    images, classes = inputs(model)
    loop = CAAP(model, mode="loop", selection=selection, patch_batch_size=7)
    parallel = CAAP(model, mode="parallel", selection=selection, patch_batch_size=5)
    expected = loop.compute(images, classes)
    actual = parallel.compute(images, classes)
    assert actual.shape == (2, 2, 4, 4)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert spread(expected) > 1e-3  # the maps vary far beyond the tolerance


@pytest.mark.parametrize("layers", [(0, 4), (0, 0), (2, 2), (1, 3), (3, 4), (4, 4)])
def test_parallel_equals_loop_for_layer_ranges(layers: tuple[int, int]) -> None:
    """Every split of the blocks into class-token-only and propagated parts, including no
    intervened block before (``l_s = l_e``) or after (``l_e = L``) the split."""
    model = small_vit(reg_tokens=1)
    images, classes = inputs(model)
    expected = CAAP(model, mode="loop", layers=layers).compute(images, classes)
    actual = CAAP(model, layers=layers).compute(images, classes)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_layer_range_and_selection_change_the_map() -> None:
    """The default range is (1, ⌈2L/3⌉) = (1, 3) for L = 4, and the options reach the result."""
    model = small_vit()
    images, classes = inputs(model)
    default = CAAP(model).compute(images, classes)
    torch.testing.assert_close(CAAP(model, layers=(1, 3)).compute(images, classes), default)
    assert (CAAP(model, layers=(1, 2)).compute(images, classes) - default).abs().max() > 1e-3
    assert (CAAP(model, selection="none").compute(images, classes) - default).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["parallel", "loop"])
@pytest.mark.parametrize("layers", [(0, 4), (0, 2)])
def test_every_patch_selected_gives_the_source_logits(mode: str, layers) -> None:
    """``S(p)`` = all patches from the embedding on: the patched context is the source image,
    whatever block the propagation starts at."""
    model = small_vit()
    images, _ = inputs(model)
    every_class = torch.arange(NUM_CLASSES).expand(2, -1)
    selection = torch.ones(16, 16, dtype=torch.bool)
    maps = CAAP(model, mode=mode, selection=selection, layers=layers).compute(images, every_class)
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(maps, logits[:, :, None, None].expand_as(maps), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("mode", "precompute"), [("parallel", False), ("loop", False), ("parallel", True)]
)
def test_no_patch_selected_gives_the_blank_logits(mode: str, precompute: bool) -> None:
    """``S(p) = ∅``: only blank activations, so the blank image's logits. E-CAAP with the
    weighted prototype is exact here: the class token's query is the blank one."""
    model = small_vit(reg_tokens=2)
    images, _ = inputs(model)
    colour = torch.tensor([0.5, -1.0, 2.0])
    every_class = torch.arange(NUM_CLASSES).expand(2, -1)
    method = CAAP(
        model,
        mode=mode,
        selection=torch.zeros(16, 16, dtype=torch.bool),
        blank=colour,
        precompute_blank=precompute,
        blank_prototype="weighted",
    )
    maps = method.compute(images, every_class)
    with torch.no_grad():
        blank_logits = model(colour.view(1, 3, 1, 1).expand(1, 3, 32, 32))
    torch.testing.assert_close(
        maps, blank_logits[:, :, None, None].expand_as(maps), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("prototype", ["mean", "weighted"])
def test_precompute_blank_deviation_is_reported(prototype: str) -> None:
    model = small_vit(reg_tokens=2)
    images, classes = inputs(model)
    exact = CAAP(model).compute(images, classes)
    approximate = CAAP(model, precompute_blank=True, blank_prototype=prototype)
    deviation = (approximate.compute(images, classes) - exact).abs()
    relative = float(deviation.max() / exact.abs().max())
    print(
        f"E-CAAP ({prototype}) max abs deviation {float(deviation.max()):.3g}, rel {relative:.3g}"
    )
    assert torch.isfinite(deviation).all()
    assert 0 < relative < 0.5  # an approximation that is in use, and of the right size


def test_named_blank_uses_the_data_or_the_model_normalisation() -> None:
    """``blank="white"`` (the default, Sec. 4.4) is pixel value 1 normalised with the data's
    ``normalisation=(mean, std)`` when given, else with ``pretrained_cfg`` mean/std."""
    model = MODELS["vit_tiny_64"]()
    images, classes = inputs(model)
    mean = torch.tensor(model.pretrained_cfg["mean"])
    std = torch.tensor(model.pretrained_cfg["std"])
    white = CAAP(model).compute(images, classes)
    explicit = CAAP(model, blank=(1.0 - mean) / std).compute(images, classes)
    torch.testing.assert_close(white, explicit)
    assert (CAAP(model, blank="zeros").compute(images, classes) - white).abs().max() > 1e-4
    data = ([0.2, 0.3, 0.4], [0.5, 0.6, 0.7])  # e.g. a datamodule's own statistics
    white_in_data = CAAP(model, normalisation=data).compute(images, classes)
    black_in_data = CAAP(model, blank="black", normalisation=data).compute(images, classes)
    colour = (1.0 - torch.tensor(data[0])) / torch.tensor(data[1])
    torch.testing.assert_close(white_in_data, CAAP(model, blank=colour).compute(images, classes))
    black = -torch.tensor(data[0]) / torch.tensor(data[1])
    torch.testing.assert_close(black_in_data, CAAP(model, blank=black).compute(images, classes))
    assert (white_in_data - white).abs().max() > 1e-4


def test_selection_operators_closed_form() -> None:
    """Set sizes on a 5×5 grid: corner, edge, centre (Sec. 3.1, Fig. 5)."""
    corner, edge, centre = 0, 2, 12
    sizes = {
        "none": (1, 1, 1),
        "box1": (4, 6, 9),
        "box2": (9, 15, 25),
        "manhattan": (3, 4, 5),
    }
    for operator, expected in sizes.items():
        matrix = selection_matrix(operator, (5, 5))
        assert torch.equal(matrix, matrix.T)
        assert tuple(int(matrix[p].sum()) for p in (corner, edge, centre)) == expected
    box1 = selection_matrix("box1", (5, 5))[centre].view(5, 5)
    assert box1[1:4, 1:4].all() and int(box1.sum()) == 9


def test_registry_call_contract_and_model_left_unchanged() -> None:
    model = small_vit().train()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    method = create_method("caap", model)
    images, classes = inputs(model)
    maps = method(images, classes[:, 0])
    assert maps.shape == (2, 1, 32, 32) and maps.dtype == torch.float32
    assert model.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize(
    ("build", "kwargs", "message"),
    [
        (lambda: TinyCAMNet(), {}, "not a timm VisionTransformer"),
        (lambda: small_vit(global_pool="avg"), {}, "global_pool='token'"),
        (lambda: small_vit(), {"layer": "blocks.1"}, "layers=(first, last)"),
        (lambda: small_vit(), {"layers": (3, 2)}, "0 <= first <= last <= 4"),
        (lambda: small_vit(), {"layers": (0, 5)}, "0 <= first <= last <= 4"),
        (lambda: small_vit(), {"selection": "box3"}, "box1"),
        (lambda: small_vit(), {"mode": "loop", "precompute_blank": True}, "mode='parallel'"),
        (lambda: small_vit(), {"blank": "grey"}, "zeros, white, black"),
        (lambda: without_normalisation(small_vit()), {}, "normalisation=(mean, std)"),
        (lambda: small_vit(), {"normalisation": ([0.5] * 3, [0.0] * 3)}, "positive std"),
        (lambda: small_vit(), {"selection": torch.ones(9, 9, dtype=torch.bool)}, "[16, 16]"),
    ],
)
def test_clear_errors(build, kwargs, message: str) -> None:
    model = build()
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        method = CAAP(model, **kwargs)
        method(torch.randn(1, 3, 32, 32), torch.tensor([0]))


@pytest.mark.slow
def test_parallel_equals_loop_vit_tiny_224() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[2, 7]])
    expected = CAAP(model, mode="loop", patch_batch_size=28).compute(images, classes)
    actual = CAAP(model).compute(images, classes)
    assert actual.shape == (1, 2, 14, 14)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert spread(expected) > 1e-3


def test_noise_blanks_of_fig_4() -> None:
    """``noisy``: i.i.d. N(0, noise_std²) in normalised space, one image drawn from
    ``noise_seed``; ``blur_noisy``: the white blank plus that noise, blurred (11×11, σ 5). A
    Gaussian blur with reflect padding keeps a constant, so blur(white + ε) = white + blur(ε)."""
    from torchvision.transforms.functional import gaussian_blur

    model = small_vit()
    images, classes = inputs(model)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    noisy = CAAP(model, blank="noisy", noise_seed=3).compute(images, classes)
    torch.testing.assert_close(noisy, CAAP(model, blank=noise).compute(images, classes))
    half = CAAP(model, blank="noisy", noise_seed=3, noise_std=0.5).compute(images, classes)
    torch.testing.assert_close(half, CAAP(model, blank=0.5 * noise).compute(images, classes))
    white = (1.0 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    blurred_noise = gaussian_blur(noise, [11, 11], [5.0, 5.0])
    assert blurred_noise.std() < 0.5 * noise.std()  # the blur smooths the noise
    blur_noisy = CAAP(model, blank="blur_noisy", noise_seed=3).compute(images, classes)
    expected = CAAP(model, blank=white.view(1, 3, 1, 1) + blurred_noise).compute(images, classes)
    torch.testing.assert_close(blur_noisy, expected, atol=1e-5, rtol=1e-5)
    # one blank for every image: an image alone gets the map it gets in the batch
    alone = CAAP(model, blank="noisy", noise_seed=3).compute(images[1:], classes[1:])
    torch.testing.assert_close(alone, noisy[1:])
    other_seed = CAAP(model, blank="noisy", noise_seed=4).compute(images, classes)
    assert (other_seed - noisy).abs().max() > 1e-4
    # noisy needs no normalisation; blur_noisy adds the noise to the white blank, so it does
    CAAP(without_normalisation(small_vit()), blank="noisy")
    with pytest.raises(ConfigurationError, match="normalisation"):
        CAAP(without_normalisation(small_vit()), blank="blur_noisy")
    with pytest.raises(ConfigurationError, match="noise_std"):
        CAAP(model, blank="noisy", noise_std=0.0)
