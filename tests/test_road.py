"""ROAD (Rong et al., ICML 2022): the noisy linear imputation against its closed form and
SciPy's direct solve (pytorch-grad-cam's ``NoisyLinearImputer``), the MoRF / LeRF scores on a
model whose logit is known in closed form, parity with pytorch-grad-cam's ROAD and Quantus'
ROAD, and the rules for ties, constant maps, NaN and the noise seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from callbacks.evaluation.spec import parse_metrics
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.metrics import MetricInputs, create_metric
from contrastive_saliency.metrics.functional.road import (
    linear_imputation,
    noisy_linear_imputation,
    road,
)

PERCENTILES = [10, 20, 30, 40, 50, 60, 70, 80, 90]


class RegionSum(nn.Module):
    """Logit 0 = the sum of channel 0 over ``region``; logit 1 = 0."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = (x[:, 0] * self.region).sum(dim=(1, 2))
        return torch.stack([total, torch.zeros_like(total)], dim=1)


def _tiny_cnn(channels: int = 3, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, classes),
    ).eval()  # fmt: skip


def _distinct_maps(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Maps whose values are a permutation of k / N: no ties, exact in float32 (also 1 − v)."""
    generator = torch.Generator().manual_seed(seed)
    n = size * size
    orders = torch.stack([torch.randperm(n, generator=generator) for _ in range(batch)])
    return (orders.float() / n).view(batch, size, size)


def test_imputation_of_a_linear_image_is_the_linear_value():
    # The stencil's weights are symmetric, so a linear image is its own weighted neighbour
    # mean wherever the whole 3×3 neighbourhood lies in the image: any interior hole, however
    # large or scattered, is filled with the linear values exactly.
    size = 16
    steps = torch.arange(size, dtype=torch.float64)
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    image = torch.stack([0.3 * rows - 0.7 * cols + 2.0, 0.05 * cols, 0.1 * rows], dim=0)
    images = image[None].repeat(2, 1, 1, 1)
    removed = torch.zeros(2, size, size, dtype=torch.bool)
    removed[0, 3:13, 2:12] = True  # a 10 × 10 hole
    generator = torch.Generator().manual_seed(0)
    removed[1, 1:-1, 1:-1] = torch.rand(size - 2, size - 2, generator=generator) < 0.6
    scrambled = images * torch.where(removed, -9.0, 1.0)[:, None]  # removed values are unused
    imputed = linear_imputation(scrambled, removed, tolerance=1e-13)
    torch.testing.assert_close(imputed, images, rtol=0, atol=1e-9)
    # A constant image stays constant wherever pixels go (border included).
    constant = torch.full((1, 3, size, size), 0.25)
    everywhere = torch.rand(1, size, size, generator=generator) < 0.9
    torch.testing.assert_close(linear_imputation(constant, everywhere), constant, atol=1e-6, rtol=0)


def test_imputation_matches_pytorch_grad_cams_sparse_solve():
    road_module = pytest.importorskip("pytorch_grad_cam.metrics.road")
    generator = torch.Generator().manual_seed(1)
    for size, share in ((16, 0.3), (24, 0.9), (17, 0.6)):
        images = torch.rand(3, 3, size, size, generator=generator)
        removed = torch.rand(3, size, size, generator=generator) < share
        removed[2, :4, :] = True  # the border rows: neighbours outside the image drop out
        theirs = torch.stack(
            [
                road_module.NoisyLinearImputer(noise=0.0)(images[b], (~removed[b]).float())
                for b in range(3)
            ]
        )  # SciPy spsolve (float64), returned in float32
        ours = linear_imputation(images.double(), removed)
        torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=2e-6)
        ours32 = linear_imputation(images, removed)  # float32 CG, tolerance 1e-6
        torch.testing.assert_close(ours32, theirs, rtol=0, atol=2e-5)


def test_morf_and_lerf_on_a_model_with_a_known_logit():
    # Image 1 on a 4 × 4 region R, 0 elsewhere; the model's logit is the sum over R, the map
    # marks R. Removing R (6.25 % = 16 of 256 pixels) or more (50 %) by MoRF leaves a hole
    # whose kept border is all 0, so the system's unique solution is 0 and the logit is 0;
    # LeRF removes background pixels only and the logit stays |R| = 16.
    size = 16
    region = torch.zeros(size, size, dtype=torch.bool)
    region[6:10, 5:9] = True
    model = RegionSum(region)
    images = region.float().expand(2, 3, size, size).clone()
    maps = region.float().expand(2, size, size).clone()
    index = torch.tensor([3, 8])
    classes = torch.zeros(2, dtype=torch.long)
    result = road(
        model, images, maps, classes, [6.25, 50], noise_std=0.0, score="logit", indices=index
    )
    torch.testing.assert_close(result.morf_curve, torch.zeros(2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.lerf_curve, torch.full((2, 2), 16.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.combined, torch.full((2,), 8.0), atol=1e-5, rtol=0)
    probability = road(model, images, maps, classes, [6.25, 50], 0.0, indices=index)
    torch.testing.assert_close(probability.morf, torch.full((2,), 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(probability.lerf, torch.sigmoid(torch.tensor([16.0, 16.0])))
    accuracy = road(model, images, maps, classes, [6.25, 50], 0.0, "accuracy", indices=index)
    assert accuracy.lerf.tolist() == [1.0, 1.0]  # logit 16 > 0; the MoRF tie 0 = 0 → argmax 0
    # NaN is the least salient value: with NaN on R, MoRF removes the background first (R
    # stays: 16) and LeRF removes R first (0).
    nan_maps = torch.where(region, float("nan"), torch.rand(2, size, size)).clone()
    flipped = road(model, images, nan_maps, classes, [6.25], 0.0, "logit", indices=index)
    torch.testing.assert_close(flipped.morf, torch.full((2,), 16.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped.lerf, torch.zeros(2), atol=1e-5, rtol=0)


def _grad_cam_road(model, images, maps, classes, order: str) -> np.ndarray:
    """pytorch-grad-cam's ROAD{Most,Least}RelevantFirstAverage with a noise-free imputer (its
    classes fix noise 0.01; the same components, noise 0)."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    remove = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    scores = [
        PerturbationConfidenceMetric(remove(q, NoisyLinearImputer(noise=0.0)))(
            images, maps.numpy(), targets, model
        )
        for q in PERCENTILES
    ]
    return np.mean(np.float32(scores), axis=0)


def test_scores_match_pytorch_grad_cams_road():
    pytest.importorskip("pytorch_grad_cam")
    # pytorch-grad-cam's percentile q keeps the q % least (MoRF) or most (LeRF) relevant
    # pixels, i.e. removes 100 − q %: over the symmetric list 10 … 90 the same removal sets as
    # ours. With N a multiple of 10 its np.percentile threshold removes exactly ⌊N·p/100⌋.
    size, batch = 20, 4
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(batch, 3, size, size, generator=generator)
    maps = _distinct_maps(batch, size)
    model = _tiny_cnn()
    with torch.no_grad():
        logits = model(images)
    classes = logits.argmax(dim=1)
    original = logits.softmax(dim=1).gather(1, classes[:, None])[:, 0]
    ours = road(model, images, maps, classes, PERCENTILES, 0.0, indices=torch.arange(batch))
    morf = _grad_cam_road(model, images, maps, classes, "morf")
    lerf = _grad_cam_road(model, images, maps, classes, "lerf")
    # Theirs are differences to the unperturbed score; they cancel in the combined score.
    np.testing.assert_allclose((ours.morf - original).numpy(), morf, rtol=0, atol=1e-5)
    np.testing.assert_allclose((ours.lerf - original).numpy(), lerf, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.combined.numpy(), (lerf - morf) / 2, rtol=0, atol=1e-5)
    assert not np.allclose(morf, lerf, atol=1e-3)  # the two orders differ on this model


def test_morf_accuracy_matches_quantus_road_on_single_channel_images():
    quantus = pytest.importorskip("quantus")
    # Quantus 0.6.0's ROAD ranks the attribution broadcast to C × H × W values but indexes
    # the H × W pixels with those ranks: on RGB images it raises IndexError (below), on
    # single-channel images its ranking is per pixel and right. It scores MoRF accuracy (the
    # prediction still equals y), averaged over the samples per percentage, noise 0 here.
    size, batch = 20, 8
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(batch, 1, size, size, generator=generator)
    maps = _distinct_maps(batch, size, seed=3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(size * size, 4)).eval()
    with torch.no_grad():
        classes = model(images).argmax(dim=1)
    metric = quantus.ROAD(percentages=PERCENTILES, noise=0.0, disable_warnings=True)
    theirs = metric(
        model=model, x_batch=images.numpy(), y_batch=classes.numpy(),
        a_batch=maps[:, None].numpy(), device="cpu",
    )  # fmt: skip
    ours = road(model, images, maps, classes, PERCENTILES, 0.0, "accuracy",
                indices=torch.arange(batch))  # fmt: skip
    np.testing.assert_allclose(ours.morf_curve.mean(dim=0).numpy(), list(theirs.values()))
    assert 0 < ours.morf_curve.mean() < 1  # both kept and lost predictions are exercised
    rgb = quantus.ROAD(percentages=[50], noise=0.0, disable_warnings=True)
    with pytest.raises(IndexError):
        rgb(
            model=_tiny_cnn(), x_batch=np.zeros((2, 3, size, size), np.float32),
            y_batch=np.zeros(2, np.int64), a_batch=maps[:2, None].numpy(), device="cpu",
        )  # fmt: skip


def test_noise_ties_and_batches_depend_on_the_sample_index_only():
    size, batch = 12, 5
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(batch, 3, size, size, generator=generator)
    maps = (torch.rand(batch, size, size, generator=generator) * 3).floor()  # many ties
    maps[0] = 1.0  # a constant map: a uniformly random order keyed by the index
    model = _tiny_cnn()
    with torch.no_grad():
        classes = model(images).argmax(dim=1)
    index = torch.tensor([10, 11, 12, 13, 14])
    run = dict(percentages=[20, 60], noise_std=0.05, indices=index)
    whole = road(model, images, maps, classes, batch_size=64, **run)
    one_by_one = road(model, images, maps, classes, batch_size=1, **run)
    torch.testing.assert_close(one_by_one.morf_curve, whole.morf_curve)
    torch.testing.assert_close(one_by_one.lerf_curve, whole.lerf_curve)
    order = torch.tensor([3, 0, 4, 1, 2])
    reordered = road(model, images[order], maps[order], classes[order], batch_size=3,
                     percentages=[20, 60], noise_std=0.05, indices=index[order])  # fmt: skip
    torch.testing.assert_close(reordered.morf_curve, whole.morf_curve[order])
    other = road(model, images, maps, classes, percentages=[20, 60], noise_std=0.05,
                 indices=index + 100)  # fmt: skip
    assert not torch.allclose(other.morf_curve, whole.morf_curve)


def test_noise_is_seeded_gaussian_on_the_removed_pixels_only():
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 64, 64, generator=generator)
    removed = torch.rand(2, 64, 64, generator=generator) < 0.5
    index = torch.tensor([7, 9])
    clean = linear_imputation(images, removed)
    noisy = noisy_linear_imputation(images, removed, 0.1, indices=index)
    difference = noisy - clean
    assert bool((difference.permute(1, 0, 2, 3)[:, ~removed] == 0).all())
    assert float(difference.permute(1, 0, 2, 3)[:, removed].std()) == pytest.approx(0.1, rel=0.05)
    again = noisy_linear_imputation(images, removed, 0.1, indices=index)
    torch.testing.assert_close(again, noisy)
    other_draw = noisy_linear_imputation(images, removed, 0.1, indices=index, draw=1)
    assert not torch.allclose(other_draw, noisy)
    # pixel units: σ / std_c in the normalised space of each channel
    scaled = noisy_linear_imputation(images, removed, 0.1, indices=index, pixel_std=(0.5, 1, 2))
    for channel, std in enumerate((0.5, 1.0, 2.0)):
        torch.testing.assert_close(
            (scaled - clean)[:, channel], difference[:, channel] / std, atol=1e-6, rtol=1e-5
        )
    with pytest.raises(ValueError, match="at least one kept pixel"):
        linear_imputation(images, torch.ones(2, 64, 64, dtype=torch.bool))


class CountingModel(nn.Module):
    """``_tiny_cnn`` counting the images it scores."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.images = _tiny_cnn(), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.net(x)


def test_registered_metrics_as_the_evaluation_feeds_them():
    size = 12
    generator = torch.Generator().manual_seed(6)
    images = torch.randn(3, 3, size, size, generator=generator)
    maps = torch.rand(3, 1, size, size, generator=generator)
    model = CountingModel()
    with torch.no_grad():
        logits = model(images)
    index = torch.tensor([5, 6, 7])

    def inputs() -> MetricInputs:  # a fresh cache per call, as the evaluation per batch
        return MetricInputs(
            model=model, images=images, maps=maps, classes=logits.argmax(dim=1, keepdim=True),
            logits=logits, batch={"index": index},
        )  # fmt: skip

    options = {"percentages": [25, 75], "batch_size": 4}
    direct = road(model, images, maps[:, 0], logits.argmax(dim=1), [25, 75], indices=index)
    expected = {
        "road_morf": direct.morf,
        "road_lerf": direct.lerf,
        "road": (direct.lerf - direct.morf) / 2,
    }
    # Alone, each metric computes only its curves: 2 percentages × 3 images per curve.
    for name, curves in (("road_morf", 1), ("road_lerf", 1), ("road", 2)):
        metric = create_metric(name, **options)
        model.images = 0
        metric.update(**metric.update_arguments(inputs()))
        assert model.images == curves * 2 * 3, name
        indices, table = metric.per_sample_table()
        assert indices.tolist() == [5, 6, 7] and list(table) == [name]
        torch.testing.assert_close(table[name], expected[name])
    # Sharing one cache (any order), the three compute each curve once.
    for names in (("road_morf", "road_lerf", "road"), ("road", "road_lerf", "road_morf")):
        metrics = [create_metric(name, **options) for name in names]
        shared, model.images = inputs(), 0
        for metric in metrics:
            metric.update(**metric.update_arguments(shared))
        assert model.images == 2 * 2 * 3
        for name, metric in zip(names, metrics, strict=True):
            torch.testing.assert_close(metric.per_sample_table()[1][name], expected[name])
    # Other options (here the score) are other curves.
    logit = create_metric("road_morf", score="logit", **options)
    shared = inputs()
    probability = create_metric("road_morf", **options)
    probability.update(**probability.update_arguments(shared))
    model.images = 0
    logit.update(**logit.update_arguments(shared))
    assert model.images == 2 * 3
    # The direction of each value.
    directions = {"road_morf": False, "road_lerf": True, "road": True}
    for name, higher in directions.items():
        cls = type(create_metric(name))
        assert cls.family == "faithfulness" and cls.higher_is_better is higher
        assert cls.labelled_names(name) == [name]
        parse_metrics([{"name": name, "kwargs": {"percentages": [20, 80], "score": "logit"}}])
        for bad, match in (
            ({"percentages": [10, 100]}, "percentages must be"),
            ({"score": "rank"}, "score='rank' is not one of"),
            ({"noise_std": -1}, "noise_std must be"),
            ({"pixel_std": [0.2, 0]}, "pixel_std must be"),
        ):
            with pytest.raises(ConfigurationError, match=match):
                cls.check_options(bad, name)


def test_one_order_is_the_same_curve_as_both():
    size = 10
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(2, 3, size, size, generator=generator)
    maps = torch.rand(2, size, size, generator=generator)
    model, classes, index = _tiny_cnn(), torch.tensor([0, 1]), torch.tensor([4, 9])
    run = dict(percentages=[30, 70], noise_std=0.05, indices=index)
    both = road(model, images, maps, classes, **run)
    morf = road(model, images, maps, classes, orders=("morf",), **run)
    lerf = road(model, images, maps, classes, orders=["lerf"], batch_size=3, **run)
    torch.testing.assert_close(morf.morf_curve, both.morf_curve)  # same noise draws
    torch.testing.assert_close(lerf.lerf_curve, both.lerf_curve)
    assert morf.lerf_curve is None and lerf.morf_curve is None
    with pytest.raises(ValueError, match="lerf curve was not computed"):
        _ = morf.combined
    with pytest.raises(ValueError, match="orders must be"):
        road(model, images, maps, classes, orders=("most",), **run)
