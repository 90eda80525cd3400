"""Confidence-based faithfulness metrics as torchmetrics classes: confidence drop (CASE RQ2),
relative drop (Finer-CAM Eq. 10) and Average Drop / Increase in Confidence / Average Gain
(Grad-CAM++, Opti-CAM; ClusCAM App. C).

Each ``update`` takes the model (never kept), images in the model's input (normalised) space
``[B, C, H, W]``, maps ``[B, H, W]`` at the image resolution, the explained ``classes`` ``[B]``
and the sample ``index`` ``[B]`` (it also keys the random tie-breaking of the top-pixel masks,
:mod:`contrastive_saliency.metrics.functional.ties`); original and perturbed images go through the model in
forward batches of ``batch_size`` under ``torch.no_grad()``, in the model's current mode (put
it in ``eval()`` for evaluation). Selecting samples (CASE: correctly classified images only)
is the caller's: pass the subset.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from contrastive_saliency.checks import check_batch_size
from contrastive_saliency.metrics.functional.confidence import (
    confidence_drop,
    drop_increase_gain,
    relative_drop,
)
from contrastive_saliency.metrics.functional.feature_agreement import top_fraction_count
from contrastive_saliency.metrics.registry import MetricInputs, RegisteredMetric, register_metric


class _TopPixelMasking(RegisteredMetric):
    """Shared settings of the metrics that mask the top ``fraction`` of pixels."""

    def __init__(
        self, fraction: float = 0.05, fill: float = 0.0, batch_size: int = 256, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        top_fraction_count(1, fraction)
        self.fraction = fraction
        self.fill = fill
        self.batch_size = check_batch_size(batch_size)


@register_metric("confidence_drop")
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

    higher_is_better = True  # CASE Eq. 9: the more the confidence drops, the more faithful
    title = "confidence drop"
    family = "faithfulness"

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

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        maps, classes = inputs.single
        return {"model": inputs.model, "images": inputs.images, "maps": maps,
                "classes": classes, "index": inputs.index}  # fmt: skip


@register_metric("relative_drop")
class RelativeDrop(_TopPixelMasking):
    """Per-sample ``RD = (p_c − p*_c) − (p_d − p*_d)`` after masking the top ``fraction`` of
    pixels (Finer-CAM Eq. 10; PROTOCOLS.md: 5 % and 10 %, one instance each). ``d`` is the
    reference class passed to ``update`` or, when ``None``, chosen by ``reference``:
    ``nearest_logit`` (default: the class whose logit on the original image is nearest to
    ``c``'s, Finer-CAM's most similar class; for a top-1 ``c`` the runner-up) or ``runner_up``
    (the most probable other class on the original image). Larger = the map discriminates
    ``c`` from ``d`` better.

    Args: ``reference`` and those of :class:`ConfidenceDrop`. Column: ``relative_drop``.
    """

    higher_is_better = True
    title = "relative drop"
    family = "faithfulness"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"reference": ("nearest_logit", "runner_up")}

    def __init__(
        self,
        fraction: float = 0.05,
        fill: float = 0.0,
        reference: str = "nearest_logit",
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(fraction, fill, batch_size, **kwargs)
        if reference not in self.choices["reference"]:
            raise ValueError(
                f"reference must be one of {self.choices['reference']}, got {reference!r}"
            )
        self.reference = reference

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
        reference_classes: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
    ) -> None:
        """Relative drop of ``classes`` against ``reference_classes`` (``None``: chosen by
        ``reference`` from ``logits``, the model's on ``images``, computed when not given) for
        the samples ``index``."""
        if reference_classes is None and self.reference == "nearest_logit":
            if logits is None:
                with torch.no_grad():
                    logits = torch.cat([model(chunk) for chunk in images.split(self.batch_size)])
            reference_classes = _nearest_logit(logits, classes)
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

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        maps, classes = inputs.single
        return {"model": inputs.model, "images": inputs.images, "maps": maps,
                "classes": classes, "index": inputs.index, "logits": inputs.logits}  # fmt: skip


def _nearest_logit(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    from contrastive_saliency.targets import LogitNeighbours

    return LogitNeighbours(1, mode="nearest")(logits, classes)[:, 0]


class _DropIncreaseGain(RegisteredMetric):
    """Average Drop, Increase in Confidence and Average Gain from one soft-masked forward
    (Grad-CAM++, Chattopadhyay et al. 2018; Opti-CAM; ClusCAM App. C Eqs. 11–13).

    With ``Y`` the softmax score of the class on ``x`` and ``O`` on ``x ⊙ E`` (``E`` the map
    min-max normalised to [0, 1] when ``normalise``), the per-sample terms are
    ``average_drop`` = ``max(0, Y − O) / Y`` (lower is better), ``increase_in_confidence`` =
    ``1[O > Y]`` and ``average_gain`` = ``max(0, O − Y) / (1 − Y)`` (higher is better), as
    fractions; each class keeps one of them. The papers report the **mean × 100**, which
    :meth:`compute` adds as ``<column>/percent`` next to the summary statistics of the
    fractions. The three share one forward when ``update`` gets the same ``cache`` dict.

    Args:
        normalise: min-max normalise each map to [0, 1]; when False maps must lie in [0, 1].
        batch_size: images per forward pass.
        kwargs: torchmetrics ``Metric`` options.

    ``update(model, images, maps, classes, index, cache=None)``.
    """

    family = "faithfulness"

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
        cache: dict[str, Any] | None = None,
    ) -> None:
        """The term of ``classes`` for the samples ``index``."""
        key = f"drop_increase_gain:{self.normalise}"
        cache = {} if cache is None else cache
        if key not in cache:
            cache[key] = drop_increase_gain(
                model, images, maps, classes, self.normalise, self.batch_size
            )
        self._add(index, **{self.name: cache[key][self.name]})

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        maps, classes = inputs.single
        return {"model": inputs.model, "images": inputs.images, "maps": maps,
                "classes": classes, "index": inputs.index, "cache": inputs.cache}  # fmt: skip

    def _extra_statistics(self, name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"percent": 100.0 * values.double().mean()}


@register_metric("average_drop")
class AverageDrop(_DropIncreaseGain):
    """AD: mean ``max(0, Y − O) / Y`` (Grad-CAM++; ClusCAM Table 2), lower is better.
    Column ``average_drop``; see :class:`_DropIncreaseGain`."""

    higher_is_better = False
    title = "Average Drop"


@register_metric("increase_in_confidence")
class IncreaseInConfidence(_DropIncreaseGain):
    """IC: share of images whose score rises, ``1[O > Y]`` (Grad-CAM++), higher is better.
    Column ``increase_in_confidence``; see :class:`_DropIncreaseGain`."""

    higher_is_better = True
    title = "Increase in Confidence"


@register_metric("average_gain")
class AverageGain(_DropIncreaseGain):
    """AG: mean ``max(0, O − Y) / (1 − Y)`` (Opti-CAM), higher is better. Column
    ``average_gain``; see :class:`_DropIncreaseGain`."""

    higher_is_better = True
    title = "Average Gain"
