"""Sanity-check similarity as a torchmetrics class (Adebayo et al. 2018, Sec. 3; VAR Sec. 4.3).

The maps of the original model and of a randomised copy
(:func:`~contrastive_saliency.metrics.functional.randomisation.cascading_randomisation`) are compared
per sample; a method that passes the check gives LOW similarity once the weights it should
depend on are randomised.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from contrastive_saliency.metrics.functional.map_similarity import (
    hog_similarity,
    spearman_similarity,
    ssim_similarity,
)
from contrastive_saliency.metrics.per_sample import SampleMetric


class MapSimilarity(SampleMetric):
    """Per-sample similarity of two maps of the same images: Spearman rank correlation with
    and without absolute value, SSIM on [0, 1]-normalised maps and the Spearman correlation of
    their HOG features (Adebayo et al. 2018, Sec. 3; scikit-image defaults for SSIM and HOG).

    ``update(maps_a, maps_b, index)``: ``[B, H, W]`` maps (e.g. original vs randomised model)
    and the ``[B]`` sample indices. Columns: ``spearman``, ``spearman_abs``, ``ssim``, ``hog``
    (constant maps give the functionals' documented values, never NaN).
    """

    value_names: ClassVar[tuple[str, ...]] = ("spearman", "spearman_abs", "ssim", "hog")
    higher_is_better = False  # for a sanity check, low similarity after randomisation passes

    def update(self, maps_a: torch.Tensor, maps_b: torch.Tensor, index: torch.Tensor) -> None:
        """Similarities of ``maps_a`` and ``maps_b`` for the samples ``index``."""
        self._add(
            index,
            spearman=spearman_similarity(maps_a, maps_b),
            spearman_abs=spearman_similarity(maps_a, maps_b, absolute=True),
            ssim=ssim_similarity(maps_a, maps_b),
            hog=hog_similarity(maps_a, maps_b),
        )
