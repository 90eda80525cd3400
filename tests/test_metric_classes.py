"""The torchmetrics classes in contrastive_saliency.metrics against their functionals: same per-sample
values, padded duplicates counted once, summaries equal NumPy's, the model never kept."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.metrics import (
    AUPR,
    AverageDrop,
    AverageGain,
    ConfidenceDrop,
    DeletionAUC,
    EnergyPointingGame,
    FeatureAgreement,
    GridPointingGame,
    GridRegionScores,
    IncreaseInConfidence,
    InsertionAUC,
    InsertionMinusDeletion,
    LocalisationError,
    PerSampleValues,
    PointingGame,
    RandomLogit,
    RegionScores,
    RelativeDrop,
    SampleMetric,
    TopKIntersection,
)
from contrastive_saliency.metrics import functional as F
from contrastive_saliency.stats import wilcoxon_below
from contrastive_saliency.targets import LogitNeighbours

N, SIZE, CLASSES = 6, 12, 5
# Distinct, unsorted sample indices: per_sample() returns them sorted.
SAMPLE_INDEX = torch.tensor([10, 3, 7, 0, 5, 8])


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, CLASSES),
    ).eval()


class BatchRecorder(nn.Module):
    """Wraps a model and records the batch size of every forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.model(x)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(N, SIZE, SIZE, generator=g) > 0.6
    masks[:, 3:7, 3:7] = True  # never empty
    return {
        "images": torch.randn(N, 3, SIZE, SIZE, generator=g),
        # Four levels: many ties, so the per-index tie-breaking of masks and orders is exercised
        # (and must not depend on how the samples are batched, see the padded test below).
        "maps": (torch.rand(N, SIZE, SIZE, generator=g) * 4).floor() / 4,
        "maps_b": torch.rand(N, SIZE, SIZE, generator=g),
        "classes": torch.randint(0, CLASSES, (N,), generator=g),
        "masks": masks,
        "boxes": torch.tensor([[1, 2, 8, 9], [0, 0, 12, 12], [4, 4, 6, 10]] * 2),
        "cells": torch.tensor([0, 1, 2, 3, 1, 0]),
    }


def _insertion_auc(model, images, maps, classes, pixels_per_step):
    curve = F.insertion_curve(model, images, maps, classes, pixels_per_step, indices=SAMPLE_INDEX)
    return F.curve_auc(curve, SIZE * SIZE, pixels_per_step)


@dataclass
class Case:
    """A metric class, how to feed it the rows ``s`` of ``data``, and the functional values."""

    name: str
    make: Callable[[], SampleMetric]
    update: Callable[[SampleMetric, dict, slice | torch.Tensor, nn.Module], None]
    reference: Callable[[dict, nn.Module], dict[str, torch.Tensor]]
    queries_model: bool = False


def _model_args(d, s, model):
    return model, d["images"][s], d["maps"][s], d["classes"][s], SAMPLE_INDEX[s]


CASES = [
    Case(
        "feature_agreement",
        lambda: FeatureAgreement(fraction=0.1),
        lambda m, d, s, _: m.update(d["maps"][s], d["maps_b"][s], SAMPLE_INDEX[s]),
        lambda d, _: {"feature_agreement": F.feature_agreement(d["maps"], d["maps_b"], 0.1)},
    ),
    Case(
        "random_logit",
        RandomLogit,
        lambda m, d, s, _: m.update(d["maps"][s], d["maps_b"][s], SAMPLE_INDEX[s]),
        lambda d, _: {"random_logit": F.random_logit(d["maps"], d["maps_b"])},
    ),
    Case(
        "confidence_drop",
        lambda: ConfidenceDrop(fraction=0.1, batch_size=4),
        lambda m, d, s, model: m.update(*_model_args(d, s, model)),
        lambda d, model: {
            "confidence_drop": F.confidence_drop(
                model, d["images"], d["maps"], d["classes"], 0.1, indices=SAMPLE_INDEX
            )
        },
        queries_model=True,
    ),
    Case(
        "relative_drop",
        lambda: RelativeDrop(fraction=0.1, reference="runner_up", batch_size=4),
        lambda m, d, s, model: m.update(*_model_args(d, s, model)),
        lambda d, model: {
            "relative_drop": F.relative_drop(
                model, d["images"], d["maps"], d["classes"], None, 0.1, indices=SAMPLE_INDEX
            )
        },
        queries_model=True,
    ),
    Case(
        "relative_drop_reference",
        lambda: RelativeDrop(fraction=0.05, batch_size=4),
        lambda m, d, s, model: m.update(
            *_model_args(d, s, model), reference_classes=(d["classes"][s] + 1) % CLASSES
        ),
        lambda d, model: {
            "relative_drop": F.relative_drop(
                model,
                d["images"],
                d["maps"],
                d["classes"],
                (d["classes"] + 1) % CLASSES,
                0.05,
                indices=SAMPLE_INDEX,
            )
        },
        queries_model=True,
    ),
    Case(
        "relative_drop_nearest_logit",
        lambda: RelativeDrop(fraction=0.1, batch_size=4),  # reference: nearest_logit
        lambda m, d, s, model: m.update(*_model_args(d, s, model)),
        lambda d, model: {
            "relative_drop": F.relative_drop(
                model,
                d["images"],
                d["maps"],
                d["classes"],
                LogitNeighbours(1, mode="nearest")(model(d["images"]), d["classes"])[:, 0],
                0.1,
                indices=SAMPLE_INDEX,
            )
        },
        queries_model=True,
    ),
    *[
        Case(
            name,
            lambda cls=cls: cls(batch_size=4),
            lambda m, d, s, model: m.update(*_model_args(d, s, model)),
            lambda d, model, name=name: {
                name: F.drop_increase_gain(model, d["images"], d["maps"], d["classes"])[name]
            },
            queries_model=True,
        )
        for name, cls in (
            ("average_drop", AverageDrop),
            ("increase_in_confidence", IncreaseInConfidence),
            ("average_gain", AverageGain),
        )
    ],
    Case(
        "deletion_auc",
        lambda: DeletionAUC(pixels_per_step=SIZE, batch_size=5),
        lambda m, d, s, model: m.update(*_model_args(d, s, model)),
        lambda d, model: {
            "deletion_auc": F.deletion_auc(
                model, d["images"], d["maps"], d["classes"], SIZE, indices=SAMPLE_INDEX
            )
        },
        queries_model=True,
    ),
    Case(
        "insertion_auc",
        lambda: InsertionAUC(pixels_per_step=2 * SIZE, batch_size=5),
        lambda m, d, s, model: m.update(*_model_args(d, s, model)),
        lambda d, model: {
            "insertion_auc": _insertion_auc(model, d["images"], d["maps"], d["classes"], 2 * SIZE)
        },
        queries_model=True,
    ),
    Case(
        "insertion_minus_deletion",
        lambda: InsertionMinusDeletion(batch_size=7),  # pixels_per_step None = the image width
        lambda m, d, s, model: m.update(*_model_args(d, s, model)),
        lambda d, model: {
            "insertion_minus_deletion": _insertion_auc(
                model, d["images"], d["maps"], d["classes"], SIZE
            )
            - F.deletion_auc(model, d["images"], d["maps"], d["classes"], indices=SAMPLE_INDEX)
        },
        queries_model=True,
    ),
    Case(
        "pointing_game",
        PointingGame,
        lambda m, d, s, _: m.update(d["maps"][s], d["masks"][s], SAMPLE_INDEX[s]),
        lambda d, _: {"pointing_game": F.pointing_game(d["maps"], d["masks"])},
    ),
    Case(
        "pointing_game_first",
        lambda: PointingGame(ties="first"),
        lambda m, d, s, _: m.update(d["maps"][s], d["masks"][s], SAMPLE_INDEX[s]),
        lambda d, _: {"pointing_game": F.pointing_game(d["maps"], d["masks"], "first").float()},
    ),
    Case(
        "top_k_intersection",
        lambda: TopKIntersection(fraction=0.1),  # k = round(0.1 · 144) = 14 pixels
        lambda m, d, s, _: m.update(d["maps"][s], d["masks"][s], SAMPLE_INDEX[s]),
        lambda d, _: {"top_k_intersection": F.top_k_intersection(d["maps"], d["masks"], 14)},
    ),
    Case(
        "energy_pointing_game",
        EnergyPointingGame,
        lambda m, d, s, _: m.update(d["maps"][s], d["masks"][s], SAMPLE_INDEX[s]),
        lambda d, _: {"energy_pointing_game": F.energy_pointing_game(d["maps"], d["masks"])},
    ),
    Case(
        "localisation_error",
        LocalisationError,
        lambda m, d, s, _: m.update(d["maps"][s], d["boxes"][s], SAMPLE_INDEX[s]),
        lambda d, _: {"localisation_error": F.localisation_error(d["maps"], d["boxes"])},
    ),
    Case(
        "aupr",
        AUPR,
        lambda m, d, s, _: m.update(d["maps"][s], d["masks"][s], SAMPLE_INDEX[s]),
        lambda d, _: dict(zip(("aupr1", "aupr0"), F.aupr(d["maps"], d["masks"]), strict=True)),
    ),
    Case(
        "grid_pointing_game",
        lambda: GridPointingGame(grid=2),
        lambda m, d, s, _: m.update(d["maps"][s], d["cells"][s], SAMPLE_INDEX[s]),
        lambda d, _: {"grid_pointing_game": F.grid_pointing_game(d["maps"], d["cells"], 2)},
    ),
    Case(
        "grid_pointing_game_cells",  # every cell of a 2×2 grid image explained: their mean
        GridPointingGame,
        lambda m, d, s, _: m.update(
            d["maps"][s].view(-1, 4, SIZE // 2, SIZE // 2), None, SAMPLE_INDEX[s]
        ),
        lambda d, _: {
            "grid_pointing_game": F.grid_pointing_game(
                d["maps"].view(-1, SIZE // 2, SIZE // 2), torch.arange(4).repeat(N), 2
            )
            .view(N, 4)
            .mean(dim=1)
        },
    ),
    Case(
        "region_scores",
        lambda: RegionScores(blur_kernel=5, threshold=0.5),
        lambda m, d, s, _: m.update(d["maps"][s], d["masks"][s], SAMPLE_INDEX[s]),
        lambda d, _: _region_columns(
            "region_scores", F.region_scores(d["maps"], d["masks"], blur_kernel=5, threshold=0.5)
        ),
    ),
    Case(
        "grid_region_scores",
        lambda: GridRegionScores(grid=2, blur_kernel=3),
        lambda m, d, s, _: m.update(d["maps"][s], d["cells"][s], SAMPLE_INDEX[s]),
        lambda d, _: _region_columns(
            "grid_region_scores", F.grid_region_scores(d["maps"], d["cells"], grid=2, blur_kernel=3)
        ),
    ),
]


def _region_columns(name: str, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The functional's VAR region scores under the registered metric's column names."""
    suffixes = {"region_attribution": "_ra", "iou": "_iou", "precision": "_precision",
                "recall": "_recall", "f1": "_f1"}  # fmt: skip
    return {name + suffixes[key]: value for key, value in scores.items()}


MODEL_CASES = [case for case in CASES if case.queries_model]


def _ids(cases: list[Case]) -> list[str]:
    return [case.name for case in cases]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_cnn()


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_per_sample_equals_functional(case: Case, data, model):
    metric = case.make()
    case.update(metric, data, slice(None), model)
    expected = case.reference(data, model)
    assert tuple(expected) == metric.value_names
    order = torch.argsort(SAMPLE_INDEX)
    indices, table = metric.per_sample_table()
    assert indices.tolist() == sorted(SAMPLE_INDEX.tolist())
    for name, values in expected.items():
        torch.testing.assert_close(table[name], values[order].float())
        torch.testing.assert_close(metric.per_sample(name)[1], values[order].float())
    if len(metric.value_names) == 1:
        torch.testing.assert_close(metric.per_sample()[1], table[metric.value_names[0]])


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_padded_duplicates_count_once(case: Case, data, model):
    once = case.make()
    case.update(once, data, slice(None), model)
    padded = case.make()
    # Three batches as a distributed sampler would pad them: samples 0 and 4 come twice.
    for rows in (torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([0, 4])):
        case.update(padded, data, rows, model)
    assert sum(part.numel() for part in padded.indices) == N + 2
    result, expected = padded.compute(), once.compute()
    assert result.keys() == expected.keys()
    for name in once.value_names:
        assert result[f"{name}/count"].item() == N
    for key in expected:
        torch.testing.assert_close(result[key], expected[key], equal_nan=True)
    indices, table = padded.per_sample_table()
    assert indices.tolist() == sorted(SAMPLE_INDEX.tolist())
    for name, values in once.per_sample_table()[1].items():
        torch.testing.assert_close(table[name], values)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_summary_statistics_equal_numpy(case: Case, data, model):
    metric = case.make()
    case.update(metric, data, slice(None), model)
    result = metric.compute()
    for name, values in metric.per_sample_table()[1].items():
        array = values.double().numpy()
        assert result[f"{name}/count"].item() == N
        assert result[f"{name}/mean"].item() == pytest.approx(array.mean(), abs=1e-12)
        assert result[f"{name}/median"].item() == pytest.approx(np.median(array), abs=1e-12)
        assert result[f"{name}/std"].item() == pytest.approx(array.std(ddof=1), abs=1e-12)


@pytest.mark.parametrize("case", MODEL_CASES, ids=_ids(MODEL_CASES))
def test_model_is_an_argument_never_state(case: Case, data, model):
    metric = case.make()
    recorder = BatchRecorder(model)
    case.update(metric, data, slice(None), recorder)
    assert list(metric.children()) == []
    assert all(value is not recorder and value is not model for value in vars(metric).values())
    metric.persistent(True)
    curves = {"curve_rows"} if getattr(metric, "curves", ()) else set()
    assert set(metric.state_dict()) == {"values", "indices", *curves}
    # Perturbed images go through the model in forward batches of at most batch_size.
    assert recorder.batch_sizes and max(recorder.batch_sizes) <= metric.batch_size
    assert sum(recorder.batch_sizes) > N  # the perturbed copies were evaluated too


def test_forward_returns_batch_summary_and_accumulates(data, model):
    metric = ConfidenceDrop(fraction=0.1)
    first = metric(
        model, data["images"][:3], data["maps"][:3], data["classes"][:3], SAMPLE_INDEX[:3]
    )
    metric(model, data["images"][3:], data["maps"][3:], data["classes"][3:], SAMPLE_INDEX[3:])
    assert first["confidence_drop/count"].item() == 3
    assert metric.compute()["confidence_drop/count"].item() == N


def test_drop_increase_gain_reports_paper_percentages_from_one_forward(data, model):
    recorder = BatchRecorder(model)
    cache: dict = {}  # the three terms share one soft-masked forward
    for cls in (AverageDrop, IncreaseInConfidence, AverageGain):
        metric = cls()
        metric.update(recorder, data["images"], data["maps"], data["classes"], SAMPLE_INDEX, cache)
        result = metric.compute()
        values = F.drop_increase_gain(model, data["images"], data["maps"], data["classes"])
        assert result[f"{metric.name}/percent"].item() == pytest.approx(
            100 * values[metric.name].double().mean().item(), abs=1e-9
        )
    assert sum(recorder.batch_sizes) == 2 * N  # originals and masked images, once


def test_curve_metrics_keep_resampled_curves(data, model):
    for cls, kind in ((DeletionAUC, "deletion"), (InsertionAUC, "insertion")):
        metric = cls(pixels_per_step=SIZE)
        metric.update(model, data["images"], data["maps"], data["classes"], SAMPLE_INDEX)
        metric.update(model, data["images"][:2], data["maps"][:2], data["classes"][:2],
                      SAMPLE_INDEX[:2])  # fmt: skip
        indices, curves = metric.per_sample_curves()
        assert [curve.kind for curve in metric.curves] == [kind]
        assert indices.tolist() == sorted(SAMPLE_INDEX.tolist()) and curves.shape == (N, 101)
        curve = getattr(F, f"{kind}_curve")(
            model, data["images"], data["maps"], data["classes"], SIZE, indices=SAMPLE_INDEX
        )
        order = torch.argsort(SAMPLE_INDEX)
        # 13 points at fractions k/12 land on the 101-point grid at 0 and 1
        torch.testing.assert_close(curves[:, 0], curve[order, 0].float())
        torch.testing.assert_close(curves[:, -1], curve[order, -1].float())
        auc = metric.per_sample()[1]
        torch.testing.assert_close(
            auc, torch.trapezoid(curves.double(), dx=0.01, dim=1).float(), atol=2e-3, rtol=0
        )


def test_feature_agreement_wilcoxon_matches_stats(data):
    metric = FeatureAgreement(fraction=0.3, wilcoxon_threshold=0.5)
    metric.update(data["maps"], data["maps_b"], SAMPLE_INDEX)
    result = metric.compute()
    values = F.feature_agreement(data["maps"], data["maps_b"], 0.3)
    expected = wilcoxon_below(values.double().numpy(), 0.5)
    assert result["feature_agreement/wilcoxon_p"].item() == pytest.approx(expected.p_value)
    assert result["feature_agreement/wilcoxon_statistic"].item() == pytest.approx(
        expected.statistic
    )
    plain = FeatureAgreement(fraction=0.3)
    plain.update(data["maps"], data["maps_b"], SAMPLE_INDEX)
    assert not any("wilcoxon" in key for key in plain.compute())


def test_empty_metric_summarises_to_nan_and_zero_count():
    metric = PointingGame()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # compute() before update()
        result = metric.compute()
    assert result["pointing_game/count"].item() == 0
    assert all(np.isnan(result[f"pointing_game/{s}"].item()) for s in ("mean", "median", "std"))


def test_reset_clears_samples(data):
    metric = PointingGame()
    metric.update(data["maps"], data["masks"], SAMPLE_INDEX)
    metric.reset()
    metric.update(data["maps"][:2], data["masks"][:2], SAMPLE_INDEX[:2])
    assert metric.compute()["pointing_game/count"].item() == 2


def test_specific_errors(data):
    metric = PointingGame()
    with pytest.raises(ValueError, match="index"):
        metric.update(data["maps"], data["masks"], SAMPLE_INDEX[:3])
    with pytest.raises(TypeError, match="integer sample indices"):
        metric.update(data["maps"], data["masks"], SAMPLE_INDEX.float())
    with pytest.raises(TypeError, match="tensor of sample indices"):
        metric.update(data["maps"], data["masks"], list(range(N)))
    aupr = AUPR()
    aupr.update(data["maps"], data["masks"], SAMPLE_INDEX)
    with pytest.raises(ValueError, match="pass one as name"):
        aupr.per_sample()
    with pytest.raises(KeyError, match="no column"):
        aupr.per_sample("aupr")
    with pytest.raises(ValueError, match="batch_size"):
        DeletionAUC(batch_size=0)
    with pytest.raises(ValueError, match="pixels_per_step"):
        InsertionMinusDeletion(pixels_per_step=0)
    with pytest.raises(ValueError, match="reference"):
        RelativeDrop(reference="nearest")
    with pytest.raises(ValueError, match="ties"):
        PointingGame(ties="random")
    with pytest.raises(ValueError, match="give grid"):
        GridPointingGame().update(data["maps"], data["cells"], SAMPLE_INDEX)
    with pytest.raises(ConfigurationError, match="square grid"):
        GridPointingGame().update(data["maps"][:, None].expand(-1, 3, -1, -1), None, SAMPLE_INDEX)
    with pytest.raises(ValueError, match="fraction"):
        ConfidenceDrop(fraction=0.0)
    with pytest.raises(ValueError, match="grid"):
        GridPointingGame(grid=0)


def test_per_sample_values_keeps_row_shape():
    metric = PerSampleValues()
    metric.update(torch.arange(12.0).view(3, 2, 2), torch.tensor([5, 1, 5]))
    metric.update(torch.zeros(1, 2, 2), torch.tensor([1]))
    indices, values = metric.compute()
    assert indices.tolist() == [1, 5]
    torch.testing.assert_close(values, torch.tensor([[[4.0, 5.0], [6.0, 7.0]], [[0, 1], [2, 3.0]]]))
    with pytest.raises(ValueError, match="rows of one shape"):
        metric.update(torch.zeros(1, 4), torch.tensor([2]))
    declared = PerSampleValues(row_shape=(2,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # compute() before update()
        indices, values = declared.compute()
    assert indices.shape == (0,) and values.shape == (0, 2)
    with pytest.raises(ValueError, match="rows of one shape"):
        declared.update(torch.zeros(1, 3), torch.tensor([0]))


def test_per_sample_values_of_a_single_sample_keep_their_shapes():
    """torchmetrics squeezes one-element results to 0-d; an evaluation that explains one
    sample (e.g. correct_only on a weak model) must still get [1] indices and [1] values."""
    scalars = PerSampleValues(row_shape=())
    scalars.update(torch.tensor([0.25]), torch.tensor([7]))
    indices, values = scalars.compute()
    assert indices.shape == (1,) and values.shape == (1,)
    assert indices.tolist() == [7] and values.tolist() == [0.25]
    rows = PerSampleValues(row_shape=(1,))
    rows.update(torch.tensor([[0.5]]), torch.tensor([3]))
    assert [t.shape for t in rows.compute()] == [(1,), (1, 1)]
