"""Deletion and insertion AUC as torchmetrics classes (Petsiuk et al., RISE, BMVC 2018,
Sec. 4.1; Ins − Del as in CAAP).

Each ``update`` takes the model (never kept), images in the model's input (normalised) space
``[B, C, H, W]``, maps ``[B, H, W]``, the explained ``classes`` ``[B]`` and the sample
``index`` ``[B]``. Pixels are ranked by saliency (ties in a random order keyed by ``index``,
:mod:`contrastive_saliency.metrics.functional.ties`), ``pixels_per_step`` at a time (default: the
image width, RISE's 224 per step at 224²); the score is the softmax of the class; AUC is the
normalised trapezoid in [0, 1]. Perturbed images go through the model in forward batches of
at most ``batch_size`` under ``torch.no_grad()``, in the model's current mode. The deletion
and insertion AUC metrics also keep each sample's curve, resampled to ``CURVE_POINTS`` points
(:meth:`_PerturbationAUC.per_sample_curves`), for the mean curves of the evaluation's plots.
Metrics given the same ``cache`` dict in ``update`` compute each curve once (the evaluation
shares one per batch, method, layer and target policy).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from contrastive_saliency.checks import check_batch_size
from contrastive_saliency.metrics.functional.perturbation_curves import (
    curve_auc,
    deletion_curve,
    insertion_curve,
)
from contrastive_saliency.metrics.per_sample import cat_state, unique_by_index
from contrastive_saliency.metrics.registry import (
    CurveInfo,
    MetricInputs,
    RegisteredMetric,
    register_metric,
)

CURVE_POINTS = 101  # kept curves are resampled to this many points on [0, 1]
_PROBABILITY = "mean softmax probability of the explained class (0–1)"


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


def resample_curves(curves: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` curves sampled at increasing ``fractions`` ``[n]`` (from 0 to 1) → values at
    ``CURVE_POINTS`` evenly spaced fractions, by linear interpolation."""
    grid = torch.linspace(0.0, 1.0, CURVE_POINTS, device=curves.device, dtype=torch.float64)
    fractions = fractions.to(curves.device, torch.float64)
    right = torch.searchsorted(fractions, grid).clamp(1, fractions.numel() - 1)
    left = right - 1
    weight = ((grid - fractions[left]) / (fractions[right] - fractions[left])).clamp(0, 1)
    values = curves.double()
    return (values[:, left] + weight * (values[:, right] - values[:, left])).float()


def _curve(
    kind: str,
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    index: torch.Tensor,
    options: dict[str, Any],
    batch_size: int,
    cache: dict[str, Any] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(curve [B, n], fractions [n], AUC [B])`` of the ``deletion`` or ``insertion`` curve
    with ``options`` (``pixels_per_step`` and ``fill`` or the blur), from ``cache`` when an
    earlier metric of the batch computed it."""
    pixels = options["pixels_per_step"] or images.shape[-1]
    key = f"{kind}:{pixels}:{sorted(options.items())}"
    cache = {} if cache is None else cache
    if key not in cache:
        if kind == "deletion":
            cache[key] = deletion_curve(
                model, images, maps, classes, pixels, options["fill"], batch_size, indices=index
            )
        else:
            cache[key] = insertion_curve(
                model, images, maps, classes, pixels, options["blur_kernel"],
                options["blur_sigma"], batch_size, indices=index,
            )  # fmt: skip
    curve = cache[key]
    num_pixels = images.shape[-2] * images.shape[-1]
    steps = torch.arange(curve.shape[1], device=curve.device)
    fractions = (steps * pixels).clamp(max=num_pixels) / num_pixels
    return curve, fractions, curve_auc(curve, num_pixels, pixels)


class _PerturbationMetric(RegisteredMetric):
    """Shared options, checks and evaluation inputs of the perturbation-curve metrics."""

    family = "faithfulness"

    def __init__(
        self,
        pixels_per_step: int | None,
        batch_size: int,
        fill: float | None = None,
        blur_kernel: int | None = None,
        blur_sigma: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pixels_per_step = _check_pixels_per_step(pixels_per_step)
        self.batch_size = check_batch_size(batch_size)
        self._deletion = {"pixels_per_step": pixels_per_step, "fill": fill}
        self._insertion = {
            "pixels_per_step": pixels_per_step, "blur_kernel": blur_kernel,
            "blur_sigma": blur_sigma,
        }  # fmt: skip
        if blur_kernel is not None:
            _check_blur(blur_kernel, blur_sigma)

    def _curve(self, kind: str, model, images, maps, classes, index, cache):
        options = self._deletion if kind == "deletion" else self._insertion
        return _curve(kind, model, images, maps, classes, index, options, self.batch_size, cache)

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        maps, classes = inputs.single
        return {"model": inputs.model, "images": inputs.images, "maps": maps,
                "classes": classes, "index": inputs.index, "cache": inputs.cache}  # fmt: skip


class _PerturbationAUC(_PerturbationMetric):
    """The AUC of one curve kind per sample, and the curve resampled to ``CURVE_POINTS``."""

    _kind: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # one resampled curve per row of ``indices`` (flattened, as ``values``)
        self.add_state("curve_rows", default=[], dist_reduce_fx="cat")

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
        cache: dict[str, Any] | None = None,
    ) -> None:
        """The AUC (and curve) of ``classes`` for the samples ``index``."""
        curve, fractions, auc = self._curve(self._kind, model, images, maps, classes, index, cache)
        self._add(index, **{self.name: auc})
        self.curve_rows.append(resample_curves(curve, fractions).to(self.dtype).reshape(-1))

    def per_sample_curves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [N], curves [N, CURVE_POINTS])``, de-duplicated and sorted by index
        (collective under DDP: every process must call it)."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        ):
            indices = cat_state(self.indices, torch.int64, self.device).long()
            rows = cat_state(self.curve_rows, self.dtype, self.device).reshape(-1, CURVE_POINTS)
            return unique_by_index(indices, rows.to(indices.device))


@register_metric("deletion_auc")
class DeletionAUC(_PerturbationAUC):
    """Per-sample deletion AUC: most salient pixels first replaced by ``fill`` (0 = the mean
    colour in normalised space). Lower = more faithful.

    Args:
        pixels_per_step: pixels changed per step (``None`` = the image width).
        fill: deleted pixels' value in normalised space.
        batch_size: perturbed images per forward pass.
        kwargs: torchmetrics ``Metric`` options.

    Column: ``deletion_auc``; curve ``deletion``.
    """

    higher_is_better = False
    title = "Deletion AUC"
    curves = (
        CurveInfo(
            "deletion", "Deletion curve",
            "fraction of pixels deleted, most salient first (0–1)", _PROBABILITY,
        ),
    )  # fmt: skip
    _kind = "deletion"

    def __init__(
        self,
        pixels_per_step: int | None = None,
        fill: float = 0.0,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(pixels_per_step, batch_size, fill=fill, **kwargs)


@register_metric("insertion_auc")
class InsertionAUC(_PerturbationAUC):
    """Per-sample insertion AUC: most salient pixels first copied from the image into its
    Gaussian-blurred version (kernel 11, σ 5). Higher = more faithful.

    Args:
        pixels_per_step: pixels changed per step (``None`` = the image width).
        blur_kernel, blur_sigma: the starting image's Gaussian blur.
        batch_size: perturbed images per forward pass.
        kwargs: torchmetrics ``Metric`` options.

    Column: ``insertion_auc``; curve ``insertion``.
    """

    higher_is_better = True
    title = "Insertion AUC"
    curves = (
        CurveInfo(
            "insertion", "Insertion curve",
            "fraction of pixels inserted into the blurred image, most salient first (0–1)",
            _PROBABILITY,
        ),
    )  # fmt: skip
    _kind = "insertion"

    def __init__(
        self,
        pixels_per_step: int | None = None,
        blur_kernel: int = 11,
        blur_sigma: float = 5.0,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            pixels_per_step, batch_size, blur_kernel=blur_kernel, blur_sigma=blur_sigma, **kwargs
        )


@register_metric("insertion_minus_deletion")
class InsertionMinusDeletion(_PerturbationMetric):
    """Insertion AUC − deletion AUC per sample (RISE; CAAP reports ``Ins − Del``, higher is
    better), with the settings of :class:`DeletionAUC` and :class:`InsertionAUC`; given the
    same ``cache`` as those, it reuses their curves.

    Column: ``insertion_minus_deletion``.
    """

    higher_is_better = True
    title = "Ins − Del"

    def __init__(
        self,
        pixels_per_step: int | None = None,
        fill: float = 0.0,
        blur_kernel: int = 11,
        blur_sigma: float = 5.0,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            pixels_per_step, batch_size, fill=fill, blur_kernel=blur_kernel,
            blur_sigma=blur_sigma, **kwargs,
        )  # fmt: skip

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
        cache: dict[str, Any] | None = None,
    ) -> None:
        """Ins − Del of ``classes`` for the samples ``index``."""
        arguments = (model, images, maps, classes, index, cache)
        *_, deletion = self._curve("deletion", *arguments)
        *_, insertion = self._curve("insertion", *arguments)
        self._add(index, insertion_minus_deletion=insertion - deletion)
