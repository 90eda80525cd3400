"""Pixel flipping, region perturbation (AOPC) and IROF as registered torchmetrics classes over
:mod:`contrastive_saliency.metrics.functional.aopc` (definitions, tie / constant-map / NaN rules
and the differences from Quantus are in its docstring and docs/deviations.md).

``update(model, images, maps, classes, index)``: the model (never kept), images in the model's
input (normalised) space ``[B, C, H, W]``, maps ``[B, H, W]``, the explained ``classes`` ``[B]``
and the sample ``index`` ``[B]`` (the key of the random tie-breaking). Perturbed images go
through the model in forward batches of at most ``batch_size`` (set by the evaluation).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from contrastive_saliency.checks import check_batch_size, check_positive_int
from contrastive_saliency.metrics.functional.aopc import (
    BASELINES,
    SCORES,
    irof,
    pixel_flipping,
    region_perturbation,
)
from contrastive_saliency.metrics.registry import MetricInputs, RegisteredMetric, register_metric


class _RemovalMetric(RegisteredMetric):
    """Shared options, checks and evaluation inputs of the removal-order metrics."""

    family = "faithfulness"
    higher_is_better = True
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"baseline": BASELINES, "score": SCORES}

    def __init__(self, baseline: str, score: str, batch_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for option, value, valid in (("baseline", baseline, BASELINES), ("score", score, SCORES)):
            if value not in valid:
                raise ValueError(f"{option} must be one of {', '.join(valid)}, got {value!r}")
        self.baseline, self.score = baseline, score
        self.batch_size = check_batch_size(batch_size, self.name or type(self).__name__)

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        maps, classes = inputs.single
        return {"model": inputs.model, "images": inputs.images, "maps": maps,
                "classes": classes, "index": inputs.index}  # fmt: skip


@register_metric("pixel_flipping")
class PixelFlipping(_RemovalMetric):
    """Per-sample AOPC of pixel flipping (Bach et al. 2015; Samek et al. 2017, Eq. 12; Quantus
    ``PixelFlipping``): the most salient pixels (every channel) replaced by the ``baseline``,
    ``pixels_per_step`` at a time, until the whole image is; AOPC = the mean drop of the class
    score over the steps. Higher = more faithful.

    Args:
        pixels_per_step: pixels replaced per step (``None`` = the image width; Quantus:
            ``features_in_step=1``, one channel value, i.e. 3·H·W forward passes per image).
        baseline: ``black`` (Quantus' default: the image's minimum), ``white``, ``mean``,
            ``zero`` (the dataset's mean colour in normalised space).
        score: ``softmax`` (Quantus' default) or ``logit``.
        batch_size: perturbed images per forward pass.
        kwargs: torchmetrics ``Metric`` options.

    Column: ``pixel_flipping``.
    """

    title = "Pixel flipping (AOPC)"

    def __init__(
        self,
        pixels_per_step: int | None = None,
        baseline: str = "black",
        score: str = "softmax",
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(baseline, score, batch_size, **kwargs)
        if pixels_per_step is not None:
            check_positive_int(pixels_per_step, "pixels_per_step", "or None for the image width")
        self.pixels_per_step = pixels_per_step

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
    ) -> None:
        """The AOPC of ``classes`` for the samples ``index``."""
        values = pixel_flipping(
            model, images, maps, classes, self.pixels_per_step, self.baseline, self.score,
            self.batch_size, indices=index,
        )  # fmt: skip
        self._add(index, pixel_flipping=values)


@register_metric("region_perturbation")
class RegionPerturbation(_RemovalMetric):
    """Per-sample AOPC of region perturbation (Samek et al. 2017, Sec. III, Eq. 12; Quantus
    ``RegionPerturbation``, MoRF): ``patch_size``² patches ranked by the map's sum over them,
    the first ``regions_evaluation`` replaced one at a time by the ``baseline``; AOPC = the mean
    drop of the class score over the ``L + 1`` states. Higher = more faithful.

    Args:
        patch_size: side of the square patches (Quantus' grid; 8 as Quantus, the paper 9).
        regions_evaluation: patches replaced (100, as Quantus and the paper).
        baseline: ``black`` (Quantus' default), ``white``, ``mean``, ``zero``.
        score: ``softmax`` (Quantus' default) or ``logit``.
        batch_size: perturbed images per forward pass.
        kwargs: torchmetrics ``Metric`` options.

    Column: ``region_perturbation``.
    """

    title = "Region perturbation (AOPC)"

    def __init__(
        self,
        patch_size: int = 8,
        regions_evaluation: int = 100,
        baseline: str = "black",
        score: str = "softmax",
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(baseline, score, batch_size, **kwargs)
        self.patch_size = check_positive_int(patch_size, "patch_size")
        self.regions_evaluation = check_positive_int(regions_evaluation, "regions_evaluation")

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
    ) -> None:
        """The AOPC of ``classes`` for the samples ``index``."""
        values = region_perturbation(
            model, images, maps, classes, self.patch_size, self.regions_evaluation,
            self.baseline, self.score, self.batch_size, indices=index,
        )  # fmt: skip
        self._add(index, region_perturbation=values)


@register_metric("irof")
class IROF(_RemovalMetric):
    """Per-sample IROF (Rieger & Hansen 2020; Quantus ``IROF``): SLIC superpixels (scikit-image,
    on the CPU once per image) ranked by the map's mean over them and replaced one at a time by
    the ``baseline``; IROF = the area over the curve of the class score relative to the
    unperturbed one, over the fraction of superpixels removed (0–1). Higher = more faithful.
    Quantus reports the area over unit steps instead (it grows with the number of
    superpixels); docs/deviations.md.

    Args:
        num_segments, compactness: SLIC's ``n_segments`` and ``compactness`` (scikit-image's
            defaults 100 and 10, which Quantus uses), on the image as the model sees it.
        baseline: ``mean`` (Quantus' default; here the image's own mean), ``black``, ``white``,
            ``zero``.
        score: ``softmax`` (Quantus' default) or ``logit``.
        batch_size: perturbed images per forward pass.
        kwargs: torchmetrics ``Metric`` options.

    Column: ``irof``.
    """

    title = "IROF (area over the curve)"

    def __init__(
        self,
        num_segments: int = 100,
        compactness: float = 10.0,
        baseline: str = "mean",
        score: str = "softmax",
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(baseline, score, batch_size, **kwargs)
        self.num_segments = check_positive_int(num_segments, "num_segments")
        if not compactness > 0:
            raise ValueError(f"compactness must be positive, got {compactness!r}")
        self.compactness = float(compactness)

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
    ) -> None:
        """IROF of ``classes`` for the samples ``index``."""
        values = irof(
            model, images, maps, classes, self.num_segments, self.compactness, self.baseline,
            self.score, self.batch_size, indices=index,
        )  # fmt: skip
        self._add(index, irof=values)
