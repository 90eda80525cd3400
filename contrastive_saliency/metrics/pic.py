"""PIC (SIC / AIC) as a torchmetrics class (Kapishnikov et al., XRAI, ICCV 2019, Sec. 4.1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from contrastive_saliency.checks import check_batch_size
from contrastive_saliency.metrics.functional.pic import (
    DEFAULT_THRESHOLDS,
    TIES,
    pic_curves,
    random_pixel_masks,
)
from contrastive_saliency.metrics.per_sample import SampleMetric, summary_statistics
from contrastive_saliency.metrics.registry import CurveInfo, register_curves

_INFORMATION = "normalised information level of the kept pixels (compressed size, 0–1)"


@register_curves
class PerformanceInformationCurves(SampleMetric):
    """Per-image SIC and AIC areas with their validity flags (XRAI's skipping rules: original
    softmax < ``min_confidence``, a start image not less informative or not lower-scoring).

    ``update(model, images, maps, classes, index)`` runs
    :func:`~contrastive_saliency.metrics.functional.pic.pic_curves` (``mean``/``std`` of the datamodule,
    forward batches of ``batch_size``; the random 1 % start mask is seeded per sample by
    ``seed + index``, so it does not depend on how samples are batched or sharded; ``index``
    also keys the random tie-breaking at the quantiles; ``ties`` as in ``pic_curves``).
    ``compute()`` gives summary statistics of the per-image AUCs over the VALID images only
    (``sic_auc/*``, ``aic_auc/*``, and ``…/count`` = images kept). The paper's aggregate, the
    AUC of the median curve, needs whole curves: use
    :func:`~contrastive_saliency.metrics.functional.pic.aggregate_pic` on the functional's results.
    Columns: ``sic_auc``, ``aic_auc``, ``sic_valid``, ``aic_valid``.
    """

    value_names: ClassVar[tuple[str, ...]] = ("sic_auc", "aic_auc", "sic_valid", "aic_valid")
    higher_is_better = True
    curves: ClassVar[tuple[CurveInfo, ...]] = (
        CurveInfo(
            "pic_sic", "Softmax information curve (SIC)", _INFORMATION,
            "normalised softmax score of the explained class (0–1)",
        ),
        CurveInfo("pic_aic", "Accuracy information curve (AIC)", _INFORMATION,
                  "normalised accuracy (0–1)"),
    )  # fmt: skip

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        min_confidence: float = 0.8,
        batch_size: int = 64,
        seed: int = 0,
        ties: str = "random",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mean, self.std = tuple(mean), tuple(std)
        self.thresholds = tuple(thresholds)
        self.min_confidence = min_confidence
        self.batch_size = check_batch_size(batch_size)
        self.seed = seed
        if ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
        self.ties = ties

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
    ) -> None:
        """SIC/AIC of ``maps`` for ``classes`` on the samples ``index``."""
        height, width = images.shape[-2:]
        # The start mask follows the sample (seed + index), not its position in the batch, so
        # results do not depend on batching or sharding.
        random_masks = torch.cat(
            [random_pixel_masks(1, height, width, seed=self.seed + int(i)) for i in index]
        )
        result = pic_curves(
            model,
            images,
            maps,
            classes,
            mean=self.mean,
            std=self.std,
            thresholds=self.thresholds,
            random_masks=random_masks,
            min_confidence=self.min_confidence,
            batch_size=self.batch_size,
            indices=index,
            ties=self.ties,
        )
        self._add(
            index,
            sic_auc=result.sic_auc.float(),
            aic_auc=result.aic_auc.float(),
            sic_valid=result.sic_valid.float(),
            aic_valid=result.aic_valid.float(),
        )

    def compute(self) -> dict[str, torch.Tensor]:
        _, rows = self._unique_rows(len(self.value_names))
        result: dict[str, torch.Tensor] = {}
        for column, name in enumerate(("sic_auc", "aic_auc")):
            valid = rows[:, column + 2] > 0.5
            for statistic, value in summary_statistics(rows[valid, column]).items():
                result[f"{name}/{statistic}"] = value
            result[f"{name}/skipped"] = (~valid).sum()
        return result
