"""Robustness metrics as registered torchmetrics classes: Max- and Avg-Sensitivity (Yeh et al.
2019; Quantus ``MaxSensitivity`` / ``AvgSensitivity``) of one map per sample
(:mod:`contrastive_saliency.metrics.functional.sensitivity`).

``update(explain, images, maps, classes, index, cache)`` with ``maps`` ``[B, K, H, W]`` and
``classes`` ``[B, K]`` (the evaluation gives ``K = 1``, the policy's single map); ``explain``
re-runs the evaluated method (:attr:`~contrastive_saliency.metrics.registry.MetricInputs.explain`).
Both metrics read the same perturbed maps: given the same ``cache`` and options, the second
one re-explains nothing.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from contrastive_saliency.checks import check_batch_size
from contrastive_saliency.metrics.functional.sensitivity import (
    NORMS,
    Explain,
    check_sensitivity_options,
    sensitivity_samples,
)
from contrastive_saliency.metrics.registry import MetricInputs, RegisteredMetric, register_metric


class _Sensitivity(RegisteredMetric):
    """Options and evaluation inputs shared by Max- and Avg-Sensitivity.

    Args:
        nr_samples: perturbed copies per sample (Quantus' default 200).
        radius: half-width of the uniform noise, in the model's (normalised) input units
            (Quantus' ``lower_bound``, default 0.2).
        norm: ``fro`` (L2 of the flattened map, Quantus' default) or ``linf``.
        normalise: divide by the norm of the original map (Quantus); ``False``: Yeh et al.'s
            Eq. 4, the absolute change.
        seed: selects the noise (each draw a function of the seed, the sample index and the
            draw).
        batch_size: perturbed images per call of the method (set by the evaluation).
        kwargs: torchmetrics ``Metric`` options.
    """

    family = "robustness"
    higher_is_better = False
    needs_explainer = True
    choices: ClassVar = {"norm": NORMS, "normalise": (True, False)}
    _reduce: ClassVar[str]

    def __init__(
        self,
        nr_samples: int = 200,
        radius: float = 0.2,
        norm: str = "fro",
        normalise: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_sensitivity_options(nr_samples, radius, norm)
        self.batch_size = check_batch_size(batch_size, self.name)
        self._options = {
            "nr_samples": nr_samples, "radius": float(radius), "norm": norm,
            "normalise": bool(normalise), "seed": int(seed),
        }  # fmt: skip

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        return {
            "explain": inputs.explainer(self.name), "images": inputs.images,
            "maps": inputs.maps[:, :1], "classes": inputs.classes[:, :1],
            "index": inputs.index, "cache": inputs.cache,
        }  # fmt: skip

    def update(
        self,
        explain: Explain,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        index: torch.Tensor,
        cache: dict[str, Any] | None = None,
    ) -> None:
        """The sensitivity of ``maps`` (of ``classes``) for the samples ``index``."""
        key = f"sensitivity:{sorted(self._options.items())}"
        cache = {} if cache is None else cache
        if key not in cache:
            cache[key] = sensitivity_samples(
                explain, images, maps, classes, index, **self._options, batch_size=self.batch_size
            )
        samples = cache[key]
        values = samples.amax(dim=1) if self._reduce == "max" else samples.mean(dim=1)
        self._add(index, **{self.name: values})


@register_metric("max_sensitivity")
class MaxSensitivity(_Sensitivity):
    """Per-sample Max-Sensitivity (Yeh et al., NeurIPS 2019, Eq. 4; Quantus
    ``MaxSensitivity``): the largest relative change ``‖Φ(x + δ) − Φ(x)‖ / ‖Φ(x)‖`` of the map
    over ``nr_samples`` uniform draws ``δ`` with ``‖δ‖∞ ≤ radius``. Lower = more robust.

    Options as :class:`_Sensitivity`. Column: ``max_sensitivity``.
    """

    title = "Max-Sensitivity"
    _reduce = "max"


@register_metric("avg_sensitivity")
class AvgSensitivity(_Sensitivity):
    """Per-sample Avg-Sensitivity (Yeh et al. 2019; Bhatt et al., IJCAI 2020; Quantus
    ``AvgSensitivity``): the mean relative change of the map over the same draws as
    :class:`MaxSensitivity`. Lower = more robust.

    Options as :class:`_Sensitivity`. Column: ``avg_sensitivity``.
    """

    title = "Avg-Sensitivity"
    _reduce = "mean"
