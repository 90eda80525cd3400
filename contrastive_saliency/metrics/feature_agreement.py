"""Class sensitivity: top-k feature agreement between the maps of two classes (CASE RQ1)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from contrastive_saliency.metrics.functional.feature_agreement import (
    feature_agreement,
    top_fraction_count,
)
from contrastive_saliency.metrics.registry import MetricInputs, RegisteredMetric, register_metric
from contrastive_saliency.stats import wilcoxon_below


@register_metric("feature_agreement")
class FeatureAgreement(RegisteredMetric):
    """Per-sample ``|topk(E) ∩ topk(E′)| / k`` (CASE Eq. 7) of the maps of two classes, usually
    the top-1 and top-2 predictions; lower = more class-sensitive. Ties count by their expected
    overlap under uniform tie-breaking (:mod:`contrastive_saliency.metrics.functional.ties`), so two maps
    with fewer than ``k`` positive pixels agree by chance only.

    Args:
        fraction: ``k`` as a share of the pixels (CASE: 5 %).
        wilcoxon_threshold: when set, :meth:`compute` adds CASE's one-sided Wilcoxon
            signed-rank test of H1: median agreement < threshold (CASE Eq. 8; 0.5 in the paper,
            0.7 in its code) as ``feature_agreement/wilcoxon_statistic`` and ``…/wilcoxon_p``.
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, …).

    ``update(maps_a, maps_b, index)``: ``[B, H, W]`` maps (only their positive part ranks) and
    the ``[B]`` sample indices. Column: ``feature_agreement``.
    """

    higher_is_better = False
    title = "feature agreement"
    family = "class_sensitivity"
    target_kind = "pair"
    # the evaluation tests agreement with its own evaluation.agreement_threshold
    internal_options: ClassVar[tuple[str, ...]] = ("wilcoxon_threshold",)

    def __init__(
        self, fraction: float = 0.05, wilcoxon_threshold: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        top_fraction_count(1, fraction)  # validates the fraction now, not at the first update
        if wilcoxon_threshold is not None and not 0.0 <= wilcoxon_threshold <= 1.0:
            raise ValueError(
                f"wilcoxon_threshold is an agreement in [0, 1], got {wilcoxon_threshold}"
            )
        self.fraction = fraction
        self.wilcoxon_threshold = wilcoxon_threshold

    def update(self, maps_a: torch.Tensor, maps_b: torch.Tensor, index: torch.Tensor) -> None:
        """Agreement of ``maps_a`` and ``maps_b`` (``[B, H, W]``) for the samples ``index``."""
        self._add(index, feature_agreement=feature_agreement(maps_a, maps_b, self.fraction))

    def update_arguments(self, inputs: MetricInputs) -> dict[str, torch.Tensor]:
        return {"maps_a": inputs.maps[:, 0], "maps_b": inputs.maps[:, 1], "index": inputs.index}

    def _extra_statistics(self, name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.wilcoxon_threshold is None:
            return {}
        if values.numel():
            test = wilcoxon_below(values.cpu().double().numpy(), self.wilcoxon_threshold)
            statistic, p_value = test.statistic, test.p_value
        else:
            statistic, p_value = math.nan, math.nan
        return {
            "wilcoxon_statistic": torch.tensor(
                statistic, dtype=torch.float64, device=values.device
            ),
            "wilcoxon_p": torch.tensor(p_value, dtype=torch.float64, device=values.device),
        }
