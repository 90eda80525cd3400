"""The metric registry: every metric the evaluation offers is one registered torchmetrics class
whose metadata exist once; the evaluation's inputs reach each class's ``update`` with the
batch's sample ``index``, so a sample's value does not depend on the batch it came in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from torchmetrics import Metric

from callbacks.evaluation.spec import parse_metrics
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.metrics import functional as M
from contrastive_saliency.metrics.registry import (
    MetricInputs,
    RegisteredMetric,
    create_metric,
    curve_info,
    list_metrics,
    metric_class,
    register_metric,
)

REPO = Path(__file__).resolve().parents[1]
TIE_BROKEN = ("confidence_drop", "relative_drop", "deletion_auc", "insertion_auc")


def _inputs(rows: torch.Tensor, with_index: bool = True) -> MetricInputs:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 8, 8, generator=generator)
    maps = (torch.rand(4, 1, 8, 8, generator=generator) * 2).floor()  # half the pixels tie
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    batch = {"image": images[rows]}
    if with_index:
        batch["index"] = torch.tensor([40, 41, 42, 43])[rows]
    with torch.no_grad():
        logits = model(images[rows])
    return MetricInputs(
        model=model.eval(), images=images[rows], maps=maps[rows],
        classes=logits.argmax(dim=1, keepdim=True), logits=logits, batch=batch,
    )  # fmt: skip


def _values(inputs: MetricInputs) -> dict[str, torch.Tensor]:
    """Each tie-broken metric's per-sample values, sorted by sample index."""
    values = {}
    for name in TIE_BROKEN:
        metric = create_metric(name)
        metric.update(**metric.update_arguments(inputs))
        values[name] = metric.per_sample()[1]
    return values


def test_evaluation_inputs_pass_the_sample_index_to_tie_broken_metrics():
    inputs = _inputs(torch.arange(4))
    values = _values(inputs)
    maps, classes = inputs.maps[:, 0], inputs.classes[:, 0]
    direct = M.confidence_drop(
        inputs.model, inputs.images, maps, classes, 0.05, indices=inputs.batch["index"]
    )
    torch.testing.assert_close(values["confidence_drop"], direct)
    other = M.confidence_drop(
        inputs.model, inputs.images, maps, classes, 0.05, indices=inputs.batch["index"] + 4
    )
    assert not torch.allclose(other, direct)  # the index decides the ties: it must be passed
    # The same samples in another order and another batch: the same per-sample values.
    reordered = _values(_inputs(torch.tensor([2, 0, 3, 1])))
    alone = _values(_inputs(torch.tensor([3])))
    for name in TIE_BROKEN:
        torch.testing.assert_close(reordered[name], values[name], msg=name)
        torch.testing.assert_close(alone[name], values[name][[3]], msg=name)
    with pytest.raises(ConfigurationError, match="index"):
        _values(_inputs(torch.arange(4), with_index=False))


def test_the_evaluations_choices_are_the_registered_torchmetrics_classes():
    names = list_metrics()
    assert len(names) == 32  # + region_scores, grid_region_scores (VAR App. B.1)
    for name in names:
        cls = metric_class(name)
        assert issubclass(cls, Metric) and issubclass(cls, RegisteredMetric)
        assert cls.name == name and isinstance(cls.higher_is_better, bool)
        assert cls.value_names == tuple(name + suffix for suffix in cls.outputs)
        assert cls.labelled_names("mine") == ["mine" + suffix for suffix in cls.outputs]
        parse_metrics([name])  # the evaluation accepts every registered name ...
    with pytest.raises(ConfigurationError, match="available: " + ", ".join(names)):
        parse_metrics(["deletion"])  # ... and offers exactly these


def test_confidence_drop_is_higher_is_better_as_case_eq_9():
    # CASE Eq. 9: a larger drop when the most salient pixels go = a more faithful map
    assert metric_class("confidence_drop").higher_is_better is True
    assert metric_class("deletion_auc").higher_is_better is False
    assert metric_class("average_drop").higher_is_better is False


# Literals naming metrics that are not metadata: which metrics run by default, what a
# benchmark times, what a package exports.
NOT_METADATA = {
    ("callbacks/analyses/caap_sweeps.py", "DEFAULT_METRICS"),
    ("benchmarks/metrics_throughput.py", "calls"),
    ("benchmarks/faithfulness_correlation_throughput.py", "pairs"),
    ("contrastive_saliency/metrics/functional/__init__.py", "__all__"),
}


def test_no_other_table_of_metric_metadata_exists():
    """Directions, titles and families are read from the registry: no module of the product
    assigns a literal that names three or more metrics (a table keyed by metric names, a tuple
    of metric-name prefixes), but the few listed in ``NOT_METADATA``."""
    names = set(list_metrics())
    offenders = []
    for path in sorted(REPO.glob("*/**/*.py")):
        relative = path.relative_to(REPO)
        if relative.parts[0] in ("tests", ".venv"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
                continue
            constants = {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = ast.unparse(targets[0])
            if len(constants & names) >= 3 and (str(relative), target) not in NOT_METADATA:
                offenders.append(f"{relative}:{node.lineno} {target}")
    assert not offenders, f"metric metadata outside the registry: {offenders}"


def test_options_and_values_are_checked_before_any_computation():
    with pytest.raises(ConfigurationError, match=r"unknown option\(s\) \['frac'\]"):
        parse_metrics([{"name": "confidence_drop", "kwargs": {"frac": 0.1}}])
    with pytest.raises(ConfigurationError, match="ties='some' is not one of expected"):
        parse_metrics([{"name": "pointing_game", "kwargs": {"ties": "some"}}])
    with pytest.raises(ConfigurationError, match="blur_kernel must be a positive odd size"):
        parse_metrics([{"name": "insertion_auc", "kwargs": {"blur_kernel": 4}}])
    assert metric_class("energy_pointing_game").needed_keys({"mask_key": "part_mask"}) == (
        "part_mask",
    )
    assert metric_class("grid_pointing_game").needed_keys({}) == ()
    assert "batch_size" not in metric_class("deletion_auc").options()
    assert create_metric("feature_agreement", batch_size=8).fraction == 0.05


def test_register_metric_refuses_incomplete_metadata():
    class NoDirection(RegisteredMetric):
        title, family = "x", "faithfulness"

        def update_arguments(self, inputs):
            return {}

    with pytest.raises(TypeError, match="higher_is_better"):
        register_metric("no_direction")(NoDirection)

    class NoArguments(RegisteredMetric):
        higher_is_better, title, family = True, "x", "faithfulness"

    with pytest.raises(TypeError, match="update_arguments"):
        register_metric("no_arguments")(NoArguments)
    with pytest.raises(ValueError, match="registered twice"):
        register_metric("confidence_drop")(NoArguments)
    assert "no_direction" not in list_metrics() and "no_arguments" not in list_metrics()


def test_curves_are_declared_by_their_metric_classes():
    from contrastive_saliency.metrics import DeletionAUC, InsertionAUC, PerformanceInformationCurves

    for kind, cls in (
        ("deletion", DeletionAUC),
        ("insertion", InsertionAUC),
        ("pic_sic", PerformanceInformationCurves),
        ("pic_aic", PerformanceInformationCurves),
    ):
        curve, owner = curve_info(kind)
        assert owner is cls and curve.kind == kind and curve.title and curve.x_label
    assert curve_info("deletion")[1].higher_is_better is False  # the plot's "lower AUC"
    with pytest.raises(KeyError, match="no metric declares a curve 'roc'"):
        curve_info("roc")
