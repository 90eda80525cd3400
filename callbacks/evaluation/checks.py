"""Checks of an evaluation config against itself, the model and the data: every mistake is
found before any computation, with the value and what to do."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import yaml

from callbacks.evaluation.engine import _Combination
from callbacks.evaluation.spec import MethodSpec, MetricSpec
from callbacks.evaluation.target_policies import POLICIES, TargetPolicy
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.metrics.registry import metric_class

log = logging.getLogger(__name__)


def check_metric_policies(metric_specs: list[MetricSpec], policies: list[TargetPolicy]) -> None:
    """Every metric has a target policy of its ``target_kind`` in ``policies``."""
    kinds = {policy.kind for policy in policies}
    for spec in metric_specs:
        wanted = metric_class(spec.name).target_kind
        if wanted not in kinds:
            valid = [name for name, p in POLICIES.items() if p.kind == wanted]
            raise ConfigurationError(
                f"metric {spec.label!r} needs a target policy of kind "
                f"{wanted} ({', '.join(valid)}), but evaluation.targets "
                f"is {[p.name for p in policies]}"
            )


def require_keys(keys: set[str], needed: Sequence[str], what: str, advice: str) -> None:
    """A :class:`ConfigurationError` naming ``what`` and the fields of ``needed`` that the
    dataset's samples (``keys``) lack."""
    missing = [k for k in needed if k not in keys]
    if missing:
        raise ConfigurationError(
            f"{what} needs {missing} in each sample, but the dataset gives only "
            f"{sorted(keys)}; {advice}"
        )


def reference_labels(single: str | None, several: list[str] | None, labels: list[str]) -> list[str]:
    """The reference method labels of ``stats.csv``: ``reference_methods``, else
    ``[reference_method]``, else the first method; each must be a method label."""
    if single is not None and several is not None:
        raise ConfigurationError(
            "evaluation sets both reference_method and reference_methods; use "
            f"reference_methods: [{single}, ...] alone"
        )
    references = list(several) if several is not None else [single or labels[0]]
    if not references:
        raise ConfigurationError("evaluation.reference_methods is empty; name at least one method")
    for reference in references:
        if reference not in labels:
            raise ConfigurationError(
                f"evaluation reference method {reference!r} is not one of the method labels: "
                f"{', '.join(labels)}"
            )
    if len(set(references)) != len(references):
        raise ConfigurationError(f"evaluation.reference_methods lists a method twice: {references}")
    return references


def check_sanity_options(
    options: dict[str, Any] | None, gallery_size: int | None = None
) -> dict[str, Any] | None:
    """``evaluation.sanity_check`` with defaults filled in, checked (``None``: off).

    - ``samples`` (4): the first gallery samples explained; at most ``gallery_size``.
    - ``measures`` (all: ``spearman_abs, spearman, ssim, hog``, PROTOCOLS.md "Sanity check"):
      computed from the same maps in one pass; ``measure: <name>`` is short for one.
    - ``target`` (``randomised_argmax``, the protocol): the class explained on a randomised
      model is its own argmax; ``original`` keeps the trained model's prediction.
    - ``order`` (module names, logits first) or ``group_depth`` (blocks by the first n name
      components, :func:`~contrastive_saliency.metrics.functional.grouped_randomisation_order`); neither:
      every parameterised layer is one step. ``max_steps``: only the first steps.
    - ``seed`` (0): the random values of the re-initialised layers.
    """
    if options is None:
        return None
    from callbacks.evaluation.randomisation import DEFAULT_MEASURES, TARGETS, check_measures

    defaults = {
        "samples": 4, "measures": list(DEFAULT_MEASURES), "target": "randomised_argmax",
        "max_steps": None, "seed": 0, "order": None, "group_depth": None,
    }  # fmt: skip
    unknown = set(options) - set(defaults) - {"measure"}
    if unknown:
        raise ConfigurationError(
            f"evaluation.sanity_check has unknown key(s) {sorted(unknown)}; valid: "
            f"{', '.join(defaults)} (or measure: <one measure>)"
        )
    if "measure" in options and "measures" in options:
        raise ConfigurationError(
            "evaluation.sanity_check sets both 'measure' and 'measures'; use measures: [...]"
        )
    merged = {**defaults, **options}
    if "measure" in merged:
        merged["measures"] = [merged.pop("measure")]
    try:
        merged["measures"] = list(check_measures(merged["measures"]))
    except ValueError as error:
        raise ConfigurationError(f"evaluation.sanity_check.measures: {error}") from error
    if merged["target"] not in TARGETS:
        raise ConfigurationError(
            f"evaluation.sanity_check.target {merged['target']!r} is not one of "
            f"{', '.join(TARGETS)}"
        )
    for key, minimum in (("samples", 1), ("max_steps", 1), ("group_depth", 1)):
        value = merged[key]
        valid = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        if value is not None and not valid:
            raise ConfigurationError(
                f"evaluation.sanity_check.{key} must be an integer ≥ {minimum}, got {value!r}"
            )
    if merged["order"] is not None and merged["group_depth"] is not None:
        raise ConfigurationError(
            "evaluation.sanity_check sets both 'order' and 'group_depth'; choose one"
        )
    if isinstance(merged["order"], str):
        raise ConfigurationError(
            f"evaluation.sanity_check.order must be a list of module names, got the string "
            f"{merged['order']!r}"
        )
    if gallery_size is not None and merged["samples"] > gallery_size:
        log.warning(
            "evaluation.sanity_check.samples=%d but gallery_size=%d: the sanity check runs on "
            "the gallery samples, so only %d are used; raise evaluation.gallery_size",
            merged["samples"], gallery_size, gallery_size,
        )  # fmt: skip
    return merged


def check_sample_fields(
    metrics: list[MetricSpec],
    methods: list[MethodSpec],
    combinations: list[_Combination],
    keys: set[str],
) -> None:
    """Every metric (masks, boxes) and method (its ``batch_fields``, e.g. the reference maps)
    whose sample fields the dataset lacks, in one error, with the ``--evaluation.metrics`` /
    ``--evaluation.methods`` values that would run."""
    lacking_metrics = {
        spec.label: missing
        for spec in metrics
        if (
            missing := [
                k for k in metric_class(spec.name).needed_keys(spec.kwargs) if k not in keys
            ]
        )
    }
    lacking_methods = {
        c.spec.label: missing
        for c in combinations
        if (missing := [k for k in c.batch_fields if k not in keys])
    }
    if not lacking_metrics and not lacking_methods:
        return
    lacking, remedies = [], []
    for option, missing, specs in (
        ("metrics", lacking_metrics, metrics),
        ("methods", lacking_methods, methods),
    ):
        if not missing:
            continue
        lacking += [f"{option[:-1]} {label!r} needs {needed}" for label, needed in missing.items()]
        kept = [spec.as_config() for spec in specs if spec.label not in missing]
        flow = yaml.safe_dump(kept, default_flow_style=True, sort_keys=False, width=10**6)
        remedies.append(
            f"--evaluation.{option} '{flow.strip()}'"
            if kept
            else f"no {option[:-1]} of this study runs on it: choose another study "
            "(e.g. configs/evaluate/fidelity.yaml)"
        )
    raise ConfigurationError(
        f"the dataset's samples give only {sorted(keys)}: {'; '.join(lacking)}; drop them: "
        f"{' '.join(remedies)}, or use a dataset with these annotations (shapes, CUB, COCO, "
        "ImageNet-S)"
    )
