"""ROAD (Rong et al., ICML 2022) as a registered torchmetrics class over
:func:`contrastive_saliency.metrics.functional.road.road`: per sample the mean class score
over the removal percentages with the most (MoRF) and least (LeRF) relevant pixels removed
by noisy linear imputation, and the combined ``(LeRF − MoRF) / 2``.

``update(model, images, maps, classes, index)``: the model is not kept; images in the model's
input space ``[B, C, H, W]``, maps ``[B, H, W]``, the explained ``classes`` ``[B]`` and the
sample ``index`` ``[B]`` (the seed of the tie-breaking and of the imputation noise).
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


@register_metric("road")
class Road(RegisteredMetric):
    """Per-sample ROAD (Remove And Debias; Rong, Leemann, Borisov, Kasneci & Kasneci, ICML
    2022): pixels removed in saliency order and replaced by noisy linear imputation (the
    weighted mean of the 8 neighbours, 1/6 direct and 1/12 diagonal, solved as the paper's
    sparse system, plus N(0, ``noise_std``²) noise seeded by the sample index), the class
    score averaged over the removal ``percentages``. As pytorch-grad-cam's ``ROADCombined``
    (its MoRF/LeRF averages minus the unperturbed score) and Quantus ``ROAD`` (accuracy; on
    single-channel images, see tests/test_road.py).

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

    Columns: ``road_morf`` (lower = more faithful), ``road_lerf`` (higher = more faithful) and
    ``road`` = ``(road_lerf − road_morf) / 2`` (higher = more faithful, the metric's
    direction).
    """

    higher_is_better = True
    title = "ROAD (LeRF − MoRF) / 2"
    family = "faithfulness"
    outputs: ClassVar[dict[str, str]] = {
        "_morf": "ROAD MoRF (lower = more faithful)",
        "_lerf": "ROAD LeRF (higher = more faithful)",
        "": "ROAD (LeRF − MoRF) / 2",
    }
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"score": SCORES}

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
        self.batch_size = check_batch_size(batch_size, "road")

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        maps, classes = inputs.single
        return {"model": inputs.model, "images": inputs.images, "maps": maps,
                "classes": classes, "index": inputs.index}  # fmt: skip

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
    ) -> None:
        """ROAD MoRF, LeRF and combined of ``classes`` for the samples ``index``."""
        result = road(
            model, images, maps, classes, self.percentages, self.noise_std, self.score,
            self.batch_size, indices=index, seed=self.seed, pixel_std=self.pixel_std,
        )  # fmt: skip
        self._add(index, road_morf=result.morf, road_lerf=result.lerf, road=result.combined)
