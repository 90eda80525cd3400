"""The metrics an evaluation can compute, as thin adapters over ``saliency.metrics.functional``.

Each :class:`EvaluationMetric` declares the target-policy kinds it applies to (a pair of maps,
one map, the cells of a grid), the batch keys it needs (``mask``, ``part_mask``, ``boxes``,
``grid_labels``), its options with defaults, the per-sample values it produces and the mean
curves it can plot. The callback checks all of this against the dataset and the config before
the first batch. Work shared by several metrics of one (method, layer, policy) — the deletion
curve behind ``deletion_auc`` and ``insertion_minus_deletion``, the soft-mask confidences
behind AD/IC/AG — is computed once per batch through ``context.cache``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from saliency.errors import ConfigurationError
from saliency.metrics import functional as M

CURVE_POINTS = 101  # curves are resampled to this many points on [0, 1] before gathering


@dataclass
class MetricContext:
    """Everything a metric may read for one (method, layer, policy) on one batch.

    ``maps``: ``[B, C, H, W]`` for the policy's columns; ``classes``: ``[B, C]``; ``logits`` of
    the unperturbed images; ``batch``: the datamodule's batch (rows already filtered);
    ``perturbation_batch_size``: images per forward of perturbation metrics; ``indices``: the
    batch's sample ``index``, which every tie-broken metric receives.
    """

    model: nn.Module
    images: torch.Tensor
    maps: torch.Tensor
    classes: torch.Tensor
    logits: torch.Tensor
    batch: Mapping[str, torch.Tensor]
    perturbation_batch_size: int = 256
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def indices(self) -> torch.Tensor:
        """The batch's ``index`` ``[B]``: it keys the random tie-breaking of every mask and
        pixel order (:mod:`saliency.metrics.functional.ties`)."""
        if "index" not in self.batch:
            raise ConfigurationError(
                f"the batch has no 'index' (keys: {sorted(self.batch)}); every dataset item "
                "must carry its dataset index (DESIGN.md 'Sample format')"
            )
        return self.batch["index"]

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


Result = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
"""(values ``{output: [B]}``, curves ``{curve kind: [B, CURVE_POINTS]}``)."""


@dataclass(frozen=True)
class EvaluationMetric:
    name: str
    policy_kinds: frozenset[str]
    compute: Callable[[MetricContext, dict[str, Any]], Result]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("",)  # suffixes appended to the metric label
    curves: tuple[str, ...] = ()
    description: str = ""
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def options(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.defaults, **kwargs}

    def check_options(self, kwargs: Mapping[str, Any], label: str) -> None:
        unknown = set(kwargs) - set(self.defaults)
        if unknown:
            raise ConfigurationError(
                f"metric {label!r} ({self.name}) has unknown option(s) {sorted(unknown)}; "
                f"valid: {', '.join(sorted(self.defaults)) or '(none)'}"
            )
        for option, valid in self.choices.items():
            if option in kwargs and kwargs[option] not in valid:
                raise ConfigurationError(
                    f"metric {label!r} ({self.name}): {option}={kwargs[option]!r} is not one of "
                    f"{', '.join(map(str, valid))}"
                )

    def needed_keys(self, kwargs: Mapping[str, Any]) -> tuple[str, ...]:
        mask_key = self.options(kwargs).get("mask_key")
        return (*self.needs, mask_key) if mask_key else self.needs

    def value_names(self, label: str) -> list[str]:
        return [label + suffix for suffix in self.outputs]


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


def _single(context: MetricContext) -> tuple[torch.Tensor, torch.Tensor]:
    return context.maps[:, 0], context.classes[:, 0]


def _feature_agreement(context: MetricContext, options: dict[str, Any]) -> Result:
    values = M.feature_agreement(context.maps[:, 0], context.maps[:, 1], options["fraction"])
    return {"": values}, {}


def _random_logit(context: MetricContext, options: dict[str, Any]) -> Result:
    values = M.random_logit(
        context.maps[:, 0], context.maps[:, 1], normalise=options["normalise"],
        absolute=options["abs"],
    )  # fmt: skip
    return {"": values}, {}


def _perturbation_curve(context: MetricContext, kind: str, options: dict[str, Any]):
    maps, classes = _single(context)
    pixels = options["pixels_per_step"] or context.images.shape[-1]
    key = f"{kind}:{pixels}:{sorted(options.items())}"
    if kind == "deletion":
        compute = lambda: M.deletion_curve(  # noqa: E731
            context.model, context.images, maps, classes, pixels, options["fill"],
            context.perturbation_batch_size, indices=context.indices,
        )  # fmt: skip
    else:
        compute = lambda: M.insertion_curve(  # noqa: E731
            context.model, context.images, maps, classes, pixels, options["blur_kernel"],
            options["blur_sigma"], context.perturbation_batch_size, indices=context.indices,
        )  # fmt: skip
    curve = context.cached(key, compute)
    num_pixels = context.images.shape[-2] * context.images.shape[-1]
    steps = torch.arange(curve.shape[1], device=curve.device)
    fractions = (steps * pixels).clamp(max=num_pixels) / num_pixels
    return curve, fractions, M.curve_auc(curve, num_pixels, pixels)


def _deletion(context: MetricContext, options: dict[str, Any]) -> Result:
    curve, fractions, auc = _perturbation_curve(context, "deletion", options)
    return {"": auc}, {"deletion": resample_curves(curve, fractions)}


def _insertion(context: MetricContext, options: dict[str, Any]) -> Result:
    curve, fractions, auc = _perturbation_curve(context, "insertion", options)
    return {"": auc}, {"insertion": resample_curves(curve, fractions)}


def _insertion_minus_deletion(context: MetricContext, options: dict[str, Any]) -> Result:
    deletion = {k: options[k] for k in ("pixels_per_step", "fill")}
    insertion = {k: options[k] for k in ("pixels_per_step", "blur_kernel", "blur_sigma")}
    *_, deletion_auc = _perturbation_curve(context, "deletion", deletion)
    *_, insertion_auc = _perturbation_curve(context, "insertion", insertion)
    return {"": insertion_auc - deletion_auc}, {}


def _confidence_drop(context: MetricContext, options: dict[str, Any]) -> Result:
    maps, classes = _single(context)
    values = M.confidence_drop(
        context.model, context.images, maps, classes, options["fraction"], options["fill"],
        context.perturbation_batch_size, indices=context.indices,
    )  # fmt: skip
    return {"": values}, {}


def _relative_drop(context: MetricContext, options: dict[str, Any]) -> Result:
    maps, classes = _single(context)
    references = None  # "runner_up": the most probable other class on the original image
    if options["reference"] == "nearest_logit":
        from saliency.targets import LogitNeighbours

        references = LogitNeighbours(1, mode="nearest")(context.logits, classes)[:, 0]
    values = M.relative_drop(
        context.model, context.images, maps, classes, references, options["fraction"],
        options["fill"], context.perturbation_batch_size, indices=context.indices,
    )  # fmt: skip
    return {"": values}, {}


def _drop_increase_gain(name: str) -> Callable[[MetricContext, dict[str, Any]], Result]:
    """AD / IC / AG share one soft-masked forward (ClusCAM App. C Eqs. 11–13)."""

    def compute(context: MetricContext, options: dict[str, Any]) -> Result:
        maps, classes = _single(context)
        terms = context.cached(
            f"drop_increase_gain:{options['normalise']}",
            lambda: M.drop_increase_gain(
                context.model,
                context.images,
                maps,
                classes,
                options["normalise"],
                context.perturbation_batch_size,
            ),
        )
        return {"": terms[name]}, {}

    return compute


def _region_masks(context: MetricContext, options: dict[str, Any]) -> torch.Tensor:
    key = options["mask_key"]
    value = context.batch[key]
    if key == "boxes":  # [B, n, 4], padded with empty boxes: the union of the boxes
        height, width = context.images.shape[-2:]
        boxes = value.reshape(-1, 4)
        value = M.boxes_to_masks(boxes, height, width).view(*value.shape[:2], height, width)
    if value.dim() == 4:  # [B, n, H, W] per-object masks: their union
        value = value.any(dim=1)
    return value.bool().to(context.maps.device)


def _energy(context: MetricContext, options: dict[str, Any]) -> Result:
    maps, _ = _single(context)
    return {"": M.energy_pointing_game(maps, _region_masks(context, options))}, {}


def _pointing(context: MetricContext, options: dict[str, Any]) -> Result:
    maps, _ = _single(context)
    values = M.pointing_game(maps, _region_masks(context, options), options["ties"])
    return {"": values.float()}, {}


def _aupr(context: MetricContext, options: dict[str, Any]) -> Result:
    maps, _ = _single(context)
    positive, negative = M.aupr(maps, _region_masks(context, options))
    return {"1": positive, "0": negative}, {}


def _top_k_intersection(context: MetricContext, options: dict[str, Any]) -> Result:
    maps, _ = _single(context)
    masks = _region_masks(context, options)
    k = max(1, round(options["fraction"] * maps[0].numel()))
    return {"": M.top_k_intersection(maps, masks, k)}, {}


def _grid_pointing(context: MetricContext, options: dict[str, Any]) -> Result:
    batch, cells = context.maps.shape[:2]
    grid = round(cells**0.5)
    if grid * grid != cells:
        raise ConfigurationError(f"grid_pointing_game needs a square grid, got {cells} cells")
    cell_index = torch.arange(cells, device=context.maps.device).repeat(batch)
    values = M.grid_pointing_game(context.maps.flatten(0, 1), cell_index, grid)
    return {"": values.view(batch, cells).mean(dim=1)}, {}


_PIXELS = {"pixels_per_step": None}
_MASKING = {"fraction": 0.05, "fill": 0.0}
_DELETION = {**_PIXELS, "fill": 0.0}
_INSERTION = {**_PIXELS, "blur_kernel": 11, "blur_sigma": 5.0}
_SINGLE = frozenset({"single"})

METRICS: dict[str, EvaluationMetric] = {
    m.name: m
    for m in (
        EvaluationMetric(
            "feature_agreement", frozenset({"pair"}), _feature_agreement, {"fraction": 0.05},
            description="top-5 % pixel agreement of the two maps (CASE Eq. 7)",
        ),
        EvaluationMetric(
            "random_logit", frozenset({"random_pair"}), _random_logit,
            {"normalise": True, "abs": False},
            choices={"normalise": (True, False), "abs": (True, False)},
            description="SSIM of the top-1 map and a random other class's map (Sixt et al. "
            "2020, Quantus RandomLogit); lower = more class-sensitive",
        ),
        EvaluationMetric(
            "deletion_auc", _SINGLE, _deletion, _DELETION, curves=("deletion",),
            description="RISE deletion AUC (lower = more faithful)",
        ),
        EvaluationMetric(
            "insertion_auc", _SINGLE, _insertion, _INSERTION, curves=("insertion",),
            description="RISE insertion AUC (higher = more faithful)",
        ),
        EvaluationMetric(
            "insertion_minus_deletion", _SINGLE, _insertion_minus_deletion,
            {**_DELETION, **_INSERTION}, description="Ins − Del (CAAP)",
        ),
        EvaluationMetric(
            "confidence_drop", _SINGLE, _confidence_drop, _MASKING,
            description="softmax drop after zeroing the top pixels (CASE RQ2)",
        ),
        EvaluationMetric(
            "relative_drop", _SINGLE, _relative_drop, {**_MASKING, "reference": "nearest_logit"},
            description="(p_c − p*_c) − (p_d − p*_d) (Finer-CAM Eq. 10)",
            choices={"reference": ("nearest_logit", "runner_up")},
        ),
        EvaluationMetric(
            "average_drop", _SINGLE, _drop_increase_gain("average_drop"), {"normalise": True},
            description="AD (Grad-CAM++; ClusCAM Table 2), lower is better",
        ),
        EvaluationMetric(
            "increase_in_confidence", _SINGLE, _drop_increase_gain("increase_in_confidence"), {"normalise": True},
            description="IC, share of images whose score rises",
        ),
        EvaluationMetric(
            "average_gain", _SINGLE, _drop_increase_gain("average_gain"), {"normalise": True},
            description="AG (Opti-CAM)",
        ),
        EvaluationMetric(
            "energy_pointing_game", _SINGLE, _energy, {"mask_key": "mask"},
            description="share of positive saliency mass inside the mask",
        ),
        EvaluationMetric(
            "pointing_game", _SINGLE, _pointing, {"mask_key": "mask", "ties": "expected"},
            description="argmax inside the mask (tied maxima: expected hit)",
            choices={"ties": ("expected", "first", "any")},
        ),
        EvaluationMetric(
            "aupr", _SINGLE, _aupr, {"mask_key": "mask"}, outputs=("1", "0"),
            description="AUPR₁ / AUPR₀ against the mask (CAAP)",
        ),
        EvaluationMetric(
            "top_k_intersection", _SINGLE, _top_k_intersection,
            {"mask_key": "mask", "fraction": 0.05},
            description="share of the top pixels inside the mask",
        ),
        EvaluationMetric(
            "grid_pointing_game", frozenset({"grid"}), _grid_pointing, {},
            description="share of positive mass in the explained cell, mean over cells (VAR)",
        ),
    )
}  # fmt: skip
