"""Random Logit (Sixt et al. 2020; Quantus ``RandomLogit``) as a torchmetrics class."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from saliency.metrics.functional.random_logit import random_logit
from saliency.metrics.per_sample import SampleMetric


class RandomLogit(SampleMetric):
    """Per-sample SSIM of the map of the explained class and the map of a random other class
    (:func:`~saliency.metrics.functional.random_logit.random_logit`, as Quantus); lower = more
    class-sensitive. Draw the other class per sample index with
    :func:`saliency.index_random.random_other_classes`.

    ``update(maps, other_maps, index)``: ``[B, H, W]`` maps and the ``[B]`` sample indices.
    Column: ``random_logit``.
    """

    value_names: ClassVar[tuple[str, ...]] = ("random_logit",)
    higher_is_better = False

    def __init__(self, normalise: bool = True, absolute: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.normalise, self.absolute = normalise, absolute

    def update(self, maps: torch.Tensor, other_maps: torch.Tensor, index: torch.Tensor) -> None:
        """Similarity of ``maps`` and ``other_maps`` for the samples ``index``."""
        values = random_logit(maps, other_maps, normalise=self.normalise, absolute=self.absolute)
        self._add(index, random_logit=values)
