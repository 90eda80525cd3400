"""Complexity metrics as registered torchmetrics classes: sparseness (Gini) and complexity
(entropy) of the map alone (:mod:`contrastive_saliency.metrics.functional.complexity`).

``update(maps, index)`` with maps ``[B, H, W]``; no model, no ground truth.
"""

from __future__ import annotations

from typing import Any

import torch

from contrastive_saliency.metrics.functional.complexity import complexity, sparseness
from contrastive_saliency.metrics.registry import MetricInputs, RegisteredMetric, register_metric


class _MapOnlyMetric(RegisteredMetric):
    family = "complexity"

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        maps, _ = inputs.single
        return {"maps": maps, "index": inputs.index}


@register_metric("sparseness")
class Sparseness(_MapOnlyMetric):
    """Per-sample Gini index of the map's magnitudes (Chalasani et al. 2020; Quantus
    ``Sparseness``): 0 for a constant map, ``(N − 1)/N`` for a one-hot map.

    ``update(maps, index)``. Column: ``sparseness``.
    """

    higher_is_better = True
    title = "sparseness (Gini)"

    def update(self, maps: torch.Tensor, index: torch.Tensor) -> None:
        self._add(index, sparseness=sparseness(maps))


@register_metric("complexity")
class Complexity(_MapOnlyMetric):
    """Per-sample entropy of the map's magnitudes as a distribution (Bhatt et al. 2020; Quantus
    ``Complexity``): 0 for a one-hot map, ``log N`` for a constant map.

    ``update(maps, index)``. Column: ``complexity``.
    """

    higher_is_better = False
    title = "complexity (entropy)"

    def update(self, maps: torch.Tensor, index: torch.Tensor) -> None:
        self._add(index, complexity=complexity(maps))
