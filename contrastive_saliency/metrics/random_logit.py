"""Random Logit (Sixt et al. 2020; Quantus ``RandomLogit``) as a torchmetrics class."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from contrastive_saliency.metrics.functional.random_logit import random_logit
from contrastive_saliency.metrics.registry import MetricInputs, RegisteredMetric, register_metric


@register_metric("random_logit")
class RandomLogit(RegisteredMetric):
    """Per-sample SSIM of the map of the explained class and the map of a random other class
    (:func:`~contrastive_saliency.metrics.functional.random_logit.random_logit`, as Quantus); lower = more
    class-sensitive. Draw the other class per sample index with
    :func:`contrastive_saliency.index_random.random_other_classes`.

    ``update(maps, other_maps, index)``: ``[B, H, W]`` maps and the ``[B]`` sample indices.
    Column: ``random_logit``.
    """

    higher_is_better = False
    title = "Random Logit"
    family = "class_sensitivity"
    target_kind = "random_pair"
    choices: ClassVar[dict[str, tuple[bool, ...]]] = {
        "normalise": (True, False),
        "abs": (True, False),
    }

    # ``abs``: Quantus' name of the option (compare magnitudes), as configs spell it
    def __init__(self, normalise: bool = True, abs: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.normalise, self.absolute = normalise, abs

    def update_arguments(self, inputs: MetricInputs) -> dict[str, torch.Tensor]:
        return {"maps": inputs.maps[:, 0], "other_maps": inputs.maps[:, 1], "index": inputs.index}

    def update(self, maps: torch.Tensor, other_maps: torch.Tensor, index: torch.Tensor) -> None:
        """Similarity of ``maps`` and ``other_maps`` for the samples ``index``."""
        values = random_logit(maps, other_maps, normalise=self.normalise, absolute=self.absolute)
        self._add(index, random_logit=values)
