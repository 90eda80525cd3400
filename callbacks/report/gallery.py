"""Gallery of saliency maps: per-sample PNGs (image, masks, every method's class maps side by
side) and one overview grid (samples × methods) of one target column, e.g. the top-1 map.

Maps are min-max normalised per map in torch before display (:func:`normalise_maps`); figures
are :class:`matplotlib.figure.Figure` objects, not pyplot figures (see :mod:`.plots`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from callbacks.report.plots import save_figure, slug

MAP_CMAP = "jet"
MAP_ALPHA = 0.5
MASK_COLOUR = (1.0, 0.1, 0.6)
PANEL_INCHES = 2.4
# columns that name a class of the sample, and the GallerySample attribute holding it
CLASS_COLUMNS = {"top1": "top1", "top2": "top2", "ground_truth": "label", "label": "label"}
_COLUMN_ORDER = ("top1", "top2", "ground_truth", "label")
# tolerance for the [0, 1] check of de-normalised images (float round-off of mean/std)
_IMAGE_TOLERANCE = 1e-3


class GalleryKey(NamedTuple):
    """Which map of a sample: a method (its label) at a layer, for one target column
    (``"top1"``, ``"top2"``, ``"ground_truth"``, ``"cell0"``, ...)."""

    method: str
    layer: str
    column: str


@dataclass(eq=False)
class GallerySample:
    """One sample of the gallery.

    Attributes:
        index: dataset sample index.
        image: float ``[3, H, W]`` in [0, 1] (already de-normalised).
        masks: name → bool ``[H, W]`` (object mask, part mask, grid cells); may be empty.
        label, top1, top2: true class and the two most probable predicted classes.
        class_names: class index → name, for titles; ``None`` shows indices only.
        maps: :class:`GalleryKey` ``(method, layer, column)`` → float ``[H, W]`` map (raw, any
            range); a plain ``(method, layer, column)`` tuple is the same key.
    """

    index: int
    image: torch.Tensor
    masks: dict[str, torch.Tensor]
    label: int
    top1: int
    top2: int
    class_names: list[str] | None = None
    maps: dict[GalleryKey, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        image = self.image
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"GallerySample {self.index}: image must be a float [3, H, W] tensor, "
                f"got {image.dtype} {tuple(image.shape)}"
            )
        low, high = float(image.min()), float(image.max())
        if low < -_IMAGE_TOLERANCE or high > 1 + _IMAGE_TOLERANCE:
            raise ValueError(
                f"GallerySample {self.index}: image values must lie in [0, 1] (de-normalise "
                f"first); got range [{low:.4g}, {high:.4g}]"
            )
        size = tuple(image.shape[1:])
        for name, mask in self.masks.items():
            if mask.dtype != torch.bool or tuple(mask.shape) != size:
                raise ValueError(
                    f"GallerySample {self.index}: mask {name!r} must be bool {list(size)}, "
                    f"got {mask.dtype} {list(mask.shape)}"
                )
        for key, saliency in self.maps.items():
            if not (
                isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, str) for k in key)
            ):
                raise ValueError(
                    f"GallerySample {self.index}: map keys must be (method, layer, column) "
                    f"string triples, got {key!r}"
                )
            if tuple(saliency.shape) != size or not saliency.is_floating_point():
                raise ValueError(
                    f"GallerySample {self.index}: map {key} must be float {list(size)}, "
                    f"got {saliency.dtype} {list(saliency.shape)}"
                )
            if not bool(torch.isfinite(saliency).all()):
                raise ValueError(f"GallerySample {self.index}: map {key} has NaN/inf values")
        if self.class_names is not None:
            needed = max(self.label, self.top1, self.top2) + 1
            if len(self.class_names) < needed:
                raise ValueError(
                    f"GallerySample {self.index}: class_names has {len(self.class_names)} "
                    f"names, classes up to {needed - 1} need at least {needed}"
                )

    def class_text(self, k: int) -> str:
        """``"class k"`` or ``"class k: name"``."""
        if self.class_names is None:
            return f"class {k}"
        return f"class {k}: {self.class_names[k]}"

    def column_title(self, method: str, column: str) -> str:
        """``"method · top1 (class k: name)"``; no class for columns that name none (grid cells)."""
        attribute = CLASS_COLUMNS.get(column)
        if attribute is None:
            return f"{method} · {column}"
        return f"{method} · {column} ({self.class_text(getattr(self, attribute))})"


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation over the last two dims: ``(m − min m) / (max m − min m)``
    in [0, 1]; a constant map becomes zeros. ``[..., H, W]`` → same shape, float."""
    if maps.ndim < 2:
        raise ValueError(f"maps must have at least 2 dims [..., H, W], got {tuple(maps.shape)}")
    maps = maps.float()
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _columns(keys: list[GalleryKey]) -> list[str]:
    present = {column for _, _, column in keys}
    known = [column for column in _COLUMN_ORDER if column in present]
    rest = sorted(present - set(known), key=_natural_key)
    return known + rest


def _rows(keys: list[GalleryKey]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((method, layer) for method, layer, _ in keys))


def _image_array(sample: GallerySample) -> np.ndarray:
    return sample.image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _normalised(sample: GallerySample, keys: list[GalleryKey]) -> dict:
    if not keys:
        return {}
    stacked = normalise_maps(torch.stack([sample.maps[key].detach() for key in keys]))
    return dict(zip(keys, stacked.cpu().numpy(), strict=True))


def _blank(ax, text: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _overlay(ax, image: np.ndarray, saliency: np.ndarray, title: str) -> None:
    ax.imshow(image)
    ax.imshow(saliency, cmap=MAP_CMAP, alpha=MAP_ALPHA, vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize="small")


def _show_mask(ax, image: np.ndarray, mask: torch.Tensor, name: str) -> None:
    mask = mask.cpu().numpy()
    fill = np.zeros((*mask.shape, 4))
    fill[mask] = (*MASK_COLOUR, 0.35)
    ax.imshow(image)
    ax.imshow(fill)
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[MASK_COLOUR], linewidths=1.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"mask: {name}" + ("" if mask.any() else " (empty)"), fontsize="small")


def _colorbar(figure: Figure, axes: list) -> None:
    if axes:
        figure.colorbar(
            ScalarMappable(norm=Normalize(0.0, 1.0), cmap=MAP_CMAP),
            ax=axes,
            shrink=0.8,
            label="saliency, min-max normalised per map (0–1)",
        )


def build_sample_figure(sample: GallerySample) -> Figure:
    """Row 0: the image and each mask (filled + outlined); then one row per (method, layer) with
    that method's map of every target column overlaid on the image, columns aligned across rows
    so the top-1 and top-2 maps of each method sit side by side."""
    keys = list(sample.maps)
    rows = _rows(keys)
    columns = _columns(keys)
    width = max(1 + len(sample.masks), len(columns), 1)
    figure = Figure(
        figsize=(PANEL_INCHES * width + 1.2, PANEL_INCHES * (1 + len(rows)) + 0.6),
        layout="constrained",
    )
    axes = figure.subplots(1 + len(rows), width, squeeze=False)
    image = _image_array(sample)
    axes[0, 0].imshow(image)
    axes[0, 0].set_xticks([])
    axes[0, 0].set_yticks([])
    axes[0, 0].set_title(f"image ({sample.class_text(sample.label)})", fontsize="small")
    for ax, (name, mask) in zip(axes[0, 1:], sample.masks.items(), strict=False):
        _show_mask(ax, image, mask, name)
    for ax in axes[0, 1 + len(sample.masks) :]:
        ax.set_axis_off()
    maps = _normalised(sample, keys)
    map_axes = []
    for r, (method, layer) in enumerate(rows, start=1):
        for c, column in enumerate(columns):
            ax = axes[r, c]
            key = (method, layer, column)
            if key in maps:
                _overlay(ax, image, maps[key], sample.column_title(method, column))
                map_axes.append(ax)
            else:
                _blank(ax, "not computed")
                ax.set_title(f"{method} · {column}", fontsize="small")
        axes[r, 0].set_ylabel(f"layer: {layer}", fontsize="small")
        for ax in axes[r, len(columns) :]:
            ax.set_axis_off()
    _colorbar(figure, list(axes.ravel()) if map_axes else [])
    figure.suptitle(
        f"Sample {sample.index}: true {sample.class_text(sample.label)}, "
        f"top-1 {sample.class_text(sample.top1)}, top-2 {sample.class_text(sample.top2)}"
    )
    return figure


def _check_unique(samples: list[GallerySample]) -> None:
    indices = [sample.index for sample in samples]
    if len(set(indices)) != len(indices):
        duplicates = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(f"gallery samples must have distinct indices; repeated: {duplicates}")


def render_gallery(samples: list[GallerySample], directory: Path) -> list[Path]:
    """One PNG per sample of :func:`build_sample_figure`; ``[]`` for no samples."""
    _check_unique(samples)
    return [
        save_figure(
            build_sample_figure(sample),
            Path(directory) / f"{slug('gallery', f'sample-{sample.index:06d}')}.png",
        )
        for sample in samples
    ]


def build_grid_figure(samples: list[GallerySample], column: str = "top1") -> Figure:
    """Overview: one row per sample (the image, then every (method, layer)'s ``column`` map
    overlaid on it), one column per (method, layer) present in any sample."""
    if not samples:
        raise ValueError("the gallery grid needs at least one sample")
    pairs = list(
        dict.fromkeys((m, layer) for s in samples for m, layer, c in s.maps if c == column)
    )
    if not pairs:
        available = sorted({c for s in samples for _, _, c in s.maps}, key=_natural_key)
        raise ValueError(f"no sample has a {column!r} map; map columns present: {available}")
    several_layers = len({layer for _, layer in pairs}) > 1
    figure = Figure(
        figsize=(PANEL_INCHES * (1 + len(pairs)) + 1.2, PANEL_INCHES * len(samples) + 0.6),
        layout="constrained",
    )
    axes = figure.subplots(len(samples), 1 + len(pairs), squeeze=False)
    map_axes = []
    for row, sample in zip(axes, samples, strict=True):
        image = _image_array(sample)
        row[0].imshow(image)
        row[0].set_xticks([])
        row[0].set_yticks([])
        row[0].set_title(f"sample {sample.index}", fontsize="small")
        row[0].set_ylabel(f"true {sample.class_text(sample.label)}", fontsize="small")
        keys = [(m, layer, column) for m, layer in pairs if (m, layer, column) in sample.maps]
        maps = _normalised(sample, keys)
        for ax, (method, layer) in zip(row[1:], pairs, strict=True):
            name = f"{method} @ {layer}" if several_layers else method
            key = (method, layer, column)
            if key in maps:
                _overlay(ax, image, maps[key], sample.column_title(name, column))
                map_axes.append(ax)
            else:
                _blank(ax, "not computed")
                ax.set_title(f"{name} · {column}", fontsize="small")
    _colorbar(figure, list(axes.ravel()) if map_axes else [])
    figure.suptitle(f"Gallery overview: {column} maps of {len(samples)} samples")
    return figure


def gallery_grid(samples: list[GallerySample], directory: Path, column: str = "top1") -> list[Path]:
    """One overview PNG of :func:`build_grid_figure`; ``[]`` for no samples."""
    if not samples:
        return []
    _check_unique(samples)
    return [
        save_figure(
            build_grid_figure(samples, column),
            Path(directory) / f"{slug('gallery_grid', column)}.png",
        )
    ]
