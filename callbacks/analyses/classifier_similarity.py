"""Sorted classifier-weight similarity of the evaluated model (Finer-CAM Fig. 1 left, App. A.1).

Needs no data: the classifier's final linear layer is found when the test starts (a bad
``head`` fails before any batch) and, when the test ends, global rank zero publishes into
``<run_dir>/analyses/<name>/`` (:func:`callbacks.analyses.outputs.publish_analysis`):

- ``curve.csv``: rank (1 = each class's most similar other class), mean, sd (population, over
  classes; Fig. 1's band), min and max of the cosine similarity over classes, classes;
- ``nearest.csv``: each class's three most similar classes with their similarity (class names
  where the datamodule has them);
- ``classifier_similarity.png``: the Fig. 1 curve with its ± sd band and the min–max range;

and the W&B summary scalars ``analysis/<name>/rank1_mean`` (the leftmost point),
``rank1_max`` and ``mean_similarity`` (over every pair). ``experiments/classifier_similarity_curves.py``
overlays several runs' curves in one figure, like Fig. 1 does for three datasets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from callbacks.analyses.channel_activity import check_analysis_name, class_names_of
from callbacks.analyses.outputs import publish_analysis
from callbacks.explained_model import explained_network, network_label
from contrastive_saliency.classifier_similarity import (
    ClassifierHead,
    SelfSimilarity,
    find_classifier_head,
    nearest_classes,
    similarity_curve,
)
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.metrics.functional.representation import cosine_similarity_matrix

FIGURE = "classifier_similarity"
NEAREST = 3


class ClassifierSimilarityCallback(L.Callback):
    """Finer-CAM Fig. 1: cosine similarity between the classifier's class weights, each class's
    other classes sorted by similarity, averaged over classes.

    Args:
        head: dotted path of the final linear layer (``None``: found automatically, see
            :func:`contrastive_saliency.classifier_similarity.find_classifier_head`).
        max_rank: keep the first ``max_rank`` ranks (``None``: all other classes).
        self_similarity: ``exclude`` ranks the other classes only; ``zero`` keeps the paper's
            literal zeroed diagonal (App. A.1: "the diagonal elements are subtracted by 1").
        name: the analysis name: output folder ``analyses/<name>/`` and W&B prefix.
    """

    def __init__(
        self,
        head: str | None = None,
        max_rank: int | None = None,
        self_similarity: SelfSimilarity = "exclude",
        name: str = "classifier_similarity",
    ) -> None:
        if max_rank is not None and (
            isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1
        ):
            raise ConfigurationError(
                f"ClassifierSimilarityCallback max_rank must be a positive integer or null, got "
                f"{max_rank!r}"
            )
        if self_similarity not in ("exclude", "zero"):
            raise ConfigurationError(
                f"ClassifierSimilarityCallback self_similarity must be 'exclude' or 'zero', got "
                f"{self_similarity!r}"
            )
        self.head = head
        self.max_rank = max_rank
        self.self_similarity = self_similarity
        self.name = check_analysis_name(name)
        self.classifier: ClassifierHead | None = None
        self.curve: pd.DataFrame | None = None
        self.nearest: pd.DataFrame | None = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        num_classes = getattr(pl_module, "num_classes", None)
        self.classifier = find_classifier_head(
            explained_network(pl_module),
            self.head,
            num_classes if isinstance(num_classes, int) else None,
        )

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        weight = self.classifier.weight.cpu()
        names = class_names_of(trainer, weight.shape[0])
        self.curve = curve_table(similarity_curve(weight, self.max_rank, self.self_similarity))
        self.nearest = nearest_table(weight, names)
        model = network_label(pl_module)
        out_features, in_features = weight.shape
        figure = build_similarity_figure(
            [SimilaritySeries(f"{model}, {out_features} classes", self.curve)],
            title=(
                f"Finer-CAM Fig. 1: sorted cosine similarity of classifier weights\n{model}, "
                f"layer {self.classifier.path!r} ({out_features} classes × {in_features} features)"
            ),
            show_range=True,
        )
        upper = np.triu_indices(out_features, k=1)
        similarity = cosine_similarity_matrix(weight.double()).numpy()
        publish_analysis(
            trainer,
            self.name,
            {"curve": self.curve, "nearest": self.nearest},
            {FIGURE: figure},
            {
                "rank1_mean": float(self.curve["mean"].iloc[0]),
                "rank1_max": float(self.curve["max"].iloc[0]),
                "mean_similarity": float(similarity[upper].mean()),
            },
        )


def curve_table(curve) -> pd.DataFrame:
    """``rank, mean, sd, min, max, classes`` of a
    :class:`~contrastive_saliency.classifier_similarity.SimilarityCurve`."""
    return pd.DataFrame(
        {
            "rank": curve.ranks.numpy(),
            "mean": curve.mean.numpy(),
            "sd": curve.sd.numpy(),
            "min": curve.min.numpy(),
            "max": curve.max.numpy(),
            "classes": curve.sorted.shape[0],
        }
    )


def nearest_table(weight, names: list[str] | None, k: int = NEAREST) -> pd.DataFrame:
    """One row per (class, rank ≤ k): the ``k`` most similar other classes and the similarity."""
    num_classes = weight.shape[0]
    k = min(k, num_classes - 1)
    classes, similarities = nearest_classes(weight, k)
    rows = []
    for c in range(num_classes):
        for rank in range(k):
            other = int(classes[c, rank])
            row = {"class": c, "rank": rank + 1, "other_class": other}
            if names is not None:
                row |= {"class_name": names[c], "other_name": names[other]}
            row["similarity"] = float(similarities[c, rank])
            rows.append(row)
    columns = ["class", "class_name", "rank", "other_class", "other_name", "similarity"]
    frame = pd.DataFrame(rows)
    return frame[[c for c in columns if c in frame.columns]]


@dataclass(frozen=True)
class SimilaritySeries:
    """One curve of a similarity figure: a legend ``label`` and a ``curve.csv`` table."""

    label: str
    curve: pd.DataFrame


def build_similarity_figure(
    series: Sequence[SimilaritySeries], title: str, show_range: bool = False
) -> Figure:
    """Finer-CAM Fig. 1 (left): mean cosine similarity at each rank with a ± 1 sd band (over
    classes), one curve per series; ``show_range`` adds the min–max over classes (dotted)."""
    from matplotlib import colormaps

    if not series:
        raise ValueError("no similarity curve to plot")
    cmap = colormaps["tab10" if len(series) <= 10 else "tab20"]
    rows = len(series) * (3 if show_range else 2) + 1
    figure = Figure(figsize=(8.0, 5.0 + 0.18 * rows), layout="constrained")
    ax = figure.subplots()
    for i, item in enumerate(series):
        colour = cmap(i % cmap.N)
        table = item.curve.sort_values("rank")
        ranks = table["rank"].to_numpy()
        mean, sd = table["mean"].to_numpy(), table["sd"].to_numpy()
        marker = "." if ranks.size <= 30 else None
        ax.plot(ranks, mean, color=colour, marker=marker, linewidth=2.0,
                label=f"{item.label}: mean over classes (rank 1 = {mean[0]:.3f})")  # fmt: skip
        ax.fill_between(ranks, mean - sd, mean + sd, color=colour, alpha=0.2,
                        label=f"{item.label}: ± 1 sd over classes")  # fmt: skip
        if show_range:
            ax.plot(ranks, table["min"], color=colour, linestyle=":", linewidth=1.0,
                    label=f"{item.label}: min and max over classes")  # fmt: skip
            ax.plot(ranks, table["max"], color=colour, linestyle=":", linewidth=1.0)
    ax.axhline(0.0, color="0.3", linewidth=0.8, linestyle="--", label="0 = orthogonal weights")
    ax.set_xlabel("rank of the other class by similarity (1 = most similar)")
    ax.set_ylabel("cosine similarity of class weight vectors (−1 to 1)")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    figure.legend(loc="outside lower center", fontsize="small")  # below: never over a curve
    return figure
