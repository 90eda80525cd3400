"""Localisation metrics as torchmetrics classes: pointing game, energy pointing game,
localisation error, AUPR₁/AUPR₀, grid pointing game and VAR's region scores.

Pure functions of the maps (no model): ``update`` takes maps ``[B, H, W]``, the ground truth
(bool masks ``[B, H, W]``, xyxy pixel-edge boxes ``[B, 4]``, or the target cell ``[B]`` of a
grid image) and the sample ``index`` ``[B]``. Boxes can be turned into masks with
:func:`~contrastive_saliency.metrics.functional.localisation.boxes_to_masks` (Score-CAM's energy pointing
game uses boxes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.metrics.functional.localisation import (
    aupr,
    boxes_to_masks,
    energy_pointing_game,
    grid_pointing_game,
    grid_region_scores,
    localisation_error,
    pointing_game,
    region_scores,
    relevance_rank_accuracy,
    top_k_intersection,
)
from contrastive_saliency.metrics.per_sample import SampleMetric
from contrastive_saliency.metrics.registry import MetricInputs, RegisteredMetric, register_metric

# output suffix → (key of the functional's dict, title); VAR App. B.1
_REGION_OUTPUTS = {
    "_ra": ("region_attribution", "region attribution (RA)"),
    "_iou": ("iou", "IoU"),
    "_precision": ("precision", "precision"),
    "_recall": ("recall", "recall"),
    "_f1": ("f1", "F1"),
}
_REGION_TITLES = {suffix: title for suffix, (_, title) in _REGION_OUTPUTS.items()}


def _check_grid(grid: int) -> int:
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive number of cells per side, got {grid!r}")
    return grid


def _check_region_options(blur_kernel: int, threshold: float) -> None:
    if blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ValueError(f"blur_kernel must be a positive odd size, got {blur_kernel}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(
            f"threshold is a fraction of each map's maximum in [0, 1), got {threshold}"
        )


def region_masks(batch: Mapping[str, Any], key: str, size: tuple[int, int]) -> torch.Tensor:
    """Bool ``[B, H, W]`` regions from the batch field ``key``: a mask ``[B, H, W]``, the
    union of per-object masks ``[B, n, H, W]`` or of xyxy pixel boxes ``[B, n, 4]`` (padded
    with empty boxes) at the image ``size``."""
    value = batch[key]
    if key == "boxes":
        height, width = size
        boxes = value.reshape(-1, 4)
        value = boxes_to_masks(boxes, height, width).view(*value.shape[:2], height, width)
    if value.dim() == 4:
        value = value.any(dim=1)
    return value.bool()


class _MaskMetric(RegisteredMetric):
    """A single-map metric against the region of the batch field ``mask_key`` (``mask``,
    ``part_mask`` or ``boxes``): ``update(maps, masks, index)``."""

    family = "localisation"

    def __init__(self, mask_key: str = "mask", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mask_key = mask_key

    def update_arguments(self, inputs: MetricInputs) -> dict[str, torch.Tensor]:
        maps, _ = inputs.single
        masks = region_masks(inputs.batch, self.mask_key, inputs.images.shape[-2:])
        return {"maps": maps, "masks": masks.to(maps.device), "index": inputs.index}


@register_metric("pointing_game")
class PointingGame(_MaskMetric):
    """Per-sample hit (1/0): the map's maximum lies inside the mask (Zhang et al. 2018; CAAP
    Sec. 4 "PG"); tied maxima score by ``ties``: ``expected`` (default) the share of them
    inside the mask, ``first`` the first in row-major order, ``any`` a hit when any is inside
    (:func:`~contrastive_saliency.metrics.functional.localisation.pointing_game`). The paper's score is the
    hit rate, the column's mean. ``tolerance_px``: a hit also within that distance of the mask
    (15 = Zhang et al. 2018 / TorchRay's protocol; default 0, the mask itself).

    ``update(maps, masks, index)``. Column: ``pointing_game``.
    """

    higher_is_better = True
    title = "pointing game"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"ties": ("expected", "first", "any")}

    def __init__(
        self, mask_key: str = "mask", ties: str = "expected", tolerance_px: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(mask_key, **kwargs)
        if ties not in self.choices["ties"]:
            raise ValueError(f"ties must be one of {self.choices['ties']}, got {ties!r}")
        if isinstance(tolerance_px, bool) or not isinstance(tolerance_px, int) or tolerance_px < 0:
            raise ValueError(f"tolerance_px must be a non-negative integer, got {tolerance_px!r}")
        self.ties = ties
        self.tolerance_px = tolerance_px

    def update(self, maps: torch.Tensor, masks: torch.Tensor, index: torch.Tensor) -> None:
        """Hits of ``maps`` in ``masks`` (bool) for the samples ``index``."""
        hits = pointing_game(maps, masks, self.ties, self.tolerance_px)
        self._add(index, pointing_game=hits.float())


@register_metric("energy_pointing_game")
class EnergyPointingGame(_MaskMetric):
    """Per-sample share of the positive saliency mass inside the mask (Score-CAM, Wang et al.
    2020; ClusCAM App. C Eq. 14); reported as the mean.

    ``update(maps, masks, index)``. Column: ``energy_pointing_game``.
    """

    higher_is_better = True
    title = "energy pointing game"

    def update(self, maps: torch.Tensor, masks: torch.Tensor, index: torch.Tensor) -> None:
        """Energy of ``maps`` inside ``masks`` (bool) for the samples ``index``."""
        self._add(index, energy_pointing_game=energy_pointing_game(maps, masks))


@register_metric("relevance_rank_accuracy")
class RelevanceRankAccuracy(_MaskMetric):
    """Per-sample share of the ``|R|`` highest-valued pixels inside the mask ``R`` (Arras et al.
    2022; Quantus ``RelevanceRankAccuracy``); ties at the ``|R|``-th value by their expected
    share, an empty mask 0
    (:func:`~contrastive_saliency.metrics.functional.localisation.relevance_rank_accuracy`).

    ``update(maps, masks, index)``. Column: ``relevance_rank_accuracy``.
    """

    higher_is_better = True
    title = "relevance rank accuracy"

    def update(self, maps: torch.Tensor, masks: torch.Tensor, index: torch.Tensor) -> None:
        """Rank accuracy of ``maps`` for ``masks`` (bool) for the samples ``index``."""
        self._add(index, relevance_rank_accuracy=relevance_rank_accuracy(maps, masks))


@register_metric("top_k_intersection")
class TopKIntersection(_MaskMetric):
    """Per-sample share of the ``k`` highest-valued pixels inside the mask (Theiner et al.
    2021; Quantus ``TopKIntersection``); ties at the ``k``-th value count by their expected
    share (:mod:`contrastive_saliency.metrics.functional.ties`).

    Args:
        mask_key: the batch field of the region (evaluation).
        fraction: ``k`` as a share of the map's pixels, ``max(1, round(fraction · H · W))``.
        k: a number of pixels instead (Quantus' ``k``); wins over ``fraction`` when given.

    ``update(maps, masks, index)``. Column: ``top_k_intersection``.
    """

    higher_is_better = True
    title = "top-k intersection"

    def __init__(
        self, mask_key: str = "mask", fraction: float = 0.05, k: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(mask_key, **kwargs)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive number of pixels, got {k!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be a share of the pixels in (0, 1], got {fraction}")
        self.fraction, self.k = fraction, k

    def update(self, maps: torch.Tensor, masks: torch.Tensor, index: torch.Tensor) -> None:
        """Top-``k`` intersection of ``maps`` with ``masks`` (bool) for the samples ``index``."""
        k = self.k or max(1, round(self.fraction * maps[0].numel()))
        self._add(index, top_k_intersection=top_k_intersection(maps, masks, k))


class LocalisationError(SampleMetric):
    """Per-sample ``1 − IoU`` of the box around the pixels at or above the map's mean and the
    ground-truth box (Opti-CAM; ClusCAM App. C Eq. 15); reported as the mean, lower is better.

    ``update(maps, boxes, index)`` with ``boxes`` ``[B, 4]`` xyxy pixel-edge coordinates.
    Column: ``localisation_error``.
    """

    value_names: ClassVar[tuple[str, ...]] = ("localisation_error",)
    higher_is_better = False

    def update(self, maps: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor) -> None:
        """Localisation error of ``maps`` against ``boxes`` for the samples ``index``."""
        self._add(index, localisation_error=localisation_error(maps, boxes))


@register_metric("aupr")
class AUPR(_MaskMetric):
    """Per-sample AUPR₁ (average precision of the min-max normalised map against the mask) and
    AUPR₀ (of ``1 − map`` against the inverted mask) (CAAP Sec. 4); reported as means, higher
    is better.

    ``update(maps, masks, index)``. Columns: ``aupr1``, ``aupr0``.
    """

    higher_is_better = True
    title = "AUPR"
    outputs: ClassVar[dict[str, str]] = {"1": "AUPR₁", "0": "AUPR₀"}

    def update(self, maps: torch.Tensor, masks: torch.Tensor, index: torch.Tensor) -> None:
        """AUPR₁ and AUPR₀ of ``maps`` against ``masks`` (bool) for the samples ``index``."""
        positive, negative = aupr(maps, masks)
        self._add(index, aupr1=positive, aupr0=negative)


@register_metric("grid_pointing_game")
class GridPointingGame(RegisteredMetric):
    """Per-sample share of the positive mass in the target cell of a ``grid × grid`` image
    (Rao et al. 2022; VAR Sec. 4.1, App. B.1); 0 when the total is ≤ ``eps``; chance is
    ``1 / grid²``; reported as the mean. Keeping only confidently and correctly classified
    grids (≥ 0.99) is the caller's / the grid dataset's.

    Args:
        grid: cells per side (2 for Quad grids); ``None``: from the number of cells of the
            ``[B, cells, H, W]`` form below (required with ``cell_index``).
        eps: total positive mass below which the score is 0 (Rao et al.: 1e-7).
        kwargs: torchmetrics ``Metric`` options.

    ``update(maps, cell_index, index)`` with maps ``[B, H, W]`` and ``cell_index`` ``[B]``
    row-major target cells, one value per map; or maps ``[B, cells, H, W]`` (each cell of each
    grid explained) with ``cell_index=None``: per grid the mean over its cells (the
    evaluation's ``grid`` target policy). Column: ``grid_pointing_game``.
    """

    higher_is_better = True
    title = "grid pointing game"
    family = "localisation"
    target_kind = "grid"

    def __init__(self, grid: int | None = None, eps: float = 1e-7, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.grid = None if grid is None else _check_grid(grid)
        self.eps = eps

    def update(
        self, maps: torch.Tensor, cell_index: torch.Tensor | None, index: torch.Tensor
    ) -> None:
        """Share of ``maps`` in cells ``cell_index`` for the samples ``index``."""
        if cell_index is not None:
            if self.grid is None:
                raise ValueError("GridPointingGame(grid=None) scores [B, cells, H, W] maps; "
                                 "give grid (cells per side) to score maps with a cell_index")  # fmt: skip
            score = grid_pointing_game(maps, cell_index, self.grid, self.eps)
            self._add(index, grid_pointing_game=score)
            return
        batch, cells = maps.shape[:2]
        grid = self.grid or round(cells**0.5)
        if grid * grid != cells:
            raise ConfigurationError(
                f"grid_pointing_game needs a square grid of {'grid² = ' if self.grid else ''}"
                f"{grid * grid if self.grid else 'n²'} cells, got {cells} cells"
            )
        cell_index = torch.arange(cells, device=maps.device).repeat(batch)
        score = grid_pointing_game(maps.flatten(0, 1), cell_index, grid, self.eps)
        self._add(index, grid_pointing_game=score.view(batch, cells).mean(dim=1))

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        return {"maps": inputs.maps, "cell_index": None, "index": inputs.index}


class _RegionScoreOptions(RegisteredMetric):
    """Shared options of :class:`RegionScores` and :class:`GridRegionScores`: VAR App. B.1's
    scores as five values (outputs ``_ra``, ``_iou``, ``_precision``, ``_recall``, ``_f1``)."""

    higher_is_better = True
    family = "localisation"

    def __init__(
        self,
        blur_kernel: int = 11,
        blur_sigma: float | None = None,
        threshold: float = 0.0,
        eps: float = 1e-7,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_region_options(blur_kernel, threshold)
        if blur_sigma is not None and not blur_sigma > 0:
            raise ValueError(
                f"blur_sigma must be positive or None (OpenCV's default), got {blur_sigma}"
            )
        self.blur_kernel = blur_kernel
        self.blur_sigma = blur_sigma
        self.threshold = threshold
        self.eps = eps

    def _add_scores(self, index: torch.Tensor, scores: Mapping[str, torch.Tensor]) -> None:
        """Store the functional's ``scores`` (keyed ``region_attribution``, ``iou``, ...) under
        this metric's value names."""
        self._add(
            index,
            **{self.name + suffix: scores[key] for suffix, (key, _) in _REGION_OUTPUTS.items()},
        )


@register_metric("region_scores")
class RegionScores(_RegionScoreOptions, _MaskMetric):
    """VAR's localisation scores against a region (VAR App. B.1, its COCO protocol with
    ``mask_key: mask``): region attribution (share of the positive map's mass in the region
    after an 11×11 Gaussian blur), IoU, precision, recall and F1 of the attributed pixels;
    reported as means.

    Args:
        mask_key: the batch field of the region (``mask``, ``part_mask`` or ``boxes``).
        blur_kernel, blur_sigma, threshold, eps: as
            :func:`~contrastive_saliency.metrics.functional.localisation.region_scores`.
        kwargs: torchmetrics ``Metric`` options.

    ``update(maps, masks, index)``. Columns: ``region_scores_ra``, ``region_scores_iou``,
    ``region_scores_precision``, ``region_scores_recall``, ``region_scores_f1``.
    """

    title = "VAR region scores"
    target_kind = "single"
    outputs: ClassVar[dict[str, str]] = _REGION_TITLES

    def __init__(
        self,
        mask_key: str = "mask",
        blur_kernel: int = 11,
        blur_sigma: float | None = None,
        threshold: float = 0.0,
        eps: float = 1e-7,
        **kwargs: Any,
    ) -> None:
        super().__init__(blur_kernel, blur_sigma, threshold, eps, **kwargs)
        self.mask_key = mask_key

    def update(self, maps: torch.Tensor, masks: torch.Tensor, index: torch.Tensor) -> None:
        """Region scores of ``maps`` against ``masks`` (bool) for the samples ``index``."""
        scores = region_scores(
            maps, masks, self.blur_kernel, self.blur_sigma, self.threshold, self.eps
        )
        self._add_scores(index, scores)


@register_metric("grid_region_scores")
class GridRegionScores(_RegionScoreOptions):
    """:class:`RegionScores` with the target cell of a ``grid × grid`` image as the region
    (VAR Sec. 4.1 / App. B.1 / Table 1, Quad-ImageNet): RA, IoU, precision, recall and F1 of
    each cell's map after the 11×11 blur.

    Args:
        grid: cells per side (2 for Quad grids); ``None``: from the number of cells of the
            ``[B, cells, H, W]`` form (required with ``cell_index``). The others as
            :class:`RegionScores`.

    ``update(maps, cell_index, index)`` with maps ``[B, H, W]`` and ``cell_index`` ``[B]``
    row-major target cells, one value per map; or maps ``[B, cells, H, W]`` (each cell of each
    grid explained, the evaluation's ``grid_cells`` policy) with ``cell_index=None``: per grid
    the mean over its cells, as :class:`GridPointingGame`. Columns: ``grid_region_scores_ra``,
    ``grid_region_scores_iou``, ``grid_region_scores_precision``,
    ``grid_region_scores_recall``, ``grid_region_scores_f1``.
    """

    title = "VAR grid region scores"
    target_kind = "grid"
    outputs: ClassVar[dict[str, str]] = _REGION_TITLES

    def __init__(
        self,
        grid: int | None = None,
        blur_kernel: int = 11,
        blur_sigma: float | None = None,
        threshold: float = 0.0,
        eps: float = 1e-7,
        **kwargs: Any,
    ) -> None:
        super().__init__(blur_kernel, blur_sigma, threshold, eps, **kwargs)
        self.grid = None if grid is None else _check_grid(grid)

    def update(
        self, maps: torch.Tensor, cell_index: torch.Tensor | None, index: torch.Tensor
    ) -> None:
        """Region scores of ``maps`` in cells ``cell_index`` for the samples ``index``."""
        options = (self.blur_kernel, self.blur_sigma, self.threshold, self.eps)
        if cell_index is not None:
            if self.grid is None:
                raise ValueError("GridRegionScores(grid=None) scores [B, cells, H, W] maps; "
                                 "give grid (cells per side) to score maps with a cell_index")  # fmt: skip
            self._add_scores(index, grid_region_scores(maps, cell_index, self.grid, *options))
            return
        batch, cells = maps.shape[:2]
        grid = self.grid or round(cells**0.5)
        if grid * grid != cells:
            raise ConfigurationError(
                f"grid_region_scores needs a square grid of {'grid² = ' if self.grid else ''}"
                f"{grid * grid if self.grid else 'n²'} cells, got {cells} cells"
            )
        cell_index = torch.arange(cells, device=maps.device).repeat(batch)
        scores = grid_region_scores(maps.flatten(0, 1), cell_index, grid, *options)
        self._add_scores(
            index, {key: value.view(batch, cells).mean(dim=1) for key, value in scores.items()}
        )

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        return {"maps": inputs.maps, "cell_index": None, "index": inputs.index}
