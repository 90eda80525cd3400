"""Deletion and insertion AUC as torchmetrics classes (Petsiuk et al., RISE, BMVC 2018,
Sec. 4.1; Ins − Del as in CAAP).

Each ``update`` takes the model (never kept), images in the model's input (normalised) space
``[B, C, H, W]``, maps ``[B, H, W]``, the explained ``classes`` ``[B]`` and the sample
``index`` ``[B]``. Pixels are ranked by saliency (ties in a random order keyed by ``index``,
:mod:`saliency.metrics.functional.ties`), ``pixels_per_step`` at a time (default: the
image width, RISE's 224 per step at 224²); the score is the softmax of the class; AUC is the
normalised trapezoid in [0, 1]. Perturbed images go through the model in forward batches of
at most ``batch_size`` under ``torch.no_grad()``, in the model's current mode. Only the AUCs
are kept, not the curves.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from saliency.checks import check_batch_size
from saliency.metrics.functional.perturbation_curves import deletion_auc, insertion_auc
from saliency.metrics.per_sample import SampleMetric


def _check_pixels_per_step(pixels_per_step: int | None) -> int | None:
    if pixels_per_step is not None and (
        isinstance(pixels_per_step, bool)
        or not isinstance(pixels_per_step, int)
        or pixels_per_step < 1
    ):
        raise ValueError(
            f"pixels_per_step must be a positive number of pixels or None (the image width), "
            f"got {pixels_per_step!r}"
        )
    return pixels_per_step


def _check_blur(blur_kernel: int, blur_sigma: float) -> None:
    if blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ValueError(f"blur_kernel must be a positive odd size, got {blur_kernel}")
    if blur_sigma <= 0:
        raise ValueError(f"blur_sigma must be positive, got {blur_sigma}")


class DeletionAUC(SampleMetric):
    """Per-sample deletion AUC: most salient pixels first replaced by ``fill`` (0 = the mean
    colour in normalised space). Lower = more faithful.

    Args:
        pixels_per_step: pixels changed per step (``None`` = the image width).
        fill: deleted pixels' value in normalised space.
        batch_size: perturbed images per forward pass.
        kwargs: torchmetrics ``Metric`` options.

    Column: ``deletion_auc``.
    """

    value_names: ClassVar[tuple[str, ...]] = ("deletion_auc",)
    higher_is_better = False

    def __init__(
        self,
        pixels_per_step: int | None = None,
        fill: float = 0.0,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pixels_per_step = _check_pixels_per_step(pixels_per_step)
        self.fill = fill
        self.batch_size = check_batch_size(batch_size)

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
    ) -> None:
        """Deletion AUC of ``classes`` for the samples ``index``."""
        auc = deletion_auc(
            model,
            images,
            maps,
            classes,
            batch_size=self.batch_size,
            indices=index,
            pixels_per_step=self.pixels_per_step,
            fill=self.fill,
        )
        self._add(index, deletion_auc=auc)


class InsertionAUC(SampleMetric):
    """Per-sample insertion AUC: most salient pixels first copied from the image into its
    Gaussian-blurred version (kernel 11, σ 5). Higher = more faithful.

    Args:
        pixels_per_step: pixels changed per step (``None`` = the image width).
        blur_kernel, blur_sigma: the starting image's Gaussian blur.
        batch_size: perturbed images per forward pass.
        kwargs: torchmetrics ``Metric`` options.

    Column: ``insertion_auc``.
    """

    value_names: ClassVar[tuple[str, ...]] = ("insertion_auc",)
    higher_is_better = True

    def __init__(
        self,
        pixels_per_step: int | None = None,
        blur_kernel: int = 11,
        blur_sigma: float = 5.0,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_blur(blur_kernel, blur_sigma)
        self.pixels_per_step = _check_pixels_per_step(pixels_per_step)
        self.blur_kernel = blur_kernel
        self.blur_sigma = blur_sigma
        self.batch_size = check_batch_size(batch_size)

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
    ) -> None:
        """Insertion AUC of ``classes`` for the samples ``index``."""
        auc = insertion_auc(
            model,
            images,
            maps,
            classes,
            batch_size=self.batch_size,
            indices=index,
            pixels_per_step=self.pixels_per_step,
            blur_kernel=self.blur_kernel,
            blur_sigma=self.blur_sigma,
        )
        self._add(index, insertion_auc=auc)


class DeletionInsertion(SampleMetric):
    """Deletion AUC, insertion AUC and their difference per sample (RISE; CAAP reports
    ``Ins − Del``, higher is better), with the settings of :class:`DeletionAUC` and
    :class:`InsertionAUC`.

    Columns: ``deletion_auc``, ``insertion_auc``, ``insertion_minus_deletion``.
    """

    value_names: ClassVar[tuple[str, ...]] = (
        "deletion_auc",
        "insertion_auc",
        "insertion_minus_deletion",
    )

    def __init__(
        self,
        pixels_per_step: int | None = None,
        fill: float = 0.0,
        blur_kernel: int = 11,
        blur_sigma: float = 5.0,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_blur(blur_kernel, blur_sigma)
        self.pixels_per_step = _check_pixels_per_step(pixels_per_step)
        self.fill = fill
        self.blur_kernel = blur_kernel
        self.blur_sigma = blur_sigma
        self.batch_size = check_batch_size(batch_size)

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
    ) -> None:
        """Both AUCs of ``classes`` for the samples ``index``."""
        deletion = deletion_auc(
            model,
            images,
            maps,
            classes,
            batch_size=self.batch_size,
            indices=index,
            pixels_per_step=self.pixels_per_step,
            fill=self.fill,
        )
        insertion = insertion_auc(
            model,
            images,
            maps,
            classes,
            batch_size=self.batch_size,
            indices=index,
            pixels_per_step=self.pixels_per_step,
            blur_kernel=self.blur_kernel,
            blur_sigma=self.blur_sigma,
        )
        self._add(
            index,
            deletion_auc=deletion,
            insertion_auc=insertion,
            insertion_minus_deletion=insertion - deletion,
        )
