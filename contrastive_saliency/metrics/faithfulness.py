"""Faithfulness correlation, faithfulness estimate, monotonicity (Arya) and monotonicity
correlation (Nguyen & Martínez) as registered torchmetrics classes, over the functions of
:mod:`contrastive_saliency.metrics.functional.faithfulness` (definitions, units, baselines and
the rules for ties, constant maps and NaN are in its docstring).

Each ``update`` takes the model (never kept), images in the model's input (normalised) space
``[B, C, H, W]``, maps ``[B, H, W]``, the explained ``classes`` ``[B]`` and the sample ``index``
``[B]``, which seeds every random draw and tie-break, so a sample's value does not depend on
its batch. Options default to Quantus 0.6's, except the group size of the three ranked metrics
(``pixels_per_step``: the image width, as Quantus' own tutorials set ``features_in_step=224``
at 224², instead of its default of one feature per forward) — docs/deviations.md.

Monotonicity correlation is its own metric rather than an option of ``monotonicity``: another
paper, another quantity (a rank correlation in [−1, 1], not a 0/1 verdict), another
perturbation (random baselines, ``num_samples`` draws per group) and other defaults, so one
name in a table never stands for two different numbers.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from contrastive_saliency.checks import check_batch_size, check_positive_int
from contrastive_saliency.metrics.functional.faithfulness import (
    check_baseline,
    faithfulness_correlation,
    faithfulness_estimate,
    monotonicity,
    monotonicity_correlation,
)
from contrastive_saliency.metrics.registry import MetricInputs, RegisteredMetric, register_metric


def _check_step(pixels_per_step: int | None) -> int | None:
    if pixels_per_step is not None:
        check_positive_int(pixels_per_step, "pixels_per_step", "or None for the image width")
    return pixels_per_step


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


class _ModelPerturbationMetric(RegisteredMetric):
    """Shared options and evaluation inputs: ``baseline``, ``softmax``, ``abs``, ``seed``,
    ``batch_size``; ``_compute(model, images, maps, classes, index)`` gives the values."""

    family = "faithfulness"
    higher_is_better = True

    def __init__(
        self,
        baseline: str | float,
        softmax: bool,
        abs: bool,  # Quantus' name, as random_logit's option
        seed: int,
        batch_size: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.baseline = check_baseline(baseline)
        if not isinstance(softmax, bool) or not isinstance(abs, bool):
            raise ValueError(f"softmax and abs must be true or false, got {softmax!r}, {abs!r}")
        self.softmax, self.absolute = softmax, abs
        self.seed = _check_seed(seed)
        self.batch_size = check_batch_size(batch_size)

    @abstractmethod
    def _compute(self, model, images, maps, classes, index) -> torch.Tensor:
        """The metric's per-sample values ``[B]`` (each subclass calls its function)."""

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
    ) -> None:
        """The metric of ``maps`` for ``classes`` of the samples ``index``."""
        self._add(index, **{self.name: self._compute(model, images, maps, classes, index)})

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        maps, classes = inputs.single
        return {"model": inputs.model, "images": inputs.images, "maps": maps,
                "classes": classes, "index": inputs.index}  # fmt: skip

    def _common(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "softmax": self.softmax, "absolute": self.absolute,
                "batch_size": self.batch_size, "seed": self.seed}  # fmt: skip


@register_metric("faithfulness_correlation")
class FaithfulnessCorrelation(_ModelPerturbationMetric):
    """Per-sample faithfulness correlation (Bhatt, Weller & Moura, IJCAI 2020; as Quantus
    ``FaithfulnessCorrelation``): the Pearson correlation over ``num_runs`` random subsets of
    ``subset_size`` pixels between the subset's attribution sum and the drop of the class
    score when the subset is replaced by ``baseline``. In [−1, 1]; higher is better.

    Args:
        subset_size: pixels per subset (Quantus: 224); must be below ``H·W``.
        num_runs: subsets per image (Quantus ``nr_runs``: 100).
        baseline: ``"black"`` (the image's minimum, Quantus' default), ``"white"``, ``"mean"``,
            ``"uniform"`` or a number in normalised space.
        softmax: score = softmax probability instead of the logit (Quantus: logit).
        abs: attributions' magnitudes (Quantus: false).
        seed: seed of the subsets (and uniform baselines), with the sample index.
        batch_size: perturbed images per forward pass.

    Column: ``faithfulness_correlation``.
    """

    title = "faithfulness correlation"

    def __init__(
        self,
        subset_size: int = 224,
        num_runs: int = 100,
        baseline: str | float = "black",
        softmax: bool = False,
        abs: bool = False,
        seed: int = 0,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(baseline, softmax, abs, seed, batch_size, **kwargs)
        self.subset_size = check_positive_int(subset_size, "subset_size")
        self.num_runs = check_positive_int(num_runs, "num_runs")
        if num_runs < 2:
            raise ValueError(f"num_runs must be at least 2 (a correlation), got {num_runs}")

    def _compute(self, model, images, maps, classes, index) -> torch.Tensor:
        return faithfulness_correlation(
            model, images, maps, classes, self.subset_size, self.num_runs, indices=index,
            **self._common(),
        )  # fmt: skip


@register_metric("faithfulness_estimate")
class FaithfulnessEstimate(_ModelPerturbationMetric):
    """Per-sample faithfulness estimate (Alvarez-Melis & Jaakkola, NeurIPS 2018; as Quantus
    ``FaithfulnessEstimate``): pixels in descending order of the map, ``pixels_per_step`` per
    group, each group alone replaced by ``baseline``; the Pearson correlation over the groups
    of the group's attribution sum and the drop of the class score. Higher is better.

    Args:
        pixels_per_step: pixels per group (``None`` = the image width; Quantus'
            ``features_in_step`` default is 1); must divide ``H·W``.
        baseline, softmax, abs, seed, batch_size: as ``faithfulness_correlation``.

    Column: ``faithfulness_estimate``.
    """

    title = "faithfulness estimate"

    def __init__(
        self,
        pixels_per_step: int | None = None,
        baseline: str | float = "black",
        softmax: bool = False,
        abs: bool = False,
        seed: int = 0,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(baseline, softmax, abs, seed, batch_size, **kwargs)
        self.pixels_per_step = _check_step(pixels_per_step)

    def _compute(self, model, images, maps, classes, index) -> torch.Tensor:
        return faithfulness_estimate(
            model, images, maps, classes, self.pixels_per_step, indices=index, **self._common()
        )


@register_metric("monotonicity")
class Monotonicity(_ModelPerturbationMetric):
    """Per-sample monotonicity (Arya et al. 2019; as Quantus ``Monotonicity``, whose 0.6
    release never changes the image and scores every map 1, see docs/deviations.md): from
    the all-``baseline`` image, the original pixels come back ``pixels_per_step`` at a time,
    least attributed first; 1 if the class score never decreases, else 0. The mean is the
    share of monotone samples; higher is better.

    Args:
        pixels_per_step: pixels per step (``None`` = the image width); must divide ``H·W``.
        softmax: score = softmax probability (Quantus: true) or the logit.
        abs: order by magnitude (Quantus: true).
        baseline, seed, batch_size: as ``faithfulness_correlation``.

    Column: ``monotonicity``.
    """

    title = "monotonicity (Arya)"

    def __init__(
        self,
        pixels_per_step: int | None = None,
        baseline: str | float = "black",
        softmax: bool = True,
        abs: bool = True,
        seed: int = 0,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(baseline, softmax, abs, seed, batch_size, **kwargs)
        self.pixels_per_step = _check_step(pixels_per_step)

    def _compute(self, model, images, maps, classes, index) -> torch.Tensor:
        return monotonicity(
            model, images, maps, classes, self.pixels_per_step, indices=index, **self._common()
        )


@register_metric("monotonicity_correlation")
class MonotonicityCorrelation(_ModelPerturbationMetric):
    """Per-sample monotonicity correlation (Nguyen & Martínez 2020; as Quantus
    ``MonotonicityCorrelation``): pixels in ascending order of ``|a|``, ``pixels_per_step`` per
    group; each group alone replaced ``num_samples`` times by a random ``baseline`` value; the
    Spearman correlation over the groups of the group's attribution sum and the mean squared
    change of the class score. In [−1, 1]; higher is better.

    Args:
        pixels_per_step: pixels per group (``None`` = the image width; Quantus: 1).
        num_samples: draws per group (Quantus ``nr_samples``: 100).
        baseline: ``"uniform"`` (Quantus' default: U[0, 1) per draw) or as
            ``faithfulness_correlation``.
        softmax: score = softmax probability (Quantus: true) or the logit.
        abs: magnitudes (Quantus: true).
        seed, batch_size: as ``faithfulness_correlation``.

    Column: ``monotonicity_correlation``.
    """

    title = "monotonicity correlation (Nguyen)"

    def __init__(
        self,
        pixels_per_step: int | None = None,
        num_samples: int = 100,
        baseline: str | float = "uniform",
        softmax: bool = True,
        abs: bool = True,
        seed: int = 0,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(baseline, softmax, abs, seed, batch_size, **kwargs)
        self.pixels_per_step = _check_step(pixels_per_step)
        self.num_samples = check_positive_int(num_samples, "num_samples")

    def _compute(self, model, images, maps, classes, index) -> torch.Tensor:
        return monotonicity_correlation(
            model, images, maps, classes, self.pixels_per_step, self.num_samples,
            indices=index, **self._common(),
        )  # fmt: skip
