"""ClusCAM (contrastive_saliency.methods.cluscam) and its hyper-parameter selection (contrastive_saliency.cluscam_selection)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import contrastive_saliency.methods.cluscam  # noqa: F401  (registers "cluscam")
from contrastive_saliency.cluscam_selection import (
    TwoGaussianMixture,
    curvature_elbow,
    fit_two_gaussians,
    gmm_discard_ratio,
    score_matrix,
    select_hyperparameters,
    temperature_from,
)
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.kmeans import kmeans
from contrastive_saliency.methods.cluscam import (
    CLUSCAM_PRESETS,
    ClusCAM,
    combine,
    normalise_by_upsampled_range,
)
from contrastive_saliency.methods.registry import create_method
from tests.tiny_models import TinyCAMNet

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """``max |actual − expected| <= atol`` (torch.testing imports torch.distributed: seconds)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = float((actual - expected).abs().max())
    assert error <= atol, f"max |difference| {error} > {atol}"


class StridedCAMNet(TinyCAMNet):
    """TinyCAMNet whose layer 'features' is 4x smaller than the input (8x8 maps of a 32x32
    image), so ClusCAM's upsampling and its reduced-space clustering are exercised."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels=channels, num_classes=5)
        self.features = nn.Sequential(nn.Conv2d(3, channels, 5, stride=4, padding=2), nn.ReLU())


def tiny_cnn(channels: int, seed: int = 0) -> StridedCAMNet:
    torch.manual_seed(seed)
    return StridedCAMNet(channels).eval()


def images(batch: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalise_upsample(activations: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Reference ``NormalizeUpsample`` of every channel: explicit upsampling, then min-max."""
    size = (size, size) if isinstance(size, int) else size
    upsampled = F.interpolate(activations, size, mode="bilinear", align_corners=False)
    low = upsampled.amin(dim=(-2, -1), keepdim=True)
    high = upsampled.amax(dim=(-2, -1), keepdim=True)
    return (upsampled - low) / (high - low)


@pytest.mark.parametrize(
    ("grid", "size"),
    [
        ((7, 7), (224, 224)),
        ((4, 5), (64, 70)),
        ((13, 7), (64, 224)),
        ((9, 6), (5, 4)),
        ((1, 4), (8, 8)),
    ],
)
def test_channel_range_found_without_upsampling_equals_the_upsampled_range(grid, size):
    """Upsample(g_i) is NormalizeUpsample(F_i): min 0 and max 1 after explicit upsampling, for
    up- and downsampling, odd ratios and constant maps (→ zeros)."""
    activations = torch.randn(2, 9, *grid, generator=torch.Generator().manual_seed(0)).abs()
    activations[0, 3] = 0.0
    activations[1, 4] = 2.5
    unit = normalise_by_upsampled_range(activations, size)
    upsampled = F.interpolate(unit, size, mode="bilinear", align_corners=False)
    varying = torch.ones(2, 9, dtype=torch.bool)
    varying[0, 3] = varying[1, 4] = False
    assert_close(upsampled.amin(dim=(-2, -1))[varying], torch.zeros(16), atol=1e-6)
    assert_close(upsampled.amax(dim=(-2, -1))[varying], torch.ones(16), atol=1e-6)
    assert unit[0, 3].eq(0).all() and unit[1, 4].eq(0).all()
    reference = normalise_upsample(activations, size)
    assert_close(upsampled[varying], reference[varying], atol=1e-5)


def test_one_group_per_channel_is_a_temperature_score_cam():
    """K = C, r = 0: every group is one channel (each map is its own nearest centre), so
    E^c = Normalize(Σ_i softmax_i(s_i/τ) NormalizeUpsample(A_i)), computed here directly."""
    model, x = tiny_cnn(6), images(2)
    classes = torch.tensor([[0, 3], [2, 4]])
    with torch.no_grad():
        activations = model.features(x)
        base = model(x)
    channels = normalise_upsample(activations, 32)  # [B, C, H, W]
    flat = channels.flatten(2)
    assert torch.cdist(flat, flat)[:, ~torch.eye(6, dtype=torch.bool)].min() > 1e-2  # distinct
    with torch.no_grad():
        masked = model((x[:, None] * channels[:, :, None]).flatten(0, 1)).view(2, 6, -1)
    scores = (
        masked.gather(2, classes[:, None, :].expand(-1, 6, -1)) - base.gather(1, classes)[:, None]
    )
    weights = (scores / 0.3).softmax(dim=1)  # [B, C, K]
    expected = torch.einsum("bck,bchw->bkhw", weights, channels)
    low = expected.amin(dim=(-2, -1), keepdim=True)
    expected = (expected - low) / (expected.amax(dim=(-2, -1), keepdim=True) - low)

    method = ClusCAM(model, num_clusters=6, discard_ratio=0.0, temperature=0.3, batch_size=5)
    maps = method(x, classes)
    assert_close(maps, expected, atol=1e-4)
    meta = method.meta_representations(x, classes)
    assert torch.equal(meta.assignments.sort(dim=1).values, torch.arange(6).expand(2, -1))
    # Each meta-representation is its channel's normalised map; scores are Eq. 5.
    order = meta.assignments.argsort(dim=1)  # group of channel i → channel of group j
    assert_close(meta.maps, channels.gather(1, order[..., None, None].expand_as(channels)), 1e-5)
    assert_close(meta.scores, scores.gather(1, order[..., None].expand(-1, -1, 2)).mT, 1e-4)


def test_clustering_in_the_reduced_space_equals_clustering_upsampled_maps():
    """k-means on T g (dimension h·w) gives the assignments k-means gives on the H·W-pixel
    NormalizeUpsample maps, and M_j is the mean of its group's maps (Eq. 4)."""
    model, x = tiny_cnn(16), images(3)
    method = ClusCAM(model, num_clusters=5, seed=4)
    meta = method.meta_representations(x, torch.zeros(3, 1, dtype=torch.long))
    with torch.no_grad():
        channels = normalise_upsample(model.features(x), 32)
    assignments, _ = kmeans(channels.flatten(2), 5, seed=4)
    assert torch.equal(meta.assignments, assignments)
    one_hot = F.one_hot(assignments, 5).float()  # [B, C, G]
    group_means = (
        torch.einsum("bcg,bchw->bghw", one_hot, channels) / one_hot.sum(1)[..., None, None]
    )
    assert_close(meta.maps, group_means, atol=1e-5)


def test_discarding_and_temperature_softmax_closed_form():
    """Eqs. 6–7 on constructed groups: ⌊0.5·4⌋ = 2 lowest scores dropped, softmax(s/τ) of the
    rest, min-max of the sum."""
    maps = torch.zeros(1, 4, 2, 2)
    maps[0, 0, 0, 0] = maps[0, 1, 0, 1] = maps[0, 2, 1, 0] = maps[0, 3, 1, 1] = 1.0
    scores = torch.tensor([[[0.5, -1.0, 2.0, 0.1]]])
    out = combine(maps, scores, discard_ratio=0.5, temperature=0.5)
    kept = torch.tensor([math.exp(0.5 / 0.5), math.exp(2.0 / 0.5)])
    alpha = kept / kept.sum()
    expected = torch.tensor([[alpha[0], 0.0], [alpha[1], 0.0]]) / alpha[1]
    assert_close(out[0, 0], expected, atol=1e-6)
    # r = 0.29 with 100 groups discards 29 (not int(28.999…) = 28).
    many = combine(
        torch.eye(100).view(1, 100, 10, 10), torch.arange(100.0).view(1, 1, 100), 0.29, 1
    )
    assert (many.flatten(2) > 0).sum() == 71


def test_several_classes_in_one_call_equal_per_class_calls_and_rows_equal_single_images():
    model, x = tiny_cnn(12), images(3, seed=2)
    classes = torch.tensor([[0, 1, 4], [2, 2, 3], [4, 0, 1]])
    method = create_method("cluscam", model, num_clusters=4, discard_ratio=0.25, batch_size=7)
    maps = method(x, classes)
    assert maps.shape == (3, 3, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    for k in range(3):
        assert_close(method(x, classes[:, k]), maps[:, k : k + 1], atol=1e-5)
    for row in range(3):
        assert_close(method(x[row : row + 1], classes[row : row + 1]), maps[row : row + 1], 1e-5)


def test_model_state_hooks_and_gradients_are_untouched():
    model, x = tiny_cnn(8), images(2)
    model.train()
    model.head.weight.requires_grad_(False)
    ClusCAM(model, num_clusters=3)(x, torch.tensor([1, 2]))
    assert model.training and model.features.training
    assert not model.head.weight.requires_grad and model.head.bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_vit_patch_tokens():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6, img_size=64)
    model.eval()
    x = images(2, size=64, seed=3)
    classes = torch.tensor([[0, 5], [3, 1]])
    method = ClusCAM(model, num_clusters=8, preset="vit_b", batch_size=16)  # blocks.11.norm1
    assert method.layer == "blocks.11.norm1" and method.discard_ratio == 0.1493
    maps = method(x, classes)
    assert maps.shape == (2, 2, 64, 64) and torch.isfinite(maps).all()
    assert maps.amax(dim=(-2, -1)).eq(1).all() and maps.amin(dim=(-2, -1)).eq(0).all()
    meta = method.meta_representations(x, classes)
    assert meta.assignments.shape == (2, 192)  # the 192 embedding channels on the 4x4 grid
    assert_close(method(x, classes[:, 1]), maps[:, 1:], atol=1e-5)
    assert_close(method(x[1:], classes[1:]), maps[1:], atol=1e-5)
    # The paper's ViT layer: right after the patch embedding (tokens without the class token).
    embedded = ClusCAM(model, layer="patch_embed", num_clusters=8)(x, classes)
    assert embedded.shape == (2, 2, 64, 64) and torch.isfinite(embedded).all()


def test_presets_follow_table_3_and_explicit_arguments_win():
    for name, preset in CLUSCAM_PRESETS.items():  # Table 3's τ is Eq. 10, rounded to 0.01
        assert (
            abs(preset.temperature - temperature_from(preset.discard_ratio, preset.num_clusters))
            <= 0.0051
        ), name
    model = tiny_cnn(64)
    resnet50 = ClusCAM(model, preset="resnet50")
    assert (resnet50.num_clusters, resnet50.discard_ratio, resnet50.temperature) == (
        45,
        0.5171,
        0.31,
    )
    overridden = ClusCAM(model, preset="resnet50", num_clusters=20, temperature=0.9)
    assert (overridden.num_clusters, overridden.discard_ratio, overridden.temperature) == (
        20,
        0.5171,
        0.9,
    )
    # No preset: the authors' code as one set (K = 10, r = 0.5, τ = 0.5), never mixed with
    # Eq. 10 (which would give τ = 1/ln 6 = 0.558 for that K and r).
    for default in (ClusCAM(model), ClusCAM(model, preset="code")):
        assert (default.num_clusters, default.discard_ratio, default.temperature) == (10, 0.5, 0.5)
    # temperature="eq10": Eq. 10 of the final K and r (e.g. after selecting them, App. B).
    selected = ClusCAM(model, num_clusters=45, discard_ratio=0.5171, temperature="eq10")
    assert selected.temperature == pytest.approx(1 / math.log(1 + 0.5171 * 45))
    assert round(selected.temperature, 2) == CLUSCAM_PRESETS["resnet50"].temperature
    with pytest.raises(ConfigurationError, match=r"unknown ClusCAM preset 'resnet5'.*'code'"):
        ClusCAM(model, preset="resnet5")
    with pytest.raises(ConfigurationError, match="temperature must be > 0 or 'eq10'"):
        ClusCAM(model, temperature="eq11")
    with pytest.raises(ConfigurationError, match=r"discard_ratio must lie in \[0, 1\)"):
        ClusCAM(model, discard_ratio=1.0)
    with pytest.raises(ConfigurationError, match="exceeds the 8 channel maps"):
        ClusCAM(tiny_cnn(8), num_clusters=9)(images(1), torch.tensor([0]))


# ------------------------------------------------------------------------------- selection


def test_curvature_elbow_follows_algorithm_2():
    candidates = [5, 10, 15, 20, 25, 30]
    proxy = [8.0, 4.0, 2.0, 1.5, 1.4, 1.3]
    # S = ΔP/ΔK = −0.8, −0.4, −0.1, −0.02, −0.02 (j = 2..6); C = ΔS/ΔK for j = 3..6.
    chosen, curvature = curvature_elbow(candidates, proxy)
    assert chosen == 15
    assert curvature[:2].isnan().all()
    expected = torch.tensor([0.4 / 5, 0.3 / 5, 0.08 / 5, 0.0], dtype=torch.float64)
    assert_close(curvature[2:], expected, atol=1e-12)
    # Uneven spacing enters both differences: P = K² on 1, 2, 4, 8 → S = 3, 6, 12; C = 1.5, 1.5.
    chosen, curvature = curvature_elbow([1, 2, 4, 8], [1.0, 4.0, 16.0, 64.0])
    assert chosen == 4 and curvature[2:].tolist() == [1.5, 1.5]
    with pytest.raises(ConfigurationError, match="strictly increasing"):
        curvature_elbow([5, 5, 10], [1.0, 2.0, 3.0])


def test_gmm_discard_ratio_on_a_known_bimodal_mixture():
    generator = torch.Generator().manual_seed(0)
    count, fraction = 40_000, 0.3
    low = torch.rand(count, generator=generator) < fraction
    noise = torch.randn(count, generator=generator, dtype=torch.float64)
    scores = torch.where(low, -2.0 + 0.5 * noise, 3.0 + 1.0 * noise).view(400, 100)
    mixture = fit_two_gaussians(scores)
    assert_close(mixture.means, torch.tensor([-2.0, 3.0], dtype=torch.float64), atol=0.03)
    assert_close(mixture.variances, torch.tensor([0.25, 1.0], dtype=torch.float64), atol=0.03)
    ratio = gmm_discard_ratio(scores)
    # Eq. 9 with the true parameters, and the true fraction, agree with the fitted r.
    true = TwoGaussianMixture(
        torch.tensor([fraction, 1 - fraction], dtype=torch.float64),
        torch.tensor([-2.0, 3.0], dtype=torch.float64),
        torch.tensor([0.25, 1.0], dtype=torch.float64),
        0,
        0.0,
    )
    assert ratio == pytest.approx(gmm_discard_ratio(scores, true), abs=3e-3)
    assert ratio == pytest.approx(fraction, abs=0.01)
    # At the EM optimum the mean posterior equals the fitted weight.
    assert ratio == pytest.approx(float(mixture.weights[0]), abs=1e-6)
    with pytest.raises(ConfigurationError, match="two distinct scores"):
        fit_two_gaussians(torch.ones(10))


def test_gmm_matches_scikit_learn():
    mixture_module = pytest.importorskip("sklearn.mixture")
    generator = torch.Generator().manual_seed(1)
    scores = torch.cat(
        [torch.randn(300, generator=generator) - 1, 2 * torch.randn(700, generator=generator) + 2.5]
    )
    reference = mixture_module.GaussianMixture(2, tol=1e-10, max_iter=1000, random_state=0)
    reference.fit(scores.double().numpy()[:, None])
    non_salient = int(reference.means_.argmin())
    expected = float(
        reference.predict_proba(scores.double().numpy()[:, None])[:, non_salient].mean()
    )
    assert gmm_discard_ratio(scores) == pytest.approx(expected, abs=1e-4)


def test_temperature_formula():
    assert temperature_from(0.5171, 45) == pytest.approx(1 / math.log(1 + 0.5171 * 45))
    assert round(temperature_from(0.5171, 45), 2) == 0.31  # Table 3, ResNet-50
    assert round(temperature_from(0.3712, 30), 2) == 0.40  # Table 3, ResNet-18
    with pytest.raises(ConfigurationError, match="r·K > 0"):
        temperature_from(0.0, 10)


def test_select_hyperparameters_over_a_dataloader():
    model = tiny_cnn(12)
    x = images(6)
    # Batches as datamodules.base.collate_samples makes them (importing it loads Lightning).
    index = torch.arange(6)
    loader = [
        {"image": x[part], "label": index[part] % 5, "index": index[part]}
        for part in (slice(0, 4), slice(4, 6))
    ]
    selection = select_hyperparameters(model, loader, [2, 4, 6, 8], seed=0, batch_size=16)
    # P(K) (Eq. 8) is the mean of the ClusCAM scores of each image's label.
    method = ClusCAM(model, num_clusters=6, seed=0)
    labels = torch.arange(6) % 5
    scores = method.meta_representations(x, labels[:, None]).scores[:, 0]
    assert float(selection.proxy[2]) == pytest.approx(float(scores.mean()), abs=1e-5)
    chosen, curvature = curvature_elbow(selection.candidates, selection.proxy)
    assert selection.num_clusters == chosen
    assert torch.equal(selection.curvature.isnan(), curvature.isnan())
    assert selection.scores.shape == (6, chosen)
    assert selection.discard_ratio == pytest.approx(gmm_discard_ratio(selection.scores))
    assert 0 < selection.discard_ratio < 1
    assert selection.temperature == pytest.approx(
        1 / math.log(1 + selection.discard_ratio * chosen)
    )
    ClusCAM(model, **selection.as_kwargs())(x[:1], torch.tensor([0]))  # usable as is
    # Tuple batches and predicted classes (the reference code's validation target).
    pairs = [(x[i], i % 5) for i in range(6)]
    predicted = score_matrix(model, DataLoader(pairs, batch_size=3), 4, target="prediction")
    with torch.no_grad():
        top = model(x).argmax(dim=1)
    expected = ClusCAM(model, num_clusters=4).meta_representations(x, top[:, None]).scores[:, 0]
    assert_close(predicted, expected.double(), atol=1e-5)
    with pytest.raises(ConfigurationError, match="'discard_ratio' is chosen by the selection"):
        score_matrix(model, loader, 4, discard_ratio=0.3)
