"""Max- and Avg-Sensitivity: closed forms (an input-independent map, the input as its own map,
radius 0), the rules for zero maps and NaN, batch independence of the seeded noise, parity with
Quantus' own MaxSensitivity / AvgSensitivity on the same draws, the registered classes, and a
study through the real evaluation pipeline."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.index_random import STREAM_SENSITIVITY, index_uniform
from contrastive_saliency.methods import create_method
from contrastive_saliency.metrics import create_metric, metric_class
from contrastive_saliency.metrics.functional import (
    avg_sensitivity,
    max_sensitivity,
    sensitivity_samples,
)
from contrastive_saliency.metrics.functional.sensitivity import sensitivity_noise
from contrastive_saliency.metrics.registry import MetricInputs
from tests.tiny_models import TinyCAMNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(batch: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _model() -> TinyCAMNet:
    torch.manual_seed(0)
    return TinyCAMNet().eval()


def _identity(images, classes, rows):
    return images


def test_an_input_independent_map_scores_zero():
    images, indices = _images(), torch.tensor([4, 8, 15])
    maps = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.5

    def fixed(perturbed, classes, rows):
        return maps[rows]  # the map each perturbed image stands for, whatever the input

    classes = torch.zeros(3, 1, dtype=torch.long)
    for reduce in (max_sensitivity, avg_sensitivity):
        values = reduce(fixed, images, maps, classes, indices, nr_samples=5, batch_size=4)
        assert values.tolist() == [0.0, 0.0, 0.0]


def test_the_input_as_its_own_map_gives_the_noise_norm_over_the_input_norm():
    """Φ(x) = x: each draw scores exactly ‖δ_s‖ / ‖x‖, below the ball's bound r·√D / ‖x‖
    (Frobenius) and r / ‖x‖∞ (max-abs)."""
    images, indices, radius, draws = _images(), torch.tensor([4, 8, 15]), 0.05, 6
    classes = torch.zeros(3, 1, dtype=torch.long)
    samples = sensitivity_samples(
        _identity, images, images, classes, indices, nr_samples=draws, radius=radius, batch_size=4
    )
    size = images[0].numel()
    for s in range(draws):
        noise = sensitivity_noise(indices, torch.full((3,), s), (3, 8, 8), radius, seed=0)
        expected = noise.flatten(1).double().norm(dim=1) / images.flatten(1).double().norm(dim=1)
        torch.testing.assert_close(samples[:, s], expected)
    bound = radius * math.sqrt(size) / images.flatten(1).double().norm(dim=1)
    assert (samples <= bound[:, None]).all() and (samples > 0.3 * bound[:, None]).all()
    linf = sensitivity_samples(
        _identity, images, images, classes, indices, nr_samples=draws, radius=radius, norm="linf"
    )
    linf_bound = radius / images.flatten(1).abs().amax(dim=1).double()
    # the largest of 192 uniform values in [−r, r) lies within 3 % of r (all but ~1e-2 of draws)
    assert (linf <= linf_bound[:, None]).all() and (linf >= 0.9 * linf_bound[:, None]).all()
    absolute = sensitivity_samples(
        _identity, images, images, classes, indices, nr_samples=draws, radius=radius,
        normalise=False,
    )  # fmt: skip
    torch.testing.assert_close(absolute, samples * images.flatten(1).double().norm(dim=1)[:, None])
    torch.testing.assert_close(
        max_sensitivity(_identity, images, images, classes, indices, nr_samples=draws, radius=radius),
        samples.amax(dim=1),
    )  # fmt: skip
    torch.testing.assert_close(
        avg_sensitivity(_identity, images, images, classes, indices, nr_samples=draws, radius=radius),
        samples.mean(dim=1),
    )  # fmt: skip


def test_the_noise_is_uniform_in_the_ball_and_a_function_of_index_and_draw():
    indices = torch.tensor([0, 1, 0])
    noise = sensitivity_noise(indices, torch.tensor([0, 0, 1]), (3, 32, 32), 0.2, seed=0)
    assert noise.abs().max() <= 0.2 and noise.min() < -0.19 and noise.max() > 0.19
    assert abs(noise.mean().item()) < 0.01
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    again = sensitivity_noise(torch.tensor([0]), torch.tensor([0]), (3, 32, 32), 0.2, seed=0)
    torch.testing.assert_close(again[0], noise[0])
    other_seed = sensitivity_noise(torch.tensor([0]), torch.tensor([0]), (3, 32, 32), 0.2, seed=1)
    assert not torch.equal(other_seed[0], noise[0])
    # one call with a start per row draws what index_uniform draws piece by piece
    rows = index_uniform(
        indices, (3, 32, 32), 0, STREAM_SENSITIVITY, start=torch.tensor([0, 0, 1]) * 3072
    )
    first = index_uniform(indices[:2], (3, 32, 32), 0, STREAM_SENSITIVITY, start=0)
    second = index_uniform(indices[2:], (3, 32, 32), 0, STREAM_SENSITIVITY, start=3072)
    torch.testing.assert_close(rows, torch.cat([first, second]), rtol=0, atol=0)
    torch.testing.assert_close(noise, (2 * rows - 1) * 0.2)


def test_radius_zero_gives_zero_for_a_gradient_method():
    model = _model()
    method = create_method("saliency", model)
    images, classes = _images(), torch.tensor([[0], [1], [3]])
    maps = method(images, classes)

    def explain(perturbed, chosen, rows):
        return method(perturbed, chosen)

    values = max_sensitivity(
        explain, images, maps, classes, torch.arange(3), nr_samples=3, radius=0.0
    )
    assert values.tolist() == [0.0, 0.0, 0.0]
    moved = max_sensitivity(explain, images, maps, classes, torch.arange(3), nr_samples=3)
    assert (moved > 0).all() and moved.isfinite().all()


def test_zero_maps_and_nan():
    """An all-zero map: an all-zero re-explanation scores 0 (nothing changed), any other one
    inf (an unbounded relative change); a NaN anywhere makes the sample NaN."""
    images, indices = _images(), torch.arange(3)
    classes = torch.zeros(3, 1, dtype=torch.long)
    zero = torch.zeros(3, 1, 8, 8)

    def zeros(perturbed, chosen, rows):
        return torch.zeros(rows.shape[0], 1, 8, 8)

    def sample_one_moves(perturbed, chosen, rows):
        out = torch.zeros(rows.shape[0], 1, 8, 8)
        out[rows == 1] = 1.0
        return out

    assert (
        avg_sensitivity(zeros, images, zero, classes, indices, nr_samples=2).tolist() == [0.0] * 3
    )
    values = max_sensitivity(sample_one_moves, images, zero, classes, indices, nr_samples=2)
    assert values.tolist() == [0.0, math.inf, 0.0]
    # without normalisation the change itself: ‖1‖ over 64 pixels = 8
    absolute = max_sensitivity(
        sample_one_moves, images, zero, classes, indices, nr_samples=2, normalise=False
    )
    assert absolute.tolist() == [0.0, 8.0, 0.0]
    # a constant non-zero map is an ordinary map: a constant method scores 0
    constant = torch.full((3, 1, 8, 8), 0.25)
    fixed = max_sensitivity(
        lambda x, c, rows: constant[rows], images, constant, classes, indices, nr_samples=2
    )
    assert fixed.tolist() == [0.0] * 3
    broken = constant.clone()
    broken[2, 0, 1, 1] = math.nan
    nan_original = avg_sensitivity(
        lambda x, c, rows: constant[rows], images, broken, classes, indices, nr_samples=2
    )
    assert nan_original.isnan().tolist() == [False, False, True]

    calls = []

    def nan_in_second_call(perturbed, chosen, rows):
        calls.append(1)
        out = constant[rows].clone()
        if len(calls) == 2:
            out[rows == 0] = math.nan  # batch_size 3 = one draw per call: draw 1 of sample 0
        return out

    for reduce in (max_sensitivity, avg_sensitivity):
        calls.clear()
        values = reduce(
            nan_in_second_call, images, constant, classes, indices, nr_samples=3, batch_size=3
        )
        assert values.isnan().tolist() == [True, False, False]


def test_a_sample_scores_the_same_in_any_batch_and_any_forward_batch_size():
    model = _model()
    method = create_method("grad_cam", model, layer="features")
    images, classes = _images(batch=4), torch.tensor([[0], [1], [2], [3]])
    indices = torch.tensor([10, 11, 12, 13])
    maps = method(images, classes)

    def explain(perturbed, chosen, rows):
        return method(perturbed, chosen)

    options = {"nr_samples": 5, "radius": 0.1}
    whole = sensitivity_samples(explain, images, maps, classes, indices, **options, batch_size=64)
    ones = sensitivity_samples(explain, images, maps, classes, indices, **options, batch_size=1)
    # the noise is identical; the convolutions of another batch size round differently (~1e-6)
    torch.testing.assert_close(ones, whole, rtol=1e-5, atol=1e-7)
    order = torch.tensor([2, 0, 3])
    part = sensitivity_samples(
        explain, images[order], maps[order], classes[order], indices[order], **options,
        batch_size=7,
    )  # fmt: skip
    torch.testing.assert_close(part, whole[order], rtol=1e-5, atol=1e-7)


def _quantus_parity(quantus_name: str, reduce) -> None:
    """Quantus' own metric on the same model, method and maps, fed our draws: its
    ``perturb_func`` returns draw ``s`` of :func:`sensitivity_noise` on its ``s``-th call
    (one Quantus batch holds every sample)."""
    quantus = pytest.importorskip("quantus")
    model = _model()
    method = create_method("grad_cam", model, layer="features")
    images = _images(batch=5, size=10, seed=3)
    targets = torch.tensor([0, 1, 2, 3, 1])
    indices = torch.arange(5)
    maps = method(images, targets[:, None])
    radius, draws = 0.3, 4
    step = iter(range(draws))

    def our_draws(arr, indices, **kwargs):
        noise = sensitivity_noise(
            torch.arange(arr.shape[0]), torch.full((arr.shape[0],), next(step)), (3, 10, 10),
            radius, seed=0,
        )  # fmt: skip
        return arr + noise.reshape(arr.shape[0], -1).numpy()

    def quantus_explain(model, inputs, targets, **kwargs):
        chosen = torch.as_tensor(targets)[:, None]
        return method(torch.as_tensor(inputs), chosen)[:, 0].detach().numpy()

    metric = getattr(quantus, quantus_name)(
        nr_samples=draws, lower_bound=radius, perturb_func=our_draws, disable_warnings=True
    )
    theirs = metric(
        model=model, x_batch=images.numpy(), y_batch=targets.numpy(),
        a_batch=maps.detach().numpy(), explain_func=quantus_explain, device="cpu", batch_size=5,
    )  # fmt: skip

    def explain(perturbed, chosen, rows):
        return method(perturbed, chosen)

    ours = reduce(explain, images, maps, targets[:, None], indices, nr_samples=draws, radius=radius)
    theirs = np.asarray(theirs, np.float64)
    # Grad-CAM's ReLU can zero a map (none on this seeded model): 0/0 scores 0 here and NaN in
    # Quantus, the difference test_an_all_zero_map_that_stays_zero_... checks directly
    zero = (maps.flatten(1) == 0).all(dim=1).numpy()
    assert zero.sum() <= 2
    assert (ours[zero] == 0).all() and np.isnan(theirs[zero]).all()
    assert (ours[~zero] > 0).all()
    np.testing.assert_allclose(ours[~zero].numpy(), theirs[~zero], rtol=1e-5, atol=1e-7)


def test_max_sensitivity_matches_quantus_on_the_same_draws():
    _quantus_parity("MaxSensitivity", max_sensitivity)


def test_avg_sensitivity_matches_quantus_on_the_same_draws():
    _quantus_parity("AvgSensitivity", avg_sensitivity)


def test_an_all_zero_map_that_stays_zero_is_nan_in_quantus_and_zero_here():
    """The documented difference: 0/0 draws are NaN in Quantus (its nanmax of NaNs is NaN);
    here the map did not change, so 0. A map that becomes non-zero: inf in both. (Quantus
    refuses a batch whose maps are all zero, so sample 2 keeps a constant non-zero map.)"""
    quantus = pytest.importorskip("quantus")
    images, targets = _images(batch=3), np.zeros(3, dtype=int)
    original = np.zeros((3, 1, 8, 8), np.float32)
    original[2] = 0.5

    def quantus_explain(model, inputs, targets, **kwargs):
        out = original.copy()
        out[1] = 1.0  # sample 1's map moves off zero
        return out

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    metric = quantus.MaxSensitivity(nr_samples=2, disable_warnings=True)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's "All-NaN slice"
        theirs = metric(
            model=model, x_batch=images.numpy(), y_batch=targets, a_batch=original,
            explain_func=quantus_explain, device="cpu",
        )  # fmt: skip
    assert np.isnan(theirs[0]) and theirs[1] == np.inf and theirs[2] == 0.0

    maps = torch.from_numpy(original)

    def explain(perturbed, chosen, rows):
        out = maps[rows].clone()
        out[rows == 1] = 1.0
        return out

    classes = torch.zeros(3, 1, dtype=torch.long)
    ours = max_sensitivity(explain, images, maps, classes, torch.arange(3), nr_samples=2)
    assert ours.tolist() == [0.0, math.inf, 0.0]


def test_registered_classes_share_the_draws_and_need_an_explain_function():
    for name in ("max_sensitivity", "avg_sensitivity"):
        cls = metric_class(name)
        assert cls.family == "robustness" and cls.higher_is_better is False
        assert cls.needs_explainer is True
        assert cls.options() == {
            "nr_samples": 200, "radius": 0.2, "norm": "fro", "normalise": True, "seed": 0,
        }  # fmt: skip
    with pytest.raises(ConfigurationError, match="radius"):
        metric_class("max_sensitivity").check_options({"radius": -0.1}, "max_sensitivity")
    with pytest.raises(ConfigurationError, match="norm"):
        metric_class("avg_sensitivity").check_options({"norm": "l1"}, "avg_sensitivity")
    with pytest.raises(ConfigurationError, match="nr_samples"):
        metric_class("avg_sensitivity").check_options({"nr_samples": 0}, "avg_sensitivity")

    images = _images()
    calls = []

    def explain(perturbed, classes, rows):
        calls.append(rows.shape[0])
        return perturbed[:, :1]  # [N, K = 1, H, W]: the first channel as the map

    inputs = MetricInputs(
        model=None, images=images, maps=images[:, :1], classes=torch.zeros(3, 1, dtype=torch.long),
        logits=None, batch={"index": torch.tensor([5, 9, 2])}, explain=explain,
    )  # fmt: skip
    values = {}
    for name in ("max_sensitivity", "avg_sensitivity"):
        metric = create_metric(name, nr_samples=4, batch_size=5)
        metric.update(**metric.update_arguments(inputs))
        _, columns = metric.labelled_values(name, sync=False)
        values[name] = columns[name]
    assert calls == [5, 5, 2]  # 12 perturbed images in calls of ≤ 5, once for both metrics
    assert (values["avg_sensitivity"] <= values["max_sensitivity"]).all()
    assert (values["avg_sensitivity"] > 0).all()
    without = MetricInputs(
        model=None, images=images, maps=images[:, :1], classes=torch.zeros(3, 1, dtype=torch.long),
        logits=None, batch={"index": torch.tensor([5, 9, 2])},
    )  # fmt: skip
    metric = create_metric("max_sensitivity")
    with pytest.raises(ConfigurationError, match=r"max_sensitivity.*explain"):
        metric.update_arguments(without)


def test_an_evaluation_study_scores_robustness(trained_run, tmp_path):
    """evaluate.py with both metrics: the ``random`` reference map (a function of the sample
    index only, so the same map for every perturbed copy) scores exactly 0; Grad-CAM moves
    (a positive, finite value, avg ≤ max)."""
    import evaluate
    from tests.conftest import TINY_SIZES

    evaluate.main([
        "--model.checkpoint", str(trained_run / "checkpoints" / "last.ckpt"),
        "--output_dir", str(tmp_path), "--run_name", "robust", "--wandb.mode", "disabled",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--data.batch_size", "4", "--data.num_workers", "0", *TINY_SIZES,
        "--evaluation.methods", "[grad_cam, random]",
        "--evaluation.targets", "[top1]",
        "--evaluation.metrics",
        "[{name: max_sensitivity, kwargs: {nr_samples: 3, radius: 0.1}}, "
        "{name: avg_sensitivity, kwargs: {nr_samples: 3, radius: 0.1}}]",
        "--evaluation.perturbation_batch_size", "5",
    ])  # fmt: skip
    frame = pd.read_parquet(tmp_path / "robust" / "per_sample.parquet")
    values = frame.pivot_table(index=["method", "index"], columns="metric", values="value")
    assert len(values) == 2 * 7
    assert (values.loc["random"] == 0).all().all()
    cam = values.loc["grad_cam"]
    assert np.isfinite(cam.to_numpy()).all() and (cam["max_sensitivity"] > 0).all()
    assert (cam["avg_sensitivity"] <= cam["max_sensitivity"] + 1e-12).all()
    summary = pd.read_csv(tmp_path / "robust" / "summary.csv")
    assert {"max_sensitivity", "avg_sensitivity"} <= set(summary["metric"])
