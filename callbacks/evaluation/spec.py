"""What an evaluation runs: method, metric and target-policy specs from a config, checked up
front so a bad config fails before the first batch.

A method entry is a registered name or a mapping::

    methods:
      - grad_cam
      - {name: case, label: case_k1, kwargs: {contrast: {selector: confusion, k: 1}}}
      - {name: finer_cam, kwargs: {references: {selector: logit_neighbours, k: 3}}}
      - {name: var, label: var_grad_cam, kwargs: {base: grad_cam}}

Selector mappings (``{selector: ..., k: ...}``) anywhere in ``kwargs`` become selector objects:
``confusion`` (CASE: :class:`~contrastive_saliency.targets.ConfusionContrast` on the confusion matrix the
training run saved; options ``k`` and ``fallback: top_predictions | none``),
``logit_neighbours``, ``top_predictions`` and ``class_set``. A metric entry
is a name from the metric registry (:mod:`contrastive_saliency.metrics.registry`) or ``{name, label, kwargs}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contrastive_saliency.errors import ConfigurationError, UnknownMethodError, closest

SELECTORS = ("confusion", "logit_neighbours", "top_predictions", "class_set")
_LABEL = re.compile(r"^[A-Za-z0-9_.@%+-]+$")


@dataclass(frozen=True)
class _Spec:
    name: str
    label: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def as_config(self) -> str | dict[str, Any]:
        """The ``evaluation.methods`` / ``evaluation.metrics`` entry that gives this spec back."""
        if self.label == self.name and not self.kwargs:
            return self.name
        entry: dict[str, Any] = {"name": self.name}
        if self.label != self.name:
            entry["label"] = self.label
        if self.kwargs:
            entry["kwargs"] = dict(self.kwargs)
        return entry


@dataclass(frozen=True)
class MethodSpec(_Spec):
    """A saliency method to build: registered ``name``, a unique ``label`` used in tables and
    W&B keys, and constructor ``kwargs`` (selector mappings still unresolved)."""

    @property
    def needs_confusion_matrix(self) -> bool:
        return _mentions_selector(self.kwargs, "confusion")


@dataclass(frozen=True)
class MetricSpec(_Spec):
    """A metric to compute: ``name`` from the evaluation metric table, a unique ``label``
    (prefix of the value names it produces) and its options."""


def _entry(entry: str | Mapping[str, Any], what: str) -> tuple[str, str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, entry, {}
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise ConfigurationError(
            f"each {what} must be a name or a mapping with 'name' (and optional 'label', "
            f"'kwargs'); got {entry!r}"
        )
    unknown = set(entry) - {"name", "label", "kwargs"}
    if unknown:
        raise ConfigurationError(
            f"{what} {entry['name']!r} has unknown key(s) {sorted(unknown)}; valid: name, label, "
            f"kwargs"
        )
    name = str(entry["name"])
    label = str(entry.get("label") or name)
    kwargs = dict(entry.get("kwargs") or {})
    return name, label, kwargs


def _check_labels(labels: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for label in labels:
        if not _LABEL.match(label):
            raise ConfigurationError(
                f"{what} label {label!r} may contain only letters, digits and _ . @ % + -"
            )
        if label in seen:
            raise ConfigurationError(
                f"{what} label {label!r} appears twice; give each entry a distinct 'label'"
            )
        seen.add(label)


def parse_methods(entries: Sequence[str | Mapping[str, Any]]) -> list[MethodSpec]:
    """Method specs from config entries; unknown names fail with the valid ones listed."""
    from contrastive_saliency.methods import list_methods

    if not entries:
        raise ConfigurationError("evaluation.methods is empty; list at least one method")
    specs = []
    for entry in entries:
        name, label, kwargs = _entry(entry, "method")
        if name not in list_methods():
            hint = closest(name, list_methods())
            raise UnknownMethodError(
                f"unknown saliency method {name!r} in evaluation.methods; "
                f"{'did you mean ' + ', '.join(hint) + '? ' if hint else ''}"
                f"available: {', '.join(list_methods())}"
            )
        _check_selectors(kwargs, f"method {label!r}")
        specs.append(MethodSpec(name, label, kwargs))
    _check_labels([s.label for s in specs], "method")
    return specs


def parse_metrics(entries: Sequence[str | Mapping[str, Any]]) -> list[MetricSpec]:
    """Metric specs from config entries, checked against the metric registry
    (:mod:`contrastive_saliency.metrics.registry`): names, options and their values."""
    from contrastive_saliency.metrics.registry import list_metrics, metric_class

    if not entries:
        raise ConfigurationError("evaluation.metrics is empty; list at least one metric")
    specs = []
    for entry in entries:
        name, label, kwargs = _entry(entry, "metric")
        if name not in list_metrics():
            hint = closest(name, list_metrics())
            raise ConfigurationError(
                f"unknown metric {name!r} in evaluation.metrics; "
                f"{'did you mean ' + ', '.join(hint) + '? ' if hint else ''}"
                f"available: {', '.join(list_metrics())}"
            )
        metric_class(name).check_options(kwargs, label)
        specs.append(MetricSpec(name, label, kwargs))
    _check_labels([s.label for s in specs], "metric")
    return specs


def _mentions_selector(value: Any, selector: str) -> bool:
    if isinstance(value, Mapping):
        if value.get("selector") == selector:
            return True
        return any(_mentions_selector(v, selector) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_mentions_selector(v, selector) for v in value)
    return False


def _check_selectors(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        if "selector" in value and value["selector"] not in SELECTORS:
            raise ConfigurationError(
                f"{where}: unknown selector {value['selector']!r}; valid: {', '.join(SELECTORS)}"
            )
        for item in value.values():
            _check_selectors(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_selectors(item, where)


def resolve_selectors(value: Any, confusion_matrix: str | Path | None) -> Any:
    """Replace ``{selector: ..., **options}`` mappings in ``value`` by selector objects."""
    from contrastive_saliency.targets import (
        ClassSet,
        ConfusionContrast,
        LogitNeighbours,
        TopPredictions,
    )

    if isinstance(value, Mapping):
        if "selector" in value:
            options = {k: v for k, v in value.items() if k != "selector"}
            kind = value["selector"]
            if kind == "confusion":
                if confusion_matrix is None:
                    raise ConfigurationError(
                        "a 'confusion' contrast selector needs the confusion matrix of the "
                        "training run (confusion_matrix.npy next to checkpoints/); none was "
                        "found: evaluate a train.py checkpoint or set "
                        "evaluation.confusion_matrix PATH"
                    )
                return ConfusionContrast(confusion_matrix, **options)
            factory = {
                "logit_neighbours": LogitNeighbours,
                "top_predictions": TopPredictions,
                "class_set": ClassSet,
            }[kind]
            return factory(**options)
        return {k: resolve_selectors(v, confusion_matrix) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(resolve_selectors(v, confusion_matrix) for v in value)
    return value


def matrix_contrast_selectors(value: Any) -> list[Any]:
    """The selectors in resolved method ``kwargs`` (nested too, e.g. a VAR base's) that can say
    how many of a target's contrasts came from a confusion matrix (``contrasts_from_matrix``);
    the evaluation records that count per sample."""
    if callable(getattr(value, "contrasts_from_matrix", None)):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [found for item in value for found in matrix_contrast_selectors(item)]
    return []
