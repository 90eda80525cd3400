"""Pixel flipping, region perturbation (AOPC) and IROF: closed forms on a linear model, the
rules for ties, constant maps and NaN, batching, parity with Quantus' own implementations, and
the registered classes as the evaluation feeds them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from callbacks.evaluation.spec import parse_metrics
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.metrics import create_metric, metric_class
from contrastive_saliency.metrics.functional import (
    irof,
    irof_curve,
    pixel_flipping,
    pixel_flipping_curve,
    region_perturbation,
    region_perturbation_curve,
    slic_segments,
)
from contrastive_saliency.metrics.functional.ties import pixel_ranks, rank_descending
from contrastive_saliency.metrics.registry import MetricInputs


class _Linear(nn.Module):
    """``logit_j = Σ_{c,p} W[j, c, p] · x[c, p] + bias_j``: removing pixel ``p`` (all channels,
    to 0) lowers logit ``j`` by exactly ``Σ_c W[j, c, p] x[c, p]``."""

    def __init__(self, weight: torch.Tensor, bias: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,jchw->bj", images, self.weight) + self.bias


def _linear_case(size: int = 8, channels: int = 3, seed: int = 0, positive: bool = False):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(2, channels, size, size, generator=generator, dtype=torch.float64)
    images = torch.randn(3, channels, size, size, generator=generator, dtype=torch.float64)
    if positive:
        weight, images = weight.abs(), images.abs()
    model = _Linear(weight)
    classes = torch.tensor([0, 1, 0])
    contributions = (weight[classes] * images).sum(dim=1)  # [B, H, W], the exact attribution
    return model, images, classes, contributions


def _aopc_of_drops(drops: list[float]) -> float:
    """``1/(L + 1) Σ_{k=0}^{L}`` of drops ``k = 1 … L`` (the ``k = 0`` drop is 0)."""
    return sum(drops) / (len(drops) + 1)


def test_pixel_flipping_closed_form_on_a_linear_model():
    """Logit of a linear model, baseline 0: after removing the ``m`` most salient pixels the
    logit has fallen by the sum of their contributions; the last step leaves only the bias,
    so every colour channel of a removed pixel is replaced (Quantus #75 flipped only one)."""
    model, images, classes, maps = _linear_case()
    index = torch.tensor([4, 5, 6])
    step = 5
    curve = pixel_flipping_curve(
        model, images, maps, classes, step, "zero", "logit", indices=index
    ).double()
    values = pixel_flipping(model, images, maps, classes, step, "zero", "logit", indices=index)
    for b in range(3):
        ordered = maps[b].flatten().sort(descending=True).values
        counts = [min(k * step, 64) for k in range(1, -(-64 // step) + 1)]
        drops = [ordered[:m].sum().item() for m in counts]
        logit = model(images[b : b + 1])[0, classes[b]].item()
        torch.testing.assert_close(curve[b, 0].item(), logit, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            curve[b, 1:], torch.tensor([logit - d for d in drops], dtype=torch.float64),
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        assert curve[b, -1].item() == pytest.approx(0.5, abs=1e-5)  # only the bias is left
        assert values[b].item() == pytest.approx(_aopc_of_drops(drops), abs=1e-5)


def _patches(size: int, patch: int) -> list[list[tuple[int, int]]]:
    """Quantus' grid written out: pad (−size mod patch) split floor / ceil, raster order."""
    pad = (-size) % patch // 2
    cells = -(-size // patch)
    groups = [[] for _ in range(cells * cells)]
    for y in range(size):
        for x in range(size):
            groups[((y + pad) // patch) * cells + (x + pad) // patch].append((y, x))
    return groups


def test_region_perturbation_closed_form_on_a_linear_model_with_padded_patches():
    model, images, classes, maps = _linear_case(size=10)
    index = torch.tensor([0, 1, 2])
    curve = region_perturbation_curve(
        model, images, maps, classes, patch_size=4, regions_evaluation=5, baseline="zero",
        score="logit", indices=index,
    ).double()  # fmt: skip
    values = region_perturbation(model, images, maps, classes, 4, 5, "zero", "logit", indices=index)
    patches = _patches(10, 4)
    assert sorted(len(p) for p in patches) == [9, 9, 9, 9, 12, 12, 12, 12, 16]  # rows 3, 4, 3
    for b in range(3):
        sums = sorted((sum(maps[b, y, x].item() for y, x in p) for p in patches), reverse=True)
        drops = list(np.cumsum(sums[:5]))
        torch.testing.assert_close(
            curve[b, :1] - curve[b, 1:], torch.tensor(drops, dtype=torch.float64),
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        assert values[b].item() == pytest.approx(_aopc_of_drops(drops), abs=1e-5)


def test_irof_closed_form_on_a_linear_model_with_given_segments():
    """Four quadrant superpixels: ``r_k = 1 − (sum of the k first quadrants' contributions) /
    logit`` and IROF = ``1 − trapz(r, k/4)``."""
    model, images, classes, maps = _linear_case(positive=True)
    segments = torch.zeros(3, 8, 8, dtype=torch.long)
    segments[:, :4, 4:], segments[:, 4:, :4], segments[:, 4:, 4:] = 1, 2, 3
    index = torch.tensor([0, 1, 2])
    ratios, counts = irof_curve(
        model, images, maps, classes, baseline="zero", score="logit", indices=index,
        segments=segments,
    )  # fmt: skip
    values = irof(
        model, images, maps, classes, baseline="zero", score="logit", indices=index,
        segments=segments,
    )  # fmt: skip
    assert counts.tolist() == [4, 4, 4]
    for b in range(3):
        logit = model(images[b : b + 1])[0, classes[b]].item()
        sums = sorted((maps[b][segments[b] == s].sum().item() for s in range(4)), reverse=True)
        expected = [1.0] + [1 - c / logit for c in np.cumsum(sums)]
        torch.testing.assert_close(
            ratios[b].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5
        )
        aoc = 1 - np.trapezoid(expected, np.linspace(0, 1, 5))
        assert values[b].item() == pytest.approx(aoc, abs=1e-5)
        assert ratios[b, -1].item() == pytest.approx(0.5 / logit, abs=1e-5)  # the bias only


def test_constant_maps_remove_in_the_index_keyed_random_order_not_raster_order():
    """A constant (or all-zero) map ties everywhere: the order is the tie mechanism's random
    permutation keyed by the sample index — the same in any batch, different per index, and
    not the raster order a stable sort would give."""
    model, images, classes, _ = _linear_case()
    zero = torch.zeros(3, 8, 8, dtype=torch.float64)
    index = torch.tensor([10, 11, 12])
    contributions = (model.weight[classes] * images).sum(dim=1)
    values = pixel_flipping(model, images, zero, classes, 4, "zero", "logit", indices=index)
    ranks = pixel_ranks(zero, index)
    for b in range(3):
        flat = contributions[b].flatten()
        in_order = flat[ranks[b].argsort()]
        drops = [in_order[: 4 * k].sum().item() for k in range(1, 17)]
        assert values[b].item() == pytest.approx(_aopc_of_drops(drops), abs=1e-5)
        raster = [flat[: 4 * k].sum().item() for k in range(1, 17)]
        assert values[b].item() != pytest.approx(_aopc_of_drops(raster), abs=1e-3)
    alone = pixel_flipping(model, images[2:], zero[2:], classes[2:], 4, "zero", "logit",
                           indices=index[2:])  # fmt: skip
    torch.testing.assert_close(alone, values[2:])
    other = pixel_flipping(model, images, zero, classes, 4, "zero", "logit", indices=index + 1)
    assert not torch.allclose(other, values)
    # Region perturbation and IROF: tied patch sums / superpixel means, the same rule.
    patch_values = region_perturbation(model, images, zero, classes, 4, 3, "zero", "logit",
                                       indices=index)  # fmt: skip
    patch_order = rank_descending(torch.zeros(3, 4, dtype=torch.float64), index)
    for b in range(3):
        sums = [contributions[b, 4 * (p // 2) : 4 * (p // 2) + 4, 4 * (p % 2) : 4 * (p % 2) + 4]
                .sum().item() for p in patch_order[b].tolist()]  # fmt: skip
        drops = list(np.cumsum(sums[:3]))
        assert patch_values[b].item() == pytest.approx(_aopc_of_drops(drops), abs=1e-5)
    segments = torch.arange(4).repeat_interleave(16).view(1, 8, 8).expand(3, 8, 8)
    tied = irof(model, images, zero, classes, baseline="zero", score="logit", indices=index,
                segments=segments)  # fmt: skip
    assert torch.isfinite(tied).all()
    torch.testing.assert_close(
        irof(model, images[1:2], zero[1:2], classes[1:2], baseline="zero", score="logit",
             indices=index[1:2], segments=segments[1:2]),
        tied[1:2],
    )  # fmt: skip


def test_nan_is_least_salient_and_batching_does_not_change_values():
    model, images, classes, maps = _linear_case()
    index = torch.tensor([0, 1, 2])
    broken = maps.clone()
    broken[:, 0, :3] = float("nan")
    lowest = maps.clone()
    lowest[:, 0, :3] = -1e9  # below every real value: removed last, tied among themselves
    for function, options in (
        (pixel_flipping, {"pixels_per_step": 3}),
        (region_perturbation, {"patch_size": 4, "regions_evaluation": 4}),
    ):
        nan_values = function(model, images, broken, classes, **options, indices=index)
        torch.testing.assert_close(
            nan_values, function(model, images, lowest, classes, **options, indices=index)
        )
        one_at_a_time = function(model, images, maps, classes, **options, batch_size=1,
                                 indices=index)  # fmt: skip
        torch.testing.assert_close(
            one_at_a_time, function(model, images, maps, classes, **options, indices=index)
        )
    segments = torch.arange(4).repeat_interleave(16).view(1, 8, 8).expand(3, 8, 8)
    nan_irof = irof(model, images, broken, classes, indices=index, segments=segments)
    low_irof = irof(model, images, lowest, classes, indices=index, segments=segments)
    torch.testing.assert_close(nan_irof, low_irof)


def _tiny_cnn(channels: int = 3, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, classes, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()  # fmt: skip


def _random_inputs(batch: int, channels: int, size: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, size, size, generator=generator)
    maps = torch.randn(batch, size, size, generator=generator)  # distinct values: no ties
    classes = torch.arange(batch) % 4
    return images, maps, classes


def test_pixel_flipping_matches_quantus():
    """Quantus ``PixelFlipping`` (softmax, ``perturb_baseline="black"``, no normalisation —
    which would only rescale the map and not change the order) on the same model and inputs.
    Quantus broadcasts the map over the channels and counts ``features_in_step`` in channel
    values, so ``features_in_step = 3·k`` flips ``k`` whole pixels per step: its curve is ours
    without the unperturbed point. With ``features_in_step = 1`` it flips one channel value per
    step (after Quantus #75 only the first channel was flipped at all); every third of its
    steps is then a whole number of pixels, which is our ``pixels_per_step = 1`` curve."""
    quantus = pytest.importorskip("quantus")
    model = _tiny_cnn()
    images, maps, classes = _random_inputs(3, 3, 12)
    index = torch.arange(3)
    arguments = {"model": model, "x_batch": images.numpy(), "y_batch": classes.numpy(),
                 "a_batch": maps[:, None].numpy(), "device": "cpu"}  # fmt: skip
    theirs = quantus.PixelFlipping(
        features_in_step=12, perturb_baseline="black", normalise=False, disable_warnings=True
    )(**arguments)
    curve = pixel_flipping_curve(model, images, maps, classes, 4, "black", indices=index)
    np.testing.assert_allclose(curve[:, 1:].numpy(), np.asarray(theirs), rtol=1e-5, atol=1e-6)
    start = curve[:, :1].numpy()
    aopc = (start - np.asarray(theirs)).sum(axis=1) / (np.asarray(theirs).shape[1] + 1)
    ours = pixel_flipping(model, images, maps, classes, 4, "black", indices=index)
    np.testing.assert_allclose(ours.numpy(), aopc, rtol=1e-5, atol=1e-6)
    small = {**arguments, "x_batch": images[:1, :, :4, :4].numpy(), "y_batch": classes[:1].numpy(),
             "a_batch": maps[:1, None, :4, :4].numpy()}  # fmt: skip
    per_value = np.asarray(
        quantus.PixelFlipping(features_in_step=1, normalise=False, disable_warnings=True)(**small)
    )
    per_pixel = pixel_flipping_curve(
        model, images[:1, :, :4, :4], maps[:1, :4, :4], classes[:1], 1, indices=index[:1]
    )
    assert per_value.shape == (1, 3 * 16) and per_pixel.shape == (1, 17)
    np.testing.assert_allclose(per_pixel[:, 1:].numpy(), per_value[:, 2::3], rtol=1e-5, atol=1e-6)


def test_region_perturbation_matches_quantus_with_padding():
    quantus = pytest.importorskip("quantus")
    model = _tiny_cnn()
    images, maps, classes = _random_inputs(3, 3, 16, seed=2)
    theirs = quantus.RegionPerturbation(
        patch_size=5, regions_evaluation=10, perturb_baseline="black", normalise=False,
        disable_warnings=True,
    )(model=model, x_batch=images.numpy(), y_batch=classes.numpy(),
      a_batch=maps[:, None].numpy(), device="cpu")  # fmt: skip
    index = torch.arange(3)
    curve = region_perturbation_curve(model, images, maps, classes, 5, 10, "black",
                                      indices=index)  # fmt: skip
    drops = (curve[:, :1] - curve[:, 1:]).numpy()
    np.testing.assert_allclose(drops, np.asarray(theirs), rtol=1e-5, atol=1e-6)
    ours = region_perturbation(model, images, maps, classes, 5, 10, "black", indices=index)
    np.testing.assert_allclose(ours.numpy(), drops.sum(axis=1) / 11, rtol=1e-5, atol=1e-6)


def test_irof_matches_quantus(monkeypatch):
    """Quantus ``IROF`` with its SLIC defaults on the same images. Three Quantus 0.6 defects
    decide the setting: it calls ``np.trapz`` (gone in NumPy 2: patched to ``np.trapezoid``
    here); its mask is ``[B, 1, H, W]`` against ``[B, C, H, W]`` images, so only single-channel
    images run; its ``"mean"`` baseline is the mean of the whole (already perturbed) batch, so
    the baseline here is the constant 0 (``baseline="zero"``). It also pads the curves of a
    batch to its largest superpixel count with zeros, so images go one at a time. Its value is
    ``n − trapz(r_1 … r_n)`` on unit steps; ours is the area over ``k / n`` — both from the
    same ratios."""
    quantus = pytest.importorskip("quantus")
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    model = _tiny_cnn(channels=1)
    images, maps, classes = _random_inputs(2, 1, 16, seed=3)
    index = torch.arange(2)
    ratios, counts = irof_curve(model, images, maps, classes, baseline="zero", indices=index)
    ours = irof(model, images, maps, classes, baseline="zero", indices=index)
    for b in range(2):
        theirs = quantus.IROF(
            perturb_baseline=0.0, normalise=False, return_aggregate=False, disable_warnings=True
        )(model=model, x_batch=images[b : b + 1].numpy(), y_batch=classes[b : b + 1].numpy(),
          a_batch=maps[b : b + 1, None].numpy(), device="cpu")  # fmt: skip
        n = int(counts[b])
        curve = ratios[b, : n + 1].double().numpy()
        assert n > 10 and np.isfinite(curve).all()
        assert theirs[0] == pytest.approx(n - np.trapezoid(curve[1:]), abs=1e-4)
        aoc = 1 - np.trapezoid(curve, dx=1 / n)
        assert ours[b].item() == pytest.approx(aoc, abs=1e-5)


def test_slic_segments_are_scikit_images_relabelled():
    from skimage.segmentation import slic

    images, _, _ = _random_inputs(2, 3, 16, seed=4)
    labels = slic_segments(images)
    for b in range(2):
        reference = slic(images[b].permute(1, 2, 0).double().numpy(), start_label=0)
        _, relabelled = np.unique(reference, return_inverse=True)
        np.testing.assert_array_equal(labels[b].numpy(), relabelled.reshape(16, 16))
        assert labels[b].unique().tolist() == list(range(int(labels[b].max()) + 1))


@pytest.mark.parametrize(
    ("name", "options", "function"),
    [
        ("pixel_flipping", {"pixels_per_step": 8}, pixel_flipping),
        ("region_perturbation", {"patch_size": 4, "regions_evaluation": 6}, region_perturbation),
        ("irof", {"num_segments": 20}, irof),
    ],
)
def test_registered_classes_as_the_evaluation_feeds_them(name, options, function):
    cls = metric_class(name)
    assert cls.family == "faithfulness" and cls.higher_is_better is True
    assert parse_metrics([{"name": name, "kwargs": options}])[0].kwargs == options
    with pytest.raises(ConfigurationError, match="baseline"):
        parse_metrics([{"name": name, "kwargs": {"baseline": "grey"}}])
    model = _tiny_cnn()
    images, maps, classes = _random_inputs(3, 3, 16, seed=5)
    index = torch.tensor([7, 3, 9])
    inputs = MetricInputs(
        model=model, images=images, maps=maps[:, None], classes=classes[:, None], logits=None,
        batch={"index": index},
    )  # fmt: skip
    metric = create_metric(name, batch_size=5, **options)
    metric.update(**metric.update_arguments(inputs))
    metric.update(**metric.update_arguments(inputs))  # the same samples again: counted once
    indices, values = metric.labelled_values(name, sync=False)
    assert indices.tolist() == [3, 7, 9]
    expected = function(model, images, maps, classes, **options, indices=index)
    torch.testing.assert_close(values[name], expected[[1, 0, 2]])


def test_irof_of_a_zero_unperturbed_score_is_nan_not_a_number_made_up():
    """IROF divides by the unperturbed score: a logit of exactly 0 gives 0/0 ratios, so NaN
    (the docstring's rule; Quantus divides the same way)."""
    model = _Linear(torch.zeros(2, 3, 8, 8, dtype=torch.float64), bias=0.0)
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    maps = torch.rand(2, 8, 8, dtype=torch.float64)
    segments = torch.arange(4).repeat_interleave(16).view(1, 8, 8).expand(2, 8, 8)
    values = irof(model, images, maps, torch.tensor([0, 1]), score="logit",
                  indices=torch.arange(2), segments=segments)  # fmt: skip
    assert values.isnan().all()
    softmax = irof(model, images, maps, torch.tensor([0, 1]), indices=torch.arange(2),
                   segments=segments)  # fmt: skip
    torch.testing.assert_close(softmax, torch.zeros(2, dtype=softmax.dtype))  # flat: r = 1
