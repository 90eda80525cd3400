"""Channel activity as a torchmetrics class (CASE Sec. V-B, Eq. 10)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from contrastive_saliency.metrics.functional.representation import (
    channel_activity,
    class_channel_activity,
)
from contrastive_saliency.metrics.per_sample import SampleMetric


class ChannelActivity(SampleMetric):
    """Per-sample number of active channels of a layer, ``Σ_c 1[mean_ij A_c > τ]`` (CASE
    Eq. 10, τ = 0.001), with the sample's class, for the per-class means CASE plots.

    ``update(activations, labels, index, correct=None)``: ``[B, C, h, w]`` activations, ``[B]``
    ground-truth labels and sample indices; ``correct`` ``[B]`` bool keeps only correctly
    predicted images (as CASE does). Columns: ``active_channels``, ``label``. ``compute()`` adds
    ``active_channels/class_mean`` (``[num_classes]``, 0 for classes without images) and
    ``active_channels/class_count`` when ``num_classes`` is given.
    """

    value_names: ClassVar[tuple[str, ...]] = ("active_channels", "label")

    def __init__(self, tau: float = 0.001, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.tau = tau
        self.num_classes = num_classes

    def update(
        self,
        activations: torch.Tensor,
        labels: torch.Tensor,
        index: torch.Tensor,
        correct: torch.Tensor | None = None,
    ) -> None:
        """Active-channel counts of the samples ``index`` (only ``correct`` ones if given)."""
        if correct is not None:
            keep = correct.bool()
            activations, labels, index = activations[keep], labels[keep], index[keep]
        counts = channel_activity(activations, self.tau).float()
        self._add(index, active_channels=counts, label=labels.float())

    def compute(self) -> dict[str, torch.Tensor]:
        _, rows = self._unique_rows(len(self.value_names))
        result = {
            key: value for key, value in super().compute().items() if not key.startswith("label/")
        }
        if self.num_classes is not None:
            by_class = class_channel_activity(rows[:, 0], rows[:, 1].long(), self.num_classes)
            result["active_channels/class_mean"] = by_class.mean
            result["active_channels/class_count"] = by_class.num_images
        return result
