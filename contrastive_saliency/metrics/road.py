"""ROAD (Rong et al., ICML 2022) as three registered torchmetrics classes over
:func:`contrastive_saliency.metrics.functional.road.road`: per sample the mean class score
over the removal percentages with the most (``road_morf``, lower is better) and least
(``road_lerf``, higher is better) relevant pixels removed by noisy linear imputation, and the
combined ``road`` = ``(LeRF − MoRF) / 2`` (higher is better). Three metrics, not one with
three values, because the registry keeps one direction per metric. Metrics given the same
``cache`` dict in ``update`` (the evaluation shares one per batch, method, layer and target
policy) compute each curve once, and each computes only the curves it needs.

``update(model, images, maps, classes, index, cache)``: the model is not kept; images in the
model's input space ``[B, C, H, W]``, maps ``[B, H, W]``, the explained ``classes`` ``[B]``, the
sample ``index`` ``[B]`` (the seed of the tie-breaking and of the imputation noise); ``cache``
is the optional dict shared by the metrics of one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from contrastive_saliency.checks import check_batch_size
from contrastive_saliency.metrics.functional.road import (
    DEFAULT_PERCENTAGES,
    SCORES,
    check_percentages,
    road,
)
from contrastive_saliency.metrics.registry import MetricInputs, RegisteredMetric, register_metric


class _RoadMetric(RegisteredMetric):
    """Per-sample ROAD (Remove And Debias; Rong, Leemann, Borisov, Kasneci & Kasneci, ICML
    2022): pixels removed in saliency order and replaced by noisy linear imputation (the
    weighted mean of the 8 neighbours, 1/6 direct and 1/12 diagonal, solved as the paper's
    sparse system, plus N(0, ``noise_std``²) noise seeded by the sample index), the class
    score averaged over the removal ``percentages``. The options, checks and shared curves of
    ``road_morf``, ``road_lerf`` and ``road``, which all take these options.

    Args:
        percentages: pixels removed, in % of the image (pytorch-grad-cam's 10, 20, …, 90).
        noise_std: σ of the imputation noise (0.01, the authors' and peers' default), in the
            images' space, or in pixel units with ``pixel_std``.
        score: ``probability`` (softmax; the authors' "average probability"), ``logit`` or
            ``accuracy`` (1 while the model still predicts the class).
        pixel_std: the normalisation's per-channel std, to give ``noise_std`` in pixel units
            as the authors' code (which imputes before normalising); ``None``: input space.
        seed: the noise stream's seed.
        batch_size: perturbed images per imputation solve and forward pass.
        kwargs: torchmetrics ``Metric`` options.
    """

    family = "faithfulness"
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"score": SCORES}
    _orders: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        percentages: Sequence[float] = DEFAULT_PERCENTAGES,
        noise_std: float = 0.01,
        score: str = "probability",
        pixel_std: Sequence[float] | None = None,
        seed: int = 0,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.percentages = check_percentages(percentages)
        if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) or noise_std < 0:
            raise ValueError(f"noise_std must be a number ≥ 0, got {noise_std!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        if pixel_std is not None and (
            not pixel_std or any(not isinstance(s, int | float) or s <= 0 for s in pixel_std)
        ):
            raise ValueError(
                f"pixel_std must be positive per-channel stds or None, got {pixel_std!r}"
            )
        self.noise_std, self.score, self.seed = float(noise_std), score, seed
        self.pixel_std = None if pixel_std is None else tuple(pixel_std)
        self.batch_size = check_batch_size(batch_size, self.name)

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        maps, classes = inputs.single
        return {"model": inputs.model, "images": inputs.images, "maps": maps,
                "classes": classes, "index": inputs.index, "cache": inputs.cache}  # fmt: skip

    def _curves(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
        cache: dict[str, Any] | None,
    ) -> dict[str, torch.Tensor]:
        """This metric's curves (order → ``[B, P]``), from ``cache`` when an earlier metric of
        the batch computed them with the same options; the missing ones in one ``road`` call.
        ``batch_size`` is not in the key: it bounds memory and changes no value."""
        cache = {} if cache is None else cache
        options = (self.percentages, self.noise_std, self.score, self.pixel_std, self.seed)
        keys = {order: f"road:{order}:{options}" for order in self._orders}
        missing = [order for order in self._orders if keys[order] not in cache]
        if missing:
            result = road(
                model, images, maps, classes, self.percentages, self.noise_std, self.score,
                self.batch_size, indices=index, seed=self.seed, pixel_std=self.pixel_std,
                orders=missing,
            )  # fmt: skip
            for order in missing:
                cache[keys[order]] = result.morf_curve if order == "morf" else result.lerf_curve
        return {order: cache[key] for order, key in keys.items()}


@register_metric("road_morf")
class RoadMoRF(_RoadMetric):
    """Per-sample ROAD MoRF: the class score averaged over the removal percentages with the
    most relevant pixels removed and imputed (computes the MoRF curve only; Quantus ``ROAD``
    scores this curve). Lower = more faithful. Options: :class:`_RoadMetric`.

    Column: ``road_morf``.
    """

    higher_is_better = False
    title = "ROAD MoRF"
    _orders = ("morf",)

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
        cache: dict[str, Any] | None = None,
    ) -> None:
        """ROAD MoRF of ``classes`` for the samples ``index``."""
        curves = self._curves(model, images, maps, classes, index, cache)
        self._add(index, road_morf=curves["morf"].mean(dim=1))


@register_metric("road_lerf")
class RoadLeRF(_RoadMetric):
    """Per-sample ROAD LeRF: the class score averaged over the removal percentages with the
    least relevant pixels removed and imputed (computes the LeRF curve only). Higher = more
    faithful. Options: :class:`_RoadMetric`.

    Column: ``road_lerf``.
    """

    higher_is_better = True
    title = "ROAD LeRF"
    _orders = ("lerf",)

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
        cache: dict[str, Any] | None = None,
    ) -> None:
        """ROAD LeRF of ``classes`` for the samples ``index``."""
        curves = self._curves(model, images, maps, classes, index, cache)
        self._add(index, road_lerf=curves["lerf"].mean(dim=1))


@register_metric("road")
class Road(_RoadMetric):
    """Per-sample ROAD combined ``(LeRF − MoRF) / 2`` of :class:`RoadLeRF` and
    :class:`RoadMoRF` (both curves; given the same ``cache`` as those, it reuses theirs), as
    pytorch-grad-cam's ``ROADCombined`` (its MoRF / LeRF averages minus the unperturbed
    score, which cancels). Higher = more faithful. Options: :class:`_RoadMetric`.

    Column: ``road``.
    """

    higher_is_better = True
    title = "ROAD (LeRF − MoRF) / 2"
    _orders = ("morf", "lerf")

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
        cache: dict[str, Any] | None = None,
    ) -> None:
        """ROAD combined of ``classes`` for the samples ``index``."""
        curves = self._curves(model, images, maps, classes, index, cache)
        self._add(index, road=(curves["lerf"].mean(dim=1) - curves["morf"].mean(dim=1)) / 2)
