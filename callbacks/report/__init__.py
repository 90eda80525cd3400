"""Rendering of an evaluation run: plots, a saliency-map gallery and ``report.md``.

Pure functions of the run's DataFrames / gallery samples; each writes into the directory it is
given and returns the written paths.
"""

from callbacks.report.gallery import (
    GalleryKey,
    GallerySample,
    build_grid_figure,
    build_sample_figure,
    gallery_grid,
    normalise_maps,
    render_gallery,
)
from callbacks.report.markdown import key_results, markdown_table, stats_table, write_report
from callbacks.report.plots import (
    agreement_histograms,
    build_agreement_figure,
    build_curve_figure,
    build_sanity_figure,
    build_summary_figure,
    format_p,
    format_value,
    metric_summary,
    perturbation_curves,
    pic_curves,
    sanity_curves,
    slug,
)

__all__ = [
    "GalleryKey",
    "GallerySample",
    "agreement_histograms",
    "build_agreement_figure",
    "build_curve_figure",
    "build_grid_figure",
    "build_sample_figure",
    "build_sanity_figure",
    "build_summary_figure",
    "format_p",
    "format_value",
    "gallery_grid",
    "key_results",
    "markdown_table",
    "metric_summary",
    "normalise_maps",
    "perturbation_curves",
    "pic_curves",
    "render_gallery",
    "sanity_curves",
    "slug",
    "stats_table",
    "write_report",
]
