"""Confidence-based faithfulness metrics as torchmetrics classes: confidence drop (CASE RQ2),
relative drop (Finer-CAM Eq. 10) and Average Drop / Increase in Confidence / Average Gain
(Grad-CAM++, Opti-CAM; ClusCAM App. C).

Each ``update`` takes the model (never kept), images in the model's input (normalised) space
``[B, C, H, W]``, maps ``[B, H, W]`` at the image resolution, the explained ``classes`` ``[B]``
and the sample ``index`` ``[B]`` (it also keys the random tie-breaking of the top-pixel masks,
:mod:`saliency.metrics.functional.ties`); original and perturbed images go through the model in
forward batches of ``batch_size`` under ``torch.no_grad()``, in the model's current mode (put
it in ``eval()`` for evaluation). Selecting samples (CASE: correctly classified images only)
is the caller's: pass the subset.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from saliency.checks import check_batch_size
from saliency.metrics.functional.confidence import (
    confidence_drop,
    drop_increase_gain,
    relative_drop,
)
from saliency.metrics.functional.feature_agreement import top_fraction_count
from saliency.metrics.per_sample import SampleMetric


class _TopPixelMasking(SampleMetric):
    """Shared settings of the metrics that mask the top ``fraction`` of pixels."""

    def __init__(
        self, fraction: float = 0.05, fill: float = 0.0, batch_size: int = 256, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        top_fraction_count(1, fraction)
        self.fraction = fraction
        self.fill = fill
        self.batch_size = check_batch_size(batch_size)


class ConfidenceDrop(_TopPixelMasking):
    """Per-sample ``p_c(x) − p_c(x̃)``, ``x̃`` = ``x`` with the top ``fraction`` of pixels by
    saliency set to ``fill`` (CASE RQ2, Sec. IV-C; PROTOCOLS.md "Confidence drop"). Larger =
    more faithful; CASE compares methods with a paired t-test on the per-sample values.

    Args:
        fraction: share of pixels removed (CASE: 5 %, the feature agreement's k).
        fill: value of removed pixels in normalised space (0 = the dataset mean colour).
        batch_size: images per forward pass (originals and perturbed together).
        kwargs: torchmetrics ``Metric`` options.

    Column: ``confidence_drop``.
    """

    value_names: ClassVar[tuple[str, ...]] = ("confidence_drop",)
    higher_is_better = True

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
    ) -> None:
        """Confidence drop of ``classes`` for the samples ``index``."""
        drop = confidence_drop(
            model, images, maps, classes, self.fraction, self.fill, self.batch_size, indices=index
        )
        self._add(index, confidence_drop=drop)


class RelativeDrop(_TopPixelMasking):
    """Per-sample ``RD = (p_c − p*_c) − (p_d − p*_d)`` after masking the top ``fraction`` of
    pixels (Finer-CAM Eq. 10; PROTOCOLS.md: 5 % and 10 %, one instance each). ``d`` is the
    reference class passed to ``update`` or, when ``None``, the runner-up prediction on the
    original image. Larger = the map discriminates ``c`` from ``d`` better.

    Args: as :class:`ConfidenceDrop`. Column: ``relative_drop``.
    """

    value_names: ClassVar[tuple[str, ...]] = ("relative_drop",)
    higher_is_better = True

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
        reference_classes: torch.Tensor | None = None,
    ) -> None:
        """Relative drop of ``classes`` against ``reference_classes`` for the samples ``index``."""
        drop = relative_drop(
            model,
            images,
            maps,
            classes,
            reference_classes,
            self.fraction,
            self.fill,
            self.batch_size,
            indices=index,
        )
        self._add(index, relative_drop=drop)


class DropIncreaseGain(SampleMetric):
    """Average Drop, Increase in Confidence and Average Gain from one soft-masked forward
    (Grad-CAM++, Chattopadhyay et al. 2018; Opti-CAM; ClusCAM App. C Eqs. 11–13).

    With ``Y`` the softmax score of the class on ``x`` and ``O`` on ``x ⊙ E`` (``E`` the map
    min-max normalised to [0, 1] when ``normalise``), the per-sample columns are
    ``average_drop`` = ``max(0, Y − O) / Y`` (lower is better), ``increase_in_confidence`` =
    ``1[O > Y]`` and ``average_gain`` = ``max(0, O − Y) / (1 − Y)`` (higher is better), as
    fractions. The papers report the **mean × 100**, which :meth:`compute` adds as
    ``<column>/percent`` next to the summary statistics of the fractions.

    Args:
        normalise: min-max normalise each map to [0, 1]; when False maps must lie in [0, 1].
        batch_size: images per forward pass.
        kwargs: torchmetrics ``Metric`` options.
    """

    value_names: ClassVar[tuple[str, ...]] = (
        "average_drop",
        "increase_in_confidence",
        "average_gain",
    )

    def __init__(self, normalise: bool = True, batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.normalise = normalise
        self.batch_size = check_batch_size(batch_size)

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
    ) -> None:
        """AD / IC / AG terms of ``classes`` for the samples ``index``."""
        terms = drop_increase_gain(model, images, maps, classes, self.normalise, self.batch_size)
        self._add(index, **terms)

    def _extra_statistics(self, name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"percent": 100.0 * values.double().mean()}
