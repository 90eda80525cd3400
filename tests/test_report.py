"""Report rendering (callbacks/report): plots, gallery, report.md."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.image import AxesImage
from PIL import Image

from callbacks.report import (
    GallerySample,
    agreement_histograms,
    build_agreement_figure,
    build_curve_figure,
    build_grid_figure,
    build_sample_figure,
    build_sanity_figure,
    build_summary_figure,
    format_p,
    format_value,
    gallery_grid,
    metric_summary,
    normalise_maps,
    perturbation_curves,
    pic_curves,
    render_gallery,
    sanity_curves,
    slug,
    write_report,
)
from contrastive_saliency.stats import mean_confidence_interval, wilcoxon_below

METHODS = ("grad_cam", "case")
LAYERS = ("layer4", "features.7.2")


pytestmark = pytest.mark.usefixtures("one_thread")


def _per_sample(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for layer in LAYERS:
        for m, method in enumerate(METHODS):
            agreement = np.clip(rng.normal(0.3 + 0.3 * m, 0.15, n), 0, 1).round(2)
            deletion = rng.uniform(0, 0.5, n)
            for metric, policy, values in (
                ("feature_agreement", "top1_vs_top2", agreement),
                ("deletion_auc", "top1", deletion),
            ):
                for i, value in enumerate(values):
                    rows.append(
                        dict(method=method, layer=layer, target_policy=policy, metric=metric,
                             index=i, value=float(value), label=i % 5, top1=i % 5,
                             top2=(i + 1) % 5, top1_prob=0.9)
                    )  # fmt: skip
    return pd.DataFrame(rows)


def _summarise(per_sample: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """The summary schema of the evaluation callback, built with the project's statistics."""
    rows = []
    keys = ["method", "layer", "target_policy", "metric"]
    for key, group in per_sample.groupby(keys, sort=False):
        values = group["value"].to_numpy(np.float64)
        low, high = mean_confidence_interval(values)
        row = dict(zip(keys, key, strict=True)) | dict(
            n=values.size, mean=values.mean(), median=float(np.median(values)),
            sd=values.std(ddof=1), ci_low=low, ci_high=high, wilcoxon_threshold=math.nan,
            wilcoxon_statistic=math.nan, wilcoxon_p=math.nan,
        )  # fmt: skip
        if key[3] == "feature_agreement":
            test = wilcoxon_below(values, threshold)
            row |= dict(
                wilcoxon_threshold=threshold,
                wilcoxon_statistic=test.statistic,
                wilcoxon_p=test.p_value,
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _stats() -> pd.DataFrame:
    return pd.DataFrame(
        [
            dict(layer="layer4", target_policy="top1", metric="deletion_auc", method="grad_cam",
                 reference="case", n=40, mean=0.2512, reference_mean=0.2113, t_statistic=2.345,
                 t_p_value=3.2e-05, t_p_holm=6.4e-05, t_p_bh=4.8e-05, cohens_d=0.3712,
                 wilcoxon_p=0.01234, wilcoxon_p_holm=0.02468, wilcoxon_p_bh=0.0185)
        ]
    )  # fmt: skip


def _curves() -> pd.DataFrame:
    x = np.linspace(0, 1, 11)
    rows = []
    for curve, shape in (("deletion", 1 - x), ("insertion", x), ("pic_sic", x**2), ("pic_aic", x)):
        for m, method in enumerate(METHODS):
            for xi, yi in zip(x, shape * (1 - 0.5 * m), strict=True):
                rows.append(
                    dict(method=method, layer="layer4", target_policy="top1", curve=curve,
                         x=xi, y=yi, n=20)
                )  # fmt: skip
    return pd.DataFrame(rows)


STEPS = ("original", "fc", "layer4", "layer3")


def _sanity() -> pd.DataFrame:
    rows = []
    for measure, values in (
        ("spearman_abs", [1.0, 0.6, 0.3, 0.1]),
        ("spearman", [1, 0.4, -0.2, 0]),
    ):
        for method in METHODS:
            for i, (step, value) in enumerate(zip(STEPS, values, strict=True)):
                rows.append(
                    dict(method=method, layer="layer4", step=step, step_index=i,
                         similarity=value, measure=measure)
                )  # fmt: skip
    return pd.DataFrame(rows)


def _sample(
    index: int, size: int = 24, cells: bool = False, methods: tuple[str, ...] = METHODS
) -> GallerySample:
    generator = torch.Generator().manual_seed(index)
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[4:12, 6:16] = True
    maps = {}
    for method in methods:
        columns = ("cell0", "cell1") if cells else ("top1", "top2")
        for column in columns:
            maps[(method, "layer4", column)] = torch.randn(size, size, generator=generator) * 5
    return GallerySample(
        index=index,
        image=torch.rand(3, size, size, generator=generator),
        masks={"mask": mask, "empty": torch.zeros(size, size, dtype=torch.bool)},
        label=1,
        top1=3,
        top2=0,
        class_names=["zero", "one", "two", "three"],
        maps=maps,
    )


def _check_png(path: Path) -> None:
    assert path.suffix == ".png" and path.is_file()
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 200 <= image.width <= 8000 and 200 <= image.height <= 8000


# --------------------------------------------------------------------------------------------


def test_slug_is_safe_unique_and_stable():
    assert slug("grad_cam", "layer4.2.conv3", "top1_vs_top2") == (
        "grad_cam__layer4.2.conv3__top1_vs_top2"
    )
    inputs = [
        ("a b",), ("a-b",), ("A-b",), ("a__b", "c"), ("a", "b__c"), ("../etc/passwd",),
        ("", "x"), ("-", "x"), ("blocks[-1].norm1",), ("blocks[-2].norm1",), ("é",), ("e",),
        ("x" * 300,), ("x" * 301,),
    ]  # fmt: skip
    names = [slug(*parts) for parts in inputs]
    assert len(set(names)) == len(names)
    assert len({name.lower() for name in names}) == len(names)
    for name in names:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name), name
        assert len(name) <= 130
    assert slug("a b") == slug("a b")
    with pytest.raises(ValueError, match="at least one part"):
        slug()


def test_number_formats():
    assert format_value(0.123456) == "0.1235"
    assert format_value(12.5) == "12.5"
    assert format_value(math.nan) == "–"
    assert format_p(3.2e-05) == "3.2e-05"
    assert format_p(0.01234) == "0.012"
    assert format_p(math.nan) == "–"


def test_agreement_figure_draws_threshold_and_median():
    per_sample = _per_sample()
    summary = _summarise(per_sample, threshold=0.5)
    figure = build_agreement_figure(
        per_sample, summary, layer="layer4", target_policy="top1_vs_top2"
    )
    axes = [ax for ax in figure.axes if ax.axison]
    assert len(axes) == len(METHODS)
    for ax, method in zip(axes, METHODS, strict=True):
        values = per_sample.query(
            "method == @method and layer == 'layer4' and metric == 'feature_agreement'"
        )["value"]
        row = summary.query(
            "method == @method and layer == 'layer4' and metric == 'feature_agreement'"
        ).iloc[0]
        title = ax.get_title()
        assert method in title
        assert f"n = {len(values)}" in title
        assert f"median = {format_value(np.median(values))}" in title
        assert f"Wilcoxon p = {format_p(row['wilcoxon_p'])}" in title
        vertical = {line.get_label(): line.get_xdata() for line in ax.get_lines()}
        (threshold_x,) = (x for label, x in vertical.items() if "threshold" in label)
        (median_x,) = (x for label, x in vertical.items() if "median" in label)
        assert list(threshold_x) == [0.5, 0.5]
        assert list(median_x) == pytest.approx([np.median(values)] * 2)
        # every sample lands in exactly one histogram bin
        assert sum(patch.get_height() for patch in ax.patches) == len(values)
        assert ax.get_xlim() == (0.0, 1.0)
        assert "agreement" in ax.get_xlabel() and "samples" in ax.get_ylabel()
        assert ax.get_legend() is not None


def test_agreement_histograms_one_png_per_layer_and_policy(tmp_path):
    per_sample = _per_sample()
    summary = _summarise(per_sample)
    paths = agreement_histograms(per_sample, summary, tmp_path / "plots")
    assert len(paths) == len(LAYERS)
    assert len({p.name for p in paths}) == len(LAYERS)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)
    for path in paths:
        _check_png(path)
    # a summary without the method's row is an error, not a plot without threshold
    with pytest.raises(ValueError, match="exactly one row for method='case'"):
        agreement_histograms(per_sample, summary[summary["method"] != "case"], tmp_path / "x")
    broken = summary.assign(wilcoxon_threshold=math.nan)
    with pytest.raises(ValueError, match="wilcoxon_threshold=nan"):
        agreement_histograms(per_sample, broken, tmp_path / "y")


def test_curves_auc_in_legend_and_files(tmp_path):
    curves = _curves()
    figure = build_curve_figure(curves, layer="layer4", target_policy="top1", curve="deletion")
    (ax,) = figure.axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    # trapezoid of y = 1 - x on [0, 1] is 0.5; the second method is scaled by 0.5
    assert labels == ["grad_cam (AUC = 0.5, n = 20)", "case (AUC = 0.25, n = 20)"]
    sic = build_curve_figure(curves, layer="layer4", target_policy="top1", curve="pic_sic")
    # trapezoid of x² on an 11-point grid: 1/3 + h²/6 with h = 0.1
    assert (
        f"AUC = {format_value(1 / 3 + 0.01 / 6)}"
        in sic.axes[0].get_legend().get_texts()[0].get_text()
    )
    for fig in (figure, sic):
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()

    paths = perturbation_curves(curves, tmp_path)
    assert sorted(p.name for p in paths) == [
        "deletion__layer4__top1.png",
        "insertion__layer4__top1.png",
    ]
    pic = pic_curves(curves, tmp_path)
    assert sorted(p.name for p in pic) == ["pic_aic__layer4__top1.png", "pic_sic__layer4__top1.png"]
    for path in paths + pic:
        _check_png(path)
    with pytest.raises(ValueError, match="unknown curve kinds"):
        perturbation_curves(curves.assign(curve="roc"), tmp_path)


def test_sanity_figure_steps_and_ranges(tmp_path):
    sanity = _sanity()
    absolute = build_sanity_figure(sanity, layer="layer4", measure="spearman_abs")
    (ax,) = absolute.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == list(STEPS)
    assert all(t.get_rotation() > 0 for t in ax.get_xticklabels())
    assert ax.get_ylim() == pytest.approx((-0.02, 1.02))
    assert [line.get_label() for line in ax.get_lines()] == list(METHODS)
    assert list(ax.get_lines()[0].get_ydata()) == [1.0, 0.6, 0.3, 0.1]
    signed = build_sanity_figure(sanity, layer="layer4", measure="spearman")
    assert signed.axes[0].get_ylim() == pytest.approx((-1.02, 1.02))
    paths = sanity_curves(sanity, tmp_path)
    assert len(paths) == 2
    for path in paths:
        _check_png(path)
    dipping = build_sanity_figure(
        sanity.assign(similarity=-0.5), layer="layer4", measure="spearman_abs"
    )
    assert dipping.axes[0].get_ylim() == pytest.approx((-1.02, 1.02))
    with pytest.raises(ValueError, match="must lie in"):
        build_sanity_figure(sanity.assign(similarity=1.5), layer="layer4", measure="spearman_abs")


def test_metric_summary_error_bars_are_the_ci(tmp_path):
    per_sample = _per_sample()
    summary = _summarise(per_sample)
    figure = build_summary_figure(summary, metric="deletion_auc")
    (ax,) = figure.axes
    containers = ax.containers
    assert len(containers) == len(LAYERS)
    rows = summary[(summary["metric"] == "deletion_auc") & (summary["layer"] == "layer4")]
    bars = containers[0].lines[2][0]
    assert isinstance(bars, LineCollection)
    segments = np.array([segment[:, 1] for segment in bars.get_segments()])
    np.testing.assert_allclose(segments, rows[["ci_low", "ci_high"]].to_numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == list(METHODS)
    paths = metric_summary(summary, tmp_path)
    assert [p.name for p in paths] == [
        "summary__feature_agreement.png",
        "summary__deletion_auc.png",
    ]
    for path in paths:
        _check_png(path)


def test_empty_inputs_write_nothing(tmp_path):
    empty_per_sample = _per_sample().iloc[:0]
    empty_summary = _summarise(_per_sample()).iloc[:0]
    assert agreement_histograms(empty_per_sample, empty_summary, tmp_path) == []
    assert perturbation_curves(_curves().iloc[:0], tmp_path) == []
    assert pic_curves(pd.DataFrame(), tmp_path) == []
    assert sanity_curves(pd.DataFrame(), tmp_path) == []
    assert metric_summary(empty_summary, tmp_path) == []
    assert render_gallery([], tmp_path) == []
    assert gallery_grid([], tmp_path) == []
    # curves of the other family only: nothing for this function
    assert pic_curves(_curves().query("curve == 'deletion'"), tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_normalise_maps_closed_form():
    maps = torch.tensor([[[1.0, 3.0], [5.0, 2.0]], [[7.0, 7.0], [7.0, 7.0]], [[-4, 0], [0, -2]]])
    expected = torch.tensor([[[0.0, 0.5], [1.0, 0.25]], [[0, 0], [0, 0]], [[0, 1], [1, 0.5]]])
    torch.testing.assert_close(normalise_maps(maps), expected)
    torch.testing.assert_close(normalise_maps(maps[None])[0], expected)


def test_sample_figure_shows_maps_side_by_side(tmp_path):
    sample = _sample(7)
    figure = build_sample_figure(sample)
    titles = [ax.get_title() for ax in figure.axes]
    for method in METHODS:
        assert f"{method} · top1 (class 3: three)" in titles
        assert f"{method} · top2 (class 0: zero)" in titles
    assert "mask: mask" in titles and "mask: empty (empty)" in titles
    # top-1 and top-2 of one method share a row: same y position, top-1 left of top-2
    by_title = {ax.get_title(): ax.get_position() for ax in figure.axes}
    top1, top2 = by_title["case · top1 (class 3: three)"], by_title["case · top2 (class 0: zero)"]
    assert top1.y0 == pytest.approx(top2.y0) and top1.x0 < top2.x0
    # the overlay is the per-map min-max normalised map
    (ax,) = (ax for ax in figure.axes if ax.get_title() == "grad_cam · top2 (class 0: zero)")
    overlay = [im for im in ax.get_children() if isinstance(im, AxesImage)][1]
    expected = normalise_maps(sample.maps[("grad_cam", "layer4", "top2")]).numpy()
    np.testing.assert_allclose(np.asarray(overlay.get_array()), expected, atol=1e-6)
    paths = render_gallery([sample, _sample(8, cells=True)], tmp_path)
    assert [p.name for p in paths] == ["gallery__sample-000007.png", "gallery__sample-000008.png"]
    for path in paths:
        _check_png(path)


def test_gallery_grid_layout_and_errors(tmp_path):
    samples = [_sample(i) for i in range(3)]
    figure = build_grid_figure(samples)
    assert len(figure.axes) == 3 * (1 + len(METHODS)) + 1  # + colour bar
    (path,) = gallery_grid(samples, tmp_path)
    _check_png(path)
    with pytest.raises(ValueError, match=r"no sample has a 'top1' map.*cell0"):
        gallery_grid([_sample(0, cells=True)], tmp_path)
    with pytest.raises(ValueError, match="distinct indices"):
        render_gallery([samples[0], samples[0]], tmp_path)
    with pytest.raises(ValueError, match="mask 'm' must be bool"):
        GallerySample(0, torch.rand(3, 8, 8), {"m": torch.ones(8, 8)}, 0, 0, 1)
    with pytest.raises(ValueError, match="de-normalise"):
        GallerySample(0, torch.randn(3, 8, 8) * 3, {}, 0, 0, 1)


def test_rendering_is_deterministic(tmp_path):
    sample = _sample(3, methods=("grad_cam",))
    first = render_gallery([sample], tmp_path / "a")[0].read_bytes()
    second = render_gallery([sample], tmp_path / "b")[0].read_bytes()
    assert first == second
    curves = _curves()
    a = perturbation_curves(curves, tmp_path / "c")[0].read_bytes()
    b = perturbation_curves(curves, tmp_path / "d")[0].read_bytes()
    assert a == b


def test_write_report_tables_and_links(tmp_path):
    per_sample = _per_sample()
    summary = _summarise(per_sample)
    stats = _stats()
    plots = metric_summary(summary, tmp_path / "plots")
    gallery = render_gallery([_sample(1, methods=("case",))], tmp_path / "gallery")
    path = write_report(
        tmp_path,
        title="Evaluation of run tiny",
        run_info={"checkpoint": "runs/tiny/last.ckpt", "dataset": "shapes", "seed": "5"},
        summary=summary,
        stats=stats,
        plot_paths=plots,
        gallery_paths=gallery,
        notes=["feature agreement uses k = 5 % of the pixels"],
    )
    assert path == tmp_path / "report.md"
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "# Evaluation of run tiny"
    assert "| checkpoint | runs/tiny/last.ckpt |" in lines
    for _, row in summary.iterrows():
        ci = f"[{format_value(row['ci_low'])}, {format_value(row['ci_high'])}]"
        cells = [row["method"], row["layer"], row["target_policy"],
                 f"{format_value(row['mean'])} {ci}", format_value(row["median"])]  # fmt: skip
        prefix = "| " + " | ".join(cells) + " |"
        matching = [line for line in lines if line.startswith(prefix)]
        assert len(matching) == 1, prefix
        if row["metric"] == "feature_agreement":
            assert matching[0].endswith(f"| 0.5 | {format_p(row['wilcoxon_p'])} |")
    stats_line = "| deletion_auc | layer4 | top1 | grad_cam | case | 40 | 0.2512 | 0.2113 | 2.345 | 3.2e-05 | 6.4e-05 | 4.8e-05 | 0.3712 | 0.012 | 0.025 | 0.018 |"
    assert stats_line in lines
    # every table row has as many cells as its header
    tables = re.findall(r"(?:^\|.*\|$\n?)+", text, flags=re.MULTILINE)
    assert len(tables) == 4  # run info, two metrics, stats
    for table in tables:
        counts = {len(re.findall(r"(?<!\\)\|", line)) for line in table.strip().splitlines()}
        assert len(counts) == 1
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(plots) + len(gallery)
    for link in links:
        assert not Path(link).is_absolute()
        assert (tmp_path / link).is_file()
    assert "- feature agreement uses k = 5 % of the pixels" in lines
    # no stats, no images: explicit statements instead of empty sections
    text = write_report(
        tmp_path / "empty", title="t", run_info={}, summary=summary, stats=None,
        plot_paths=[], gallery_paths=[],
    ).read_text()  # fmt: skip
    assert "_No paired comparisons in this run._" in text and "_No plots._" in text
    with pytest.raises(ValueError, match="outside the report directory"):
        write_report(tmp_path / "plots", title="t", run_info={}, summary=summary, stats=stats,
                     plot_paths=gallery, gallery_paths=[])  # fmt: skip
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path, title="t", run_info={}, summary=summary, stats=stats,
                     plot_paths=[Path("plots/missing.png")], gallery_paths=[])  # fmt: skip
