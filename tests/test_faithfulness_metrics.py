"""Faithfulness correlation, faithfulness estimate, monotonicity and monotonicity correlation:
closed forms on linear models, parity with Quantus' own classes given the same pixels and
draws, the rules for ties, constant maps and NaN, batch invariance, and the registered classes
as the evaluation feeds them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from callbacks.evaluation.spec import parse_metrics
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.index_random import (
    STREAM_PERTURBATION_BASELINE,
    index_subsets,
    index_uniform,
)
from contrastive_saliency.metrics import create_metric, metric_class
from contrastive_saliency.metrics.functional import (
    faithfulness_correlation,
    faithfulness_estimate,
    monotonicity,
    monotonicity_correlation,
)
from contrastive_saliency.metrics.registry import MetricInputs

NAMES = (
    "faithfulness_correlation",
    "faithfulness_estimate",
    "monotonicity",
    "monotonicity_correlation",
)


def _linear(channels: int, size: int, num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, num_classes)).eval()


def _conv(channels: int = 3, num_classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, num_classes),
    ).eval()  # fmt: skip


def _exact_attribution(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, base):
    """``Σ_channels w_c ⊙ (x − baseline)``: each pixel's exact contribution to the logit of a
    linear model relative to the baseline image."""
    weights = model[1].weight[classes].view_as(images)
    return (weights * (images - base)).sum(dim=1).detach()


def _batch(channels: int = 3, size: int = 12, batch: int = 5, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, channels, size, size, generator=generator)
    classes = torch.arange(batch) % 3
    indices = torch.arange(100, 100 + batch)
    return images, classes, indices


# ---- closed forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["black", 0.0])
def test_exact_linear_attribution_correlates_one_and_its_negation_minus_one(baseline):
    """Linear model, exact contributions relative to the baseline: every subset's (group's)
    attribution sum IS the logit drop, so both Pearson correlations are exactly 1; −a gives
    −1. A wrong perturbation (e.g. other pixels replaced, or deletion instead of insertion)
    breaks the equality."""
    images, classes, indices = _batch()
    model = _linear(3, 12)
    base = images.flatten(1).amin(1).view(-1, 1, 1, 1) if baseline == "black" else 0.0
    exact = _exact_attribution(model, images, classes, base)
    for sign in (1.0, -1.0):
        fc = faithfulness_correlation(
            model, images, sign * exact, classes, subset_size=20, num_runs=30,
            baseline=baseline, indices=indices,
        )  # fmt: skip
        torch.testing.assert_close(fc, torch.full((5,), sign), atol=1e-5, rtol=0)
        for step in (1, 12, 16):
            fe = faithfulness_estimate(
                model, images, sign * exact, classes, pixels_per_step=step, baseline=baseline,
                indices=indices,
            )  # fmt: skip
            torch.testing.assert_close(fe, torch.full((5,), sign), atol=1e-5, rtol=0)


def test_monotonicity_correlation_of_exact_magnitudes_is_one_reversed_minus_one():
    """Baseline 0, one draw: replacing pixel i alone changes the logit by its contribution
    ``c_i``, so the mean squared change is ``c_i²``, a monotone function of ``|a_i| = |c_i|``:
    Spearman 1; magnitudes in reverse order (``1/|a|``): −1."""
    images, classes, indices = _batch()
    model = _linear(3, 12)
    exact = _exact_attribution(model, images, classes, 0.0)
    for map_, expected in ((exact, 1.0), (1.0 / exact.abs(), -1.0)):
        value = monotonicity_correlation(
            model, images, map_, classes, pixels_per_step=1, num_samples=1, baseline=0.0,
            softmax=False, indices=indices,
        )  # fmt: skip
        torch.testing.assert_close(value, torch.full((5,), expected), atol=1e-6, rtol=0)


def test_monotonicity_of_a_linear_model_is_the_sign_of_every_steps_contribution():
    """From the black image (each image's minimum) every pixel of a linear model with
    non-negative weights adds ``w·(x − min) ≥ 0``: monotone (1) in any order, for the exact map,
    its reverse and noise alike. One negative weight at one pixel, one pixel per step: that
    step lowers the score whatever the order (0) — unless it comes first, which no step
    before it can show (Quantus and AIX360 start after the first insertion)."""
    images, classes, indices = _batch(size=6)
    model = _linear(3, 6)
    with torch.no_grad():
        model[1].weight.abs_()
    exact = _exact_attribution(model, images, classes, images.flatten(1).amin(1).view(-1, 1, 1, 1))
    noise = torch.rand(5, 6, 6, generator=torch.Generator().manual_seed(3))
    for map_ in (exact, -exact, 1.0 / exact, noise):
        value = monotonicity(
            model, images, map_, classes, pixels_per_step=1, softmax=False, indices=indices
        )
        assert value.tolist() == [1.0] * 5
    with torch.no_grad():
        model[1].weight.view(3, 3, 6, 6)[:, :, 2, 3] = -5.0  # pixel (2, 3): a negative effect
    smallest_elsewhere = exact.clone()
    smallest_elsewhere[:, 0, 0] = -1.0  # not first in the ascending order of |a| → 0
    first = exact.clone()
    first[:, 2, 3] = 0.0  # first in the ascending order: its drop is never compared → 1
    for map_, expected in ((smallest_elsewhere, 0.0), (first, 1.0)):
        value = monotonicity(
            model,
            images,
            map_,
            classes,
            pixels_per_step=1,
            softmax=False,
            absolute=False,
            indices=indices,
        )
        assert value.tolist() == [expected] * 5


def test_monotonicity_depends_on_the_map_through_the_groups():
    """Six pixels with contributions ``c = [3, −2, 1, 0.5, 0.25, 0.75]`` (image of ones, baseline
    0), two per step. Ascending ``|c|`` groups {0.25, 0.5}, {0.75, 1}, {−2, 3}: increments
    1.75 and 1 → monotone. A map ordering them {0.25, 0.5}, {−2, 1}, {0.75, 3}: the second
    step adds −1 → not monotone."""
    contributions = torch.tensor([3.0, -2.0, 1.0, 0.5, 0.25, 0.75])
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([contributions, -contributions]))
    images, classes, indices = torch.ones(1, 1, 1, 6), torch.tensor([0]), torch.tensor([0])
    exact = contributions.view(1, 1, 6)
    wrong = torch.tensor([6.0, 3.0, 4.0, 2.0, 1.0, 5.0]).view(1, 1, 6)
    for map_, expected in ((exact, 1.0), (wrong, 0.0)):
        value = monotonicity(
            model,
            images,
            map_,
            classes,
            pixels_per_step=2,
            baseline=0.0,
            softmax=False,
            indices=indices,
        )
        assert value.item() == expected


# ---- rules: constant maps, blind models, NaN, ties, batches ----------------------------------


def _all(model, images, maps, classes, indices, **options):
    return {
        "faithfulness_correlation": faithfulness_correlation(
            model, images, maps, classes, subset_size=10, num_runs=12, indices=indices, **options
        ),
        "faithfulness_estimate": faithfulness_estimate(
            model, images, maps, classes, pixels_per_step=4, indices=indices, **options
        ),
        "monotonicity": monotonicity(
            model, images, maps, classes, pixels_per_step=4, indices=indices, **options
        ),
        "monotonicity_correlation": monotonicity_correlation(
            model,
            images,
            maps,
            classes,
            pixels_per_step=4,
            num_samples=3,
            indices=indices,
            **options,
        ),
    }


def test_constant_maps_and_blind_models_correlate_zero_not_nan():
    """A constant map predicts the same for every subset / group, and a model that ignores its
    input changes by the same amount for each: the correlation is undefined (scipy and
    Quantus: NaN) and scored 0, no evidence of faithfulness."""
    images, classes, indices = _batch(size=8)
    model = _conv()
    constant = torch.full((5, 8, 8), 0.7)
    values = _all(model, images, constant, classes, indices)
    for name in ("faithfulness_correlation", "faithfulness_estimate", "monotonicity_correlation"):
        assert values[name].tolist() == [0.0] * 5, name
    blind = _linear(3, 8)
    with torch.no_grad():
        blind[1].weight.zero_()
    maps = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(0))
    values = _all(blind, images, maps, classes, indices)
    for name in ("faithfulness_correlation", "faithfulness_estimate", "monotonicity_correlation"):
        assert values[name].tolist() == [0.0] * 5, name
    assert values["monotonicity"].tolist() == [1.0] * 5  # a constant score never decreases


def test_a_nan_pixel_makes_its_sample_nan_only():
    images, classes, indices = _batch(size=8)
    maps = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(0))
    maps[2, 4, 4] = float("nan")
    for name, value in _all(_conv(), images, maps, classes, indices).items():
        assert value.isnan().tolist() == [False, False, True, False, False], name


def test_ties_are_broken_by_the_sample_index_and_values_do_not_depend_on_the_batch():
    """A map with many ties (two levels): the tie order, the random subsets and the uniform
    baselines are functions of the sample index, so the same sample gets the same value alone,
    in another order, with another forward batch size — and another index gets other draws."""
    images, classes, indices = _batch(size=8, batch=4)
    maps = (torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    model = _conv()
    full = _all(model, images, maps, classes, indices)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = _all(model, images[order], maps[order], classes[order], indices[order])
    alone = _all(model, images[3:], maps[3:], classes[3:], indices[3:])
    for name in NAMES:
        torch.testing.assert_close(shuffled[name], full[name][order], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone[name], full[name][3:], atol=1e-5, rtol=0)
    one_at_a_time = faithfulness_correlation(
        model, images, maps, classes, subset_size=10, num_runs=12, batch_size=1, indices=indices
    )
    torch.testing.assert_close(one_at_a_time, full["faithfulness_correlation"], atol=1e-5, rtol=0)
    other = _all(model, images, maps, classes, indices + 1000)
    for name in ("faithfulness_correlation", "faithfulness_estimate", "monotonicity_correlation"):
        assert not torch.allclose(other[name], full[name]), name


def test_a_tie_order_is_uniform_over_indices():
    """Monotonicity of a constant map on the six-pixel model above is decided by the tie order
    alone: over many sample indices both verdicts occur (the ties are not broken in raster
    order, which would give one verdict for all)."""
    contributions = torch.tensor([3.0, -2.0, 1.0, 0.5, 0.25, 0.75])
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([contributions, -contributions]))
    n = 200
    value = monotonicity(
        model, torch.ones(n, 1, 1, 6), torch.zeros(n, 1, 6), torch.zeros(n, dtype=torch.long),
        pixels_per_step=2, baseline=0.0, softmax=False, indices=torch.arange(n),
    )  # fmt: skip
    assert 0.1 < value.mean().item() < 0.9


def test_index_subsets_are_uniform_subsets_of_the_right_size():
    rows = index_subsets(torch.zeros(4000, dtype=torch.long), torch.arange(4000), 10, 3)
    assert rows.shape == (4000, 3)
    assert all(len(set(row)) == 3 for row in rows.tolist())
    counts = torch.bincount(rows.flatten(), minlength=10).float()
    assert (counts / counts.sum() - 0.1).abs().max() < 0.01  # each pixel in 30 % of subsets


def test_bad_options_are_refused_with_what_is_valid():
    images, classes, indices = _batch(size=8)
    maps = torch.randn(5, 8, 8)
    model = _conv()
    with pytest.raises(ValueError, match="subset_size must lie in"):
        faithfulness_correlation(model, images, maps, classes, subset_size=64, indices=indices)
    with pytest.raises(ValueError, match="must divide the 64 pixels"):
        faithfulness_estimate(model, images, maps, classes, pixels_per_step=5, indices=indices)
    with pytest.raises(ValueError, match="baseline must be one of black"):
        monotonicity(model, images, maps, classes, baseline="grey", indices=indices)
    with pytest.raises(ValueError, match=r"maps must be \[B, H, W\]"):
        monotonicity(model, images, maps[:, :4], classes, indices=indices)
    with pytest.raises(ConfigurationError, match="num_samples must be a positive integer"):
        parse_metrics([{"name": "monotonicity_correlation", "kwargs": {"num_samples": 0}}])
    with pytest.raises(ConfigurationError, match="baseline must be one of"):
        parse_metrics([{"name": "faithfulness_correlation", "kwargs": {"baseline": "grey"}}])
    with pytest.raises(ConfigurationError, match=r"unknown option\(s\) \['nr_runs'\]"):
        parse_metrics([{"name": "faithfulness_correlation", "kwargs": {"nr_runs": 5}}])


# ---- the registered classes -----------------------------------------------------------------


def test_registered_classes_as_the_evaluation_feeds_them():
    images, classes, indices = _batch(size=8, batch=4)
    model = _linear(3, 8)
    exact = _exact_attribution(model, images, classes, images.flatten(1).amin(1).view(-1, 1, 1, 1))
    inputs = MetricInputs(
        model=model, images=images, maps=exact[:, None], classes=classes[:, None],
        logits=model(images).detach(), batch={"index": indices},
    )  # fmt: skip
    options = {
        "faithfulness_correlation": {"subset_size": 16, "num_runs": 20},
        "faithfulness_estimate": {"pixels_per_step": 4},
        "monotonicity": {},
        "monotonicity_correlation": {"num_samples": 4},
    }
    for name in NAMES:
        cls = metric_class(name)
        assert cls.family == "faithfulness" and cls.higher_is_better is True
        assert "batch_size" not in cls.options() and "seed" in cls.options()
        parse_metrics([{"name": name, "kwargs": options[name]}])
        metric = create_metric(name, batch_size=7, **options[name])
        metric.update(**metric.update_arguments(inputs))
        metric.update(**metric.update_arguments(inputs))  # the same samples again: counted once
        got_indices, values = metric.labelled_values(name, sync=False)
        assert got_indices.tolist() == indices.tolist()
        assert values[name].shape == (4,) and torch.isfinite(values[name]).all()
    # Quantus' defaults where they apply (docs/deviations.md: pixels_per_step is the width).
    assert metric_class("faithfulness_correlation").options() == {
        "subset_size": 224, "num_runs": 100, "baseline": "black", "softmax": False,
        "abs": False, "seed": 0,
    }  # fmt: skip
    assert metric_class("monotonicity").options()["abs"] is True
    assert metric_class("monotonicity_correlation").options()["baseline"] == "uniform"


# ---- parity with Quantus --------------------------------------------------------------------


def _quantus():
    return pytest.importorskip("quantus")


def _quantus_inputs(images, maps, classes):
    return {"x_batch": images.numpy(), "y_batch": classes.numpy(), "a_batch": maps[:, None].numpy()}


def _pixel_elements(pixels: np.ndarray, channels: int, num_pixels: int) -> np.ndarray:
    """Quantus' element indices of every channel of ``pixels`` ``[P, k]`` → ``[P, C·k]``."""
    return np.concatenate([pixels + c * num_pixels for c in range(channels)], axis=1)


def test_faithfulness_correlation_matches_quantus_given_the_same_subsets(monkeypatch):
    """Quantus draws each subset with ``np.random.choice(n_features, subset_size)``, run by run
    and sample by sample; here that call returns our subset of (sample, run) as the element
    indices of all three channels, so both perturb the same pixels."""
    images, classes, indices = _batch(size=10, batch=4)
    model = _conv()
    maps = torch.randn(4, 10, 10, generator=torch.Generator().manual_seed(5))
    k, runs, n = 12, 15, 100
    calls = iter(range(runs * 4))

    def choice(n_features, size, replace=True):
        call = next(calls)
        run, sample = divmod(call, 4)
        assert (n_features, size, replace) == (3 * n, 3 * k, False)
        pixels = index_subsets(indices[[sample]], torch.tensor([run]), n, k).numpy()
        return _pixel_elements(pixels, 3, n)[0]

    monkeypatch.setattr(np.random, "choice", choice)
    metric = _quantus().FaithfulnessCorrelation(
        nr_runs=runs, subset_size=3 * k, disable_warnings=True, return_aggregate=False
    )
    theirs = np.asarray(metric(model=model, **_quantus_inputs(images, maps, classes)))
    ours = faithfulness_correlation(
        model, images, maps, classes, subset_size=k, num_runs=runs, indices=indices
    )
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)
    assert np.ptp(theirs) > 0.1  # distinct values, not a degenerate agreement


def test_faithfulness_estimate_matches_quantus():
    """Groups of 4 pixels = Quantus' ``features_in_step`` 12 elements on three channels (the
    broadcast map's three copies of a pixel are adjacent in its descending argsort; Quantus
    asks that 12 divide H·W = 144)."""
    images, classes, indices = _batch(size=12, batch=4)
    model = _conv()
    maps = torch.randn(4, 12, 12, generator=torch.Generator().manual_seed(6))
    metric = _quantus().FaithfulnessEstimate(features_in_step=12, disable_warnings=True)
    theirs = np.asarray(metric(model=model, **_quantus_inputs(images, maps, classes)))
    ours = faithfulness_estimate(model, images, maps, classes, pixels_per_step=4, indices=indices)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)


def test_monotonicity_correlation_matches_quantus_given_the_same_uniform_draws():
    """Quantus draws a uniform baseline value per sample at every perturbation call (group
    by group, draw by draw); its ``perturb_func`` hook is given ours, call c = (group c // D,
    draw c % D)."""
    images, classes, indices = _batch(size=12, batch=4)
    model = _conv()
    maps = torch.randn(4, 12, 12, generator=torch.Generator().manual_seed(7))
    draws, groups = 2, 36
    table = index_uniform(indices, (groups * draws,), 0, STREAM_PERTURBATION_BASELINE).numpy()
    calls = iter(range(groups * draws))

    def perturb(arr, indices, **kwargs):
        out = arr.copy()
        out[np.arange(len(arr))[:, None], indices] = table[:, next(calls)][:, None]
        return out

    metric = _quantus().MonotonicityCorrelation(
        nr_samples=draws, features_in_step=12, perturb_func=perturb, disable_warnings=True
    )
    theirs = np.asarray(metric(model=model, **_quantus_inputs(images, maps, classes)))
    ours = monotonicity_correlation(
        model, images, maps, classes, pixels_per_step=4, num_samples=draws, indices=indices
    )
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-6)
    assert np.ptp(theirs) > 0.1


def test_monotonicity_quantus_never_changes_the_image_so_parity_is_with_its_fixed_insertion():
    """Quantus 0.6 ``Monotonicity`` fills the "inserted" pixels of its baseline image with the
    baseline computed from that same image, so the image never changes and every map is
    monotone — even where the closed form says 0 (the negative-pixel case above). Given a
    ``perturb_func`` that inserts the original values (what its docstring describes), it
    agrees with ours sample by sample."""
    images, classes, indices = _batch(size=6, batch=6)
    model = _linear(3, 6)
    with torch.no_grad():
        model[1].weight.abs_()
        model[1].weight.view(3, 3, 6, 6)[:, :, 2, 3] = -5.0
    maps = torch.randn(6, 6, 6, generator=torch.Generator().manual_seed(8))
    maps[:3, 2, 3] = 0.0  # first in ascending |a| for half the samples: monotone
    ours = monotonicity(
        model, images, maps, classes, pixels_per_step=1, softmax=False, indices=indices
    )
    assert ours.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    inputs = _quantus_inputs(images, maps, classes)
    broken = _quantus().Monotonicity(features_in_step=3, disable_warnings=True)
    assert broken(model=model, softmax=False, **inputs) == [True] * 6  # Quantus' bug

    originals = inputs["x_batch"].reshape(6, -1)

    def insert(arr, indices, **kwargs):
        out = arr.copy()
        rows = np.arange(len(arr))[:, None]
        out[rows, indices] = originals[rows, indices]
        return out

    fixed = _quantus().Monotonicity(features_in_step=3, perturb_func=insert, disable_warnings=True)
    theirs = np.asarray(fixed(model=model, softmax=False, **inputs), float)
    np.testing.assert_array_equal(theirs, ours.numpy())
    random_model = _conv()  # both with their default score, the softmax probability
    ours = monotonicity(random_model, images, maps, classes, pixels_per_step=2, indices=indices)
    fixed = _quantus().Monotonicity(features_in_step=6, perturb_func=insert, disable_warnings=True)
    theirs = np.asarray(fixed(model=random_model, **inputs), float)
    np.testing.assert_array_equal(theirs, ours.numpy())


def test_evaluate_py_selects_the_four_metrics_with_their_options(trained_run, tmp_path):
    """The four metrics by name with options in an evaluate.py config: one finite value per
    test sample each in ``per_sample.parquet`` (the evaluation passes the batch's index, the
    model and its perturbation batch size)."""
    import pandas as pd

    import evaluate
    from tests.test_evaluation_pipeline import _args

    metrics = (
        "[{name: faithfulness_correlation, kwargs: {subset_size: 16, num_runs: 6}}, "
        "{name: faithfulness_estimate, kwargs: {pixels_per_step: 512}}, "
        "{name: monotonicity, kwargs: {pixels_per_step: 512, baseline: 0.0}}, "
        "{name: monotonicity_correlation, kwargs: {pixels_per_step: 512, num_samples: 2}}]"
    )
    evaluate.main([
        *_args(trained_run, tmp_path, "faithfulness"), "--evaluation.methods", "[grad_cam]",
        "--evaluation.targets", "[top1]", "--evaluation.metrics", metrics,
        "--evaluation.sanity_check", "null", "--evaluation.gallery_size", "0",
    ])  # fmt: skip
    frame = pd.read_parquet(tmp_path / "faithfulness" / "per_sample.parquet")
    for name in NAMES:
        rows = frame[frame["metric"] == name]
        assert len(rows) == 7 and rows["value"].notna().all(), name
        assert rows["value"].between(-1, 1).all(), name
