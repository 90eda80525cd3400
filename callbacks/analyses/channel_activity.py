"""Channel activity of the explained layers on the test split (CASE Sec. V-B, Figs. 5–6).

For every test image, one hooked forward pass counts the active channels (spatial mean > τ,
CASE Eq. 10) of each configured layer; the counts are kept with the sample ``index``, gathered
from every process and de-duplicated (each image exactly once, also under DDP). At the end,
global rank zero averages them per class over the correctly predicted images (the paper's
protocol; ``correct_only: false`` keeps every image) and publishes into
``<run_dir>/analyses/<name>/`` (:func:`callbacks.analyses.outputs.publish_analysis`):

- ``per_sample.csv``: index, label, prediction, correct, layer, active channels, channels;
- ``per_class.csv``: layer, class (and name), mean active channels, images counted, channels;
- ``summary.csv``: per layer: channels, classes, images, mean / median / sd / min / max of the
  per-class means, share of channels active (mean over classes / channels), τ;
- ``channel_activity_kde.png``: CASE Fig. 5, a KDE across classes of the per-class means, one
  curve per layer;

and the W&B summary scalars ``analysis/<name>/<layer>/mean_active_channels`` (and
``median_active_channels``, ``share_active``, ``channels``). Configure it in an evaluate (or
train) config under ``trainer.callbacks``; ``experiments/channel_activity_kde.py`` overlays
several runs (Fig. 6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from callbacks.analyses.outputs import publish_analysis
from callbacks.explained_model import explained_network, network_label
from contrastive_saliency.channel_activity import (
    CASE_THRESHOLD,
    active_channel_counts,
    check_layers,
    check_threshold,
    per_class_active_channels,
)
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.feature_layout import check_layout
from contrastive_saliency.metrics.per_sample import PerSampleValues

FIGURE = "channel_activity_kde"
_KDE_POINTS = 512


class ChannelActivityCallback(L.Callback):
    """Active channels per class of ``layers`` on the test split (CASE Sec. V-B, Fig. 5).

    Args:
        layers: dotted layer paths of ``pl_module.network`` (e.g. DenseNet-201's
            ``features.denseblock4.denselayer32.conv2`` and ``features.norm5``); an unknown path
            fails at the start of the test, naming close valid paths.
        threshold: τ; a channel is active iff its spatial mean is > τ (paper: 0.001).
        correct_only: average over correctly predicted images only (the paper's protocol).
        name: the analysis name: output folder ``analyses/<name>/`` and W&B prefix.
        layout: force the layout of every layer (``nchw``/``nhwc``/``tokens``; ``None`` =
            detect per layer, :mod:`contrastive_saliency.feature_layout`).
    """

    def __init__(
        self,
        layers: list[str],
        threshold: float = CASE_THRESHOLD,
        correct_only: bool = True,
        name: str = "channel_activity",
        layout: str | None = None,
    ) -> None:
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise ConfigurationError(
                f"ChannelActivityCallback layers must be a non-empty list of dotted layer "
                f"paths, got {layers!r}"
            )
        self.layers = list(layers)
        self.threshold = check_threshold(threshold)
        self.correct_only = bool(correct_only)
        self.name = check_analysis_name(name)
        self.layout = check_layout(layout)
        self.per_sample: pd.DataFrame | None = None
        self.per_class: pd.DataFrame | None = None
        self.summary: pd.DataFrame | None = None
        self._values: PerSampleValues | None = None
        self._channels: dict[str, int] = {}

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_layers(explained_network(pl_module), self.layers)  # before any batch
        self._values = PerSampleValues(row_shape=(2 + len(self.layers),)).to(pl_module.device)
        self._channels = {}

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        activity = active_channel_counts(
            explained_network(pl_module), batch["image"], self.layers, self.threshold, self.layout
        )
        predictions = activity.logits.argmax(dim=1)
        rows = torch.stack(
            [batch["label"].to(predictions.device), predictions]
            + [activity.counts[layer] for layer in self.layers],
            dim=1,
        )
        self._values.update(rows.float(), batch["index"])
        self._channels.update(activity.channels)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        indices, rows = self._values.compute()  # collective under DDP: every rank calls it
        if not trainer.is_global_zero:
            return
        if indices.numel() == 0:
            raise ConfigurationError(
                f"ChannelActivityCallback {self.name!r} saw no test sample: the test split is empty"
            )
        rows = rows.cpu().double()
        labels, predictions = rows[:, 0].long(), rows[:, 1].long()
        num_classes = _num_classes(trainer, pl_module, labels, predictions)
        class_names = class_names_of(trainer, num_classes)
        per_sample, per_class = [], []
        for column, layer in enumerate(self.layers, start=2):
            counts = rows[:, column]
            per_sample.append(
                pd.DataFrame(
                    {
                        "index": indices.cpu().numpy(),
                        "label": labels.numpy(),
                        "prediction": predictions.numpy(),
                        "correct": (labels == predictions).numpy(),
                        "layer": layer,
                        "active_channels": counts.long().numpy(),
                        "channels": self._channels[layer],
                    }
                )
            )
            by_class = per_class_active_channels(
                counts, labels, num_classes, predictions if self.correct_only else None
            )
            present = by_class.present.nonzero().flatten()
            frame = pd.DataFrame(
                {
                    "layer": layer,
                    "class": present.numpy(),
                    "mean_active_channels": by_class.mean[present].numpy(),
                    "n_images": by_class.num_images[present].numpy(),
                    "channels": self._channels[layer],
                }
            )
            if class_names is not None:
                frame.insert(2, "class_name", [class_names[c] for c in present.tolist()])
            per_class.append(frame)
        self.per_sample = pd.concat(per_sample, ignore_index=True)
        self.per_class = pd.concat(per_class, ignore_index=True)
        self.summary = summarise_per_class(
            self.per_class, self.threshold, self.correct_only, self._channels
        )
        model = network_label(pl_module)
        figure = build_channel_activity_figure(
            kde_series(self.per_class, channels=self._channels),
            title=(
                f"CASE Fig. 5: KDE over classes of the mean active channels per class\n"
                f"model: {model}\nτ = {self.threshold:g}; "
                f"{'correctly predicted' if self.correct_only else 'all'} test images"
            ),
        )
        summary = {}
        for row in self.summary.itertuples():
            summary[f"{row.layer}/mean_active_channels"] = float(row.mean_over_classes)
            summary[f"{row.layer}/median_active_channels"] = float(row.median_over_classes)
            summary[f"{row.layer}/share_active"] = float(row.share_active)
            summary[f"{row.layer}/channels"] = float(row.channels)
        publish_analysis(
            trainer,
            self.name,
            {"per_sample": self.per_sample, "per_class": self.per_class, "summary": self.summary},
            {FIGURE: figure},
            summary,
        )


def check_analysis_name(name: str) -> str:
    """An analysis name usable as one folder name (``analyses/<name>/``)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name:
        raise ConfigurationError(
            f"analysis name must be a non-empty folder name without '/', got {name!r}"
        )
    return name


def _num_classes(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    labels: torch.Tensor,
    predictions: torch.Tensor,
) -> int:
    for owner in (pl_module, trainer.datamodule):
        count = getattr(owner, "num_classes", None)
        if isinstance(count, int) and count > 0:
            return count
    return int(max(labels.max(), predictions.max())) + 1


def class_names_of(trainer: L.Trainer, num_classes: int) -> list[str] | None:
    """The datamodule's ``class_names`` if it has ``num_classes`` of them, else ``None``."""
    names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
    if names is None or len(names) != num_classes:
        return None
    return [str(name) for name in names]


def _layer_channels(per_class: pd.DataFrame, channels: dict[str, int] | None) -> dict[str, int]:
    """Layer → channel count: ``channels`` (every layer, also those without a counted image) or
    the layers present in ``per_class``."""
    if channels is not None:
        return dict(channels)
    first = per_class.drop_duplicates("layer")
    return dict(zip(first["layer"], first["channels"].astype(int), strict=True))


def summarise_per_class(
    per_class: pd.DataFrame,
    threshold: float,
    correct_only: bool,
    channels: dict[str, int] | None = None,
) -> pd.DataFrame:
    """One row per layer: the distribution over classes of the per-class mean active channels
    and the share of the layer's channels that is active on average. ``channels`` (layer →
    channel count) lists every layer, so a layer without any counted image (no correctly
    predicted one) gets a row with 0 classes and NaN statistics."""
    rows = []
    for layer, count in _layer_channels(per_class, channels).items():
        group = per_class[per_class["layer"] == layer]
        means = group["mean_active_channels"].to_numpy(np.float64)
        channels_of_layer = int(count)
        rows.append(
            {
                "layer": layer,
                "channels": channels_of_layer,
                "classes": len(group),
                "images": int(group["n_images"].sum()),
                "mean_over_classes": means.mean() if means.size else math.nan,
                "median_over_classes": np.median(means) if means.size else math.nan,
                "sd_over_classes": means.std(ddof=1) if means.size > 1 else math.nan,
                "min_over_classes": means.min() if means.size else math.nan,
                "max_over_classes": means.max() if means.size else math.nan,
                "share_active": means.mean() / channels_of_layer if means.size else math.nan,
                "threshold": threshold,
                "correct_only": correct_only,
            }
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class KdeSeries:
    """One curve of a channel-activity KDE: a legend ``label``, the per-class mean active
    channels (one value per class) and the layer's channel count."""

    label: str
    values: np.ndarray
    channels: int


def kde_series(
    per_class: pd.DataFrame, prefix: str = "", channels: dict[str, int] | None = None
) -> list[KdeSeries]:
    """One :class:`KdeSeries` per layer of a ``per_class.csv`` table, labelled by the layer
    (after ``prefix``); with ``channels`` (layer → channel count) one per listed layer, empty
    for a layer without any counted image."""
    return [
        KdeSeries(
            f"{prefix}{layer}",
            per_class.loc[per_class["layer"] == layer, "mean_active_channels"].to_numpy(np.float64),
            int(count),
        )
        for layer, count in _layer_channels(per_class, channels).items()
    ]


def _kde(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Gaussian KDE (Scott's bandwidth) of ``values`` on a grid covering them, clipped at 0;
    ``None`` when it is undefined (fewer than two distinct values)."""
    from scipy.stats import gaussian_kde

    if values.size < 2 or np.ptp(values) == 0:
        return None
    try:
        kde = gaussian_kde(values)
    except np.linalg.LinAlgError:
        return None
    bandwidth = float(np.sqrt(kde.covariance[0, 0]))
    grid = np.linspace(
        max(0.0, values.min() - 4 * bandwidth), values.max() + 4 * bandwidth, _KDE_POINTS
    )
    return grid, kde(grid)


def build_channel_activity_figure(series: Sequence[KdeSeries], title: str) -> Figure:
    """KDE across classes of the per-class mean active channels, one curve per series (CASE
    Figs. 5–6), each class's mean as a tick below the curves and each layer's channel count as
    a dotted line of its colour. A series whose classes all share one value (or has a single
    class) has no KDE: it is drawn as a vertical line, and its legend entry says so."""
    from matplotlib import colormaps

    if not series:
        raise ValueError("no channel-activity series to plot")
    cmap = colormaps["tab10" if len(series) <= 10 else "tab20"]
    figure = Figure(figsize=(8.0, 5.5 + 0.2 * len(series)), layout="constrained")
    ax = figure.subplots()
    right = 0.0
    for i, item in enumerate(series):
        colour = cmap(i % cmap.N)
        values = np.asarray(item.values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            ax.plot([], [], color=colour, linewidth=2.0, label=f"{item.label} — "
                    f"{item.channels} channels: no class with a counted image, nothing to draw")  # fmt: skip
            continue
        count = f"{values.size} class{'es' if values.size != 1 else ''}"
        text = (
            f"{item.label} — {item.channels} channels (dotted); {count}, mean {values.mean():.1f}"
        )
        curve = _kde(values)
        if curve is None:
            ax.axvline(values[0], color=colour, linewidth=2.0, label=f"{text}; all at "
                       f"{values[0]:.3g}: no spread, KDE undefined (solid line)")  # fmt: skip
        else:
            ax.plot(*curve, color=colour, linewidth=2.0, label=text)
        ax.plot(
            values, np.zeros_like(values), linestyle="none", marker="|", markersize=14,
            color=colour, alpha=0.7,
        )  # fmt: skip
        ax.axvline(item.channels, color=colour, linestyle=":", linewidth=1.2)
        right = max(right, float(item.channels), float(values.max()))
    ax.plot([], [], linestyle="none", marker="|", markersize=14, color="0.4",
            label="ticks: one per class (its mean active channels)")  # fmt: skip
    ax.set_xlim(0.0, right * 1.03 if right > 0 else 1.0)
    top = max(ax.get_ylim()[1], 1e-12)
    ax.set_ylim(-0.06 * top, top)  # room for the ticks below 0
    ax.set_xlabel("mean number of active channels per class (channel active: spatial mean > τ)")
    ax.set_ylabel("density over classes (1 / channel)")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    figure.legend(loc="outside lower center", fontsize="small")  # below: never over a curve
    return figure
