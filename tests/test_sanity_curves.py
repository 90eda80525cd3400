"""Cascading-randomisation curves (Adebayo et al. 2018; PROTOCOLS.md "Sanity check"): the class
explained on each randomised model, every measure from the same maps, the evaluation options
and the VAR pairing of the plots."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from callbacks.evaluation import SaliencyEvaluationCallback
from callbacks.evaluation.checks import check_sanity_options
from callbacks.evaluation.randomisation import (
    DEFAULT_MEASURES,
    MEASURES,
    ROOT_STEP,
    check_measures,
    map_similarity,
    randomisation_curves,
)
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.metrics.functional import cascading_randomisation
from tests.tiny_models import TinyCAMNet

pytestmark = pytest.mark.usefixtures("one_thread")

ORDER = ["head", "features.0"]


@pytest.fixture
def setup() -> tuple[TinyCAMNet, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyCAMNet(channels=6, num_classes=4).eval()
    images = torch.randn(5, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    return model, images


class _Recorder:
    """A builder that records the classes each model is explained for."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, model):
        method = create_method("grad_cam", model, layer="features")

        def explain(images, classes):
            self.calls.append(classes.clone())
            return method(images, classes)

        return explain


@pytest.mark.parametrize("target", ["randomised_argmax", "original"])
def test_explained_class_per_target(setup, target):
    model, images = setup
    recorder = _Recorder()
    frame = randomisation_curves(
        model, images, {("grad_cam", "features"): recorder}, order=ORDER, target=target,
        measures=["spearman"], seed=3,
    )  # fmt: skip
    original = model(images).argmax(dim=1)
    randomised = [
        m(images).argmax(dim=1)
        for _, m in cascading_randomisation(model, ORDER, seed=3, copy_each_step=True)
    ]
    assert any(not torch.equal(r, original) for r in randomised), "targets must differ here"
    assert len(recorder.calls) == 1 + len(ORDER)
    assert torch.equal(recorder.calls[0], original)
    for step, classes in enumerate(recorder.calls[1:]):
        expected = randomised[step] if target == "randomised_argmax" else original
        assert torch.equal(classes, expected), (target, step)
    changed = frame.set_index("step_index")["changed_class"]
    for step, classes in enumerate(randomised, start=1):
        flips = float((classes != original).double().mean()) if target != "original" else 0.0
        assert changed[step] == pytest.approx(flips)
    assert frame["target"].eq(target).all()


def test_all_measures_from_the_same_maps(setup):
    model, images = setup
    builders = {
        ("grad_cam", "features"): lambda m: create_method("grad_cam", m, layer="features"),
        ("input_x_gradient", "input"): lambda m: create_method("input_x_gradient", m),
    }
    frame = randomisation_curves(model, images, builders, order=ORDER, seed=5, measures=MEASURES)
    assert set(frame["measure"]) == set(MEASURES)
    assert len(frame) == len(builders) * len(MEASURES) * (1 + len(ORDER))
    start = frame[frame["step_index"] == 0]
    assert (start["similarity"] == 1.0).all() and (start["step"] == "original").all()
    assert frame["n"].eq(5).all()
    assert frame["fraction"].tolist() == (frame["step_index"] / len(ORDER)).tolist()
    models = [m for _, m in cascading_randomisation(model, ORDER, seed=5, copy_each_step=True)]
    original_classes = model(images).argmax(dim=1)
    for (method, layer), build in builders.items():
        before = build(model)(images, original_classes)[:, 0]
        for step, randomised in enumerate(models, start=1):
            after = build(randomised)(images, randomised(images).argmax(dim=1))[:, 0]
            for measure in MEASURES:
                values = map_similarity(measure, before, after).double()
                row = frame[
                    (frame["method"] == method) & (frame["step_index"] == step)
                    & (frame["measure"] == measure)
                ]  # fmt: skip
                assert row["similarity"].item() == pytest.approx(values.mean().item(), abs=1e-9)
                assert row["sd"].item() == pytest.approx(values.std(correction=0).item(), abs=1e-9)
                assert row["layer"].item() == layer


def test_max_steps_root_step_and_errors(setup):
    model, images = setup
    builders = {("grad_cam", "features"): lambda m: create_method("grad_cam", m, layer="features")}
    frame = randomisation_curves(model, images, builders, measures=["ssim"], max_steps=1)
    assert frame["step"].tolist() == ["original", "head"]
    model.register_parameter("offset", torch.nn.Parameter(torch.zeros(1)))
    frame = randomisation_curves(model, images, builders, measures=["ssim"])
    assert frame["step"].iloc[-1] == ROOT_STEP
    with pytest.raises(ValueError, match="unknown similarity measure"):
        randomisation_curves(model, images, builders, measures=["kendall"])
    with pytest.raises(ValueError, match="unknown sanity-check target"):
        randomisation_curves(model, images, builders, target="top2")
    with pytest.raises(ValueError, match="max_steps"):
        randomisation_curves(model, images, builders, max_steps=0)
    with pytest.raises(ValueError, match="empty"):
        check_measures([])
    with pytest.raises(ValueError, match="twice"):
        check_measures(["ssim", "ssim"])
    assert check_measures("hog") == ("hog",)


def test_evaluation_options():
    defaults = check_sanity_options({})
    assert defaults["measures"] == list(DEFAULT_MEASURES)  # Adebayo et al.'s four
    assert defaults["target"] == "randomised_argmax"
    assert check_sanity_options({"measure": "ssim"})["measures"] == ["ssim"]
    assert check_sanity_options(None) is None
    bad = [
        ({"measure": "ssim", "measures": ["hog"]}, "both 'measure' and 'measures'"),
        ({"measures": ["kendall"]}, "kendall"),
        ({"target": "label"}, "target 'label'"),
        ({"samples": 0}, "samples must be an integer"),
        ({"group_depth": 2, "order": ["fc"]}, "both 'order' and 'group_depth'"),
        ({"order": "fc"}, "list of module names"),
        ({"layers": 3}, "unknown key"),
    ]
    for options, message in bad:
        with pytest.raises(ConfigurationError, match=message):
            check_sanity_options(options)


def test_var_methods_pair_with_their_base_and_order_is_checked():
    callback = SaliencyEvaluationCallback(
        methods=[
            "grad_cam",
            "guided_backprop",
            {"name": "var", "label": "var_grad_cam", "kwargs": {"base": "grad_cam"}},
            {"name": "var", "label": "var_gbp", "kwargs": {"base": "guided_backprop"}},
            {"name": "var", "label": "var_ig", "kwargs": {"base": "integrated_gradients"}},
        ],
        metrics=["deletion_auc"],
        targets=["top1"],
        sanity_check={"order": ["head", "features.7"]},
    )
    assert callback._sanity_bases() == {
        "grad_cam": "grad_cam",
        "guided_backprop": "guided_backprop",
        "var_grad_cam": "grad_cam",
        "var_gbp": "guided_backprop",
        "var_ig": "var_ig",  # no plain integrated_gradients in this run: its own colour
    }
    with pytest.raises(ConfigurationError, match=r"features\.7"):
        callback._sanity_order(TinyCAMNet())
    callback.sanity_check["order"], callback.sanity_check["group_depth"] = None, 1
    assert callback._sanity_order(TinyCAMNet()) == ["head", "features"]


def test_plot_pairs_colours_from_the_frame(tmp_path):
    from callbacks.report.plots import build_sanity_figure

    rows = [
        dict(method=m, layer="input", step=s, step_index=i, similarity=v, measure="ssim",
             base_method=b, wrapper=m.startswith("var"))
        for m, b in (("gbp", "gbp"), ("var_gbp", "gbp"), ("ig", "ig"))
        for i, (s, v) in enumerate((("original", 1.0), ("fc", 0.5)))
    ]  # fmt: skip
    (ax,) = build_sanity_figure(pd.DataFrame(rows), measure="ssim").axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["gbp"].get_color() == lines["var_gbp (wraps gbp)"].get_color()
    assert lines["gbp"].get_color() != lines["ig"].get_color()
    assert lines["var_gbp (wraps gbp)"].get_linestyle() == "--"
    assert ax.get_legend().get_title().get_text() == "solid: method, dashed: wrapped (e.g. VAR)"
