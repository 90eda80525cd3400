"""Registry of the evaluation metrics by name, as timm registers models and
:mod:`contrastive_saliency.methods.registry` registers methods: configs, tables, W&B keys and
:func:`create_metric` all use the same names (``feature_agreement``, ``deletion_auc``, ...).

Each registered metric is ONE :class:`~torchmetrics.Metric` subclass (a
:class:`RegisteredMetric`) over a pure function of :mod:`contrastive_saliency.metrics.functional`. What a
metric *is* lives on its class, written once, and every reader (the evaluation's checks, its
tables and plots, the CAAP sweeps' "best variant") takes it from there:

- ``higher_is_better``: the direction of a better map;
- ``title`` (and ``outputs``: value-name suffix → title, for a metric with several values such
  as AUPR₁ / AUPR₀); the class docstring says what it measures and cites the paper;
- ``family``: ``class_sensitivity``, ``faithfulness``, ``localisation``, ``complexity`` or
  ``robustness``;
- ``target_kind``: the kind of target policy whose maps it scores (``pair``: two maps of one
  image, ``random_pair``: the top-1 map and a random other class's, ``single``: one map,
  ``grid``: one map per cell of a grid image);
- ``needs``: the batch keys it reads, plus its ``mask_key`` option where it has one (``mask``,
  ``part_mask``, ``boxes``);
- ``needs_explainer``: True for a metric that re-runs the evaluated method on other images
  (Max-/Avg-Sensitivity): it reads :attr:`MetricInputs.explain`, which the evaluation sets from
  the (method, layer) it evaluates;
- its options: the keyword parameters of ``__init__`` (except ``batch_size``, which the
  evaluation sets, and those in ``internal_options``), with ``choices`` for the ones that take
  one of a few values;
- ``curves``: the mean curves it can plot (:class:`CurveInfo`), kept per sample next to its
  values.

A metric's ``update`` keeps the torchmetrics form (tensors in, e.g. ``update(maps, masks,
index)``); :meth:`RegisteredMetric.update_arguments` says how the evaluation's
:class:`MetricInputs` of one batch map onto it, so the evaluation calls
``metric.update(**metric.update_arguments(inputs))`` for every metric alike. Adding a metric:
the function in ``functional/``, the registered class, a test.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError, closest
from contrastive_saliency.metrics.per_sample import SampleMetric

TARGET_KINDS = ("pair", "random_pair", "single", "grid")
FAMILIES = ("class_sensitivity", "faithfulness", "localisation", "complexity", "robustness")
EVALUATION_SET = ("batch_size",)
Explainer = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]  # set by the evaluation (perturbation_batch_size), no option


@dataclass(frozen=True)
class CurveInfo:
    """A mean curve a metric can plot: its ``kind`` (the ``curve`` column of ``curves.csv``),
    title and axis labels. Which area is better is the metric's ``higher_is_better``."""

    kind: str
    title: str
    x_label: str
    y_label: str


@dataclass
class MetricInputs:
    """What a metric may read for one (method, layer, target policy) on one batch.

    ``maps``: ``[B, C, H, W]`` for the policy's ``C`` columns (2 for a pair, 1 for a single
    map, the cells of a grid); ``classes``: ``[B, C]`` the explained classes; ``logits`` of
    the unperturbed ``images``; ``batch``: the datamodule's batch (rows already selected);
    ``cache``: shared by the metrics of one (method, layer, policy) on one batch, so a
    perturbation curve that several metrics read is computed once; ``explain``: the evaluated
    method at its layer, for metrics that re-explain other images (``needs_explainer``), as
    ``explain(images [N, C, H, W], classes [N, K], rows [N]) → maps [N, K, H, W]`` where
    ``rows[n]`` is the row of ``batch`` that image ``n`` stands for (its batch fields, e.g. the
    ``index`` of a seeded method, go with it); ``None`` where no method can be re-run.
    """

    model: nn.Module | None
    images: torch.Tensor
    maps: torch.Tensor
    classes: torch.Tensor
    logits: torch.Tensor | None
    batch: Mapping[str, Any]
    cache: dict[str, Any] = field(default_factory=dict)
    explain: Explainer | None = None

    def explainer(self, metric: str) -> Explainer:
        """:attr:`explain`, or a :class:`ConfigurationError` naming ``metric`` when it is
        ``None``."""
        if self.explain is None:
            raise ConfigurationError(
                f"metric {metric!r} re-explains perturbed images, but these inputs carry no "
                "explain function (MetricInputs.explain is None); run it in an evaluate.py "
                "study, which sets it from the evaluated method and layer, or pass "
                "explain=lambda images, classes, rows: method(images, classes)"
            )
        return self.explain

    @property
    def index(self) -> torch.Tensor:
        """The batch's ``index`` ``[B]``: the state's key, and the seed of every metric's
        random tie-breaking (:mod:`contrastive_saliency.metrics.functional.ties`)."""
        if "index" not in self.batch:
            raise ConfigurationError(
                f"the batch has no 'index' (keys: {sorted(self.batch)}); every dataset item "
                "must carry its dataset index (DESIGN.md 'Sample format')"
            )
        return self.batch["index"]

    @property
    def single(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(maps [B, H, W], classes [B])`` of the first column."""
        return self.maps[:, 0], self.classes[:, 0]


class RegisteredMetric(SampleMetric):
    """Base of the registered metrics: the metadata above as class attributes, the checks of
    a config's options, and :meth:`update_arguments`."""

    name: ClassVar[str] = ""  # set by :func:`register_metric`
    title: ClassVar[str] = ""
    family: ClassVar[str] = ""
    target_kind: ClassVar[str] = "single"
    needs: ClassVar[tuple[str, ...]] = ()
    needs_explainer: ClassVar[bool] = False
    outputs: ClassVar[Mapping[str, str]] = {}  # value-name suffix → title; {"": title} if empty
    curves: ClassVar[tuple[CurveInfo, ...]] = ()
    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {}
    internal_options: ClassVar[tuple[str, ...]] = ()

    def update_arguments(self, inputs: MetricInputs) -> dict[str, Any]:
        """The keyword arguments of :meth:`update` for the evaluation's ``inputs``. Every
        registered class defines it (:func:`register_metric` refuses one that does not)."""
        raise NotImplementedError(
            f"{type(self).__name__} must define update_arguments(inputs) to be used by the evaluation"
        )

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The options a config may set, with their defaults (from ``__init__``)."""
        skipped = {*EVALUATION_SET, *cls.internal_options}
        return {
            name: parameter.default
            for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            and name != "self"
            and name not in skipped
        }

    @classmethod
    def check_options(cls, kwargs: Mapping[str, Any], label: str) -> None:
        """A :class:`ConfigurationError` for an option ``__init__`` lacks or a value outside
        ``choices``; ``label`` names the configured metric."""
        defaults = cls.options()
        unknown = set(kwargs) - set(defaults)
        if unknown:
            raise ConfigurationError(
                f"metric {label!r} ({cls.name}) has unknown option(s) {sorted(unknown)}; "
                f"valid: {', '.join(sorted(defaults)) or '(none)'}"
            )
        for option, valid in cls.choices.items():
            if option in kwargs and kwargs[option] not in valid:
                raise ConfigurationError(
                    f"metric {label!r} ({cls.name}): {option}={kwargs[option]!r} is not one of "
                    f"{', '.join(map(str, valid))}"
                )
        try:
            cls(**kwargs)  # the class's own checks of the values, before any computation
        except (TypeError, ValueError) as error:
            raise ConfigurationError(f"metric {label!r} ({cls.name}): {error}") from error

    @classmethod
    def needed_keys(cls, kwargs: Mapping[str, Any]) -> tuple[str, ...]:
        """The batch keys the metric reads with options ``kwargs``."""
        mask_key = {**cls.options(), **kwargs}.get("mask_key")
        return (*cls.needs, mask_key) if mask_key else cls.needs

    @classmethod
    def labelled_names(cls, label: str) -> list[str]:
        """The names of its per-sample values for a configured ``label`` (``label`` + each
        suffix of ``outputs``: ``aupr1``, ``aupr0``; for the label ``name`` the state's
        ``value_names``)."""
        return [label + suffix for suffix in cls.outputs]

    def labelled_values(
        self, label: str, sync: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(indices [N], {value name: [N]})`` as :meth:`per_sample_table`, the columns named
        for the configured ``label`` (:meth:`labelled_names`)."""
        indices, table = self.per_sample_table(sync)
        suffixes = self.outputs.keys()
        return indices, {
            label + suffix: table[column]
            for suffix, column in zip(suffixes, self.value_names, strict=True)
        }


_REGISTRY: dict[str, type[RegisteredMetric]] = {}
_CURVES: dict[str, tuple[CurveInfo, type[SampleMetric]]] = {}
Metric = TypeVar("Metric", bound=type[RegisteredMetric])


def register_metric(name: str) -> Callable[[Metric], Metric]:
    """Class decorator registering a :class:`RegisteredMetric` as ``name``; checks its
    metadata and derives ``outputs`` (``{"": title}``) and the state's ``value_names``
    (``name`` + each output suffix) when the class does not set them."""

    def decorate(cls: Metric) -> Metric:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"metric {name!r} is registered twice")
        if not issubclass(cls, RegisteredMetric):
            raise TypeError(f"{cls.__name__} must subclass RegisteredMetric to be registered")
        if not isinstance(getattr(cls, "higher_is_better", None), bool):
            raise TypeError(f"metric {name!r} ({cls.__name__}) must set higher_is_better")
        if cls.family not in FAMILIES or cls.target_kind not in TARGET_KINDS or not cls.title:
            raise TypeError(
                f"metric {name!r} ({cls.__name__}) needs a title, a family in {FAMILIES} and a "
                f"target_kind in {TARGET_KINDS}"
            )
        if cls.update_arguments is RegisteredMetric.update_arguments:
            raise TypeError(f"metric {name!r} ({cls.__name__}) must define update_arguments")
        cls.name = name
        if not cls.__dict__.get("outputs"):
            cls.outputs = {"": cls.title}
        if "value_names" not in cls.__dict__:
            cls.value_names = tuple(name + suffix for suffix in cls.outputs)
        register_curves(cls)
        _REGISTRY[name] = cls
        return cls

    return decorate


def register_curves(cls: type[SampleMetric]) -> type[SampleMetric]:
    """Class decorator making the ``curves`` of a metric class (a registered one, or one the
    evaluation does not offer, such as PIC) known to :func:`curve_info`."""
    for curve in getattr(cls, "curves", ()):
        known = _CURVES.get(curve.kind)
        if known is not None and known[1] is not cls:
            raise ValueError(f"curve {curve.kind!r} is declared by {known[1].__name__} already")
        _CURVES[curve.kind] = (curve, cls)
    return cls


def list_metrics() -> list[str]:
    """Names of every registered metric, sorted (importing this module imports
    :mod:`contrastive_saliency.metrics`, whose modules register their classes)."""
    return sorted(_REGISTRY)


def metric_class(name: str) -> type[RegisteredMetric]:
    """The class registered as ``name`` (its metadata, before building it)."""
    if name not in _REGISTRY:
        suggestions = closest(name, _REGISTRY)
        hint = f"did you mean {', '.join(suggestions)}? " if suggestions else ""
        raise ConfigurationError(
            f"unknown metric {name!r}; {hint}available: {', '.join(list_metrics())}"
        )
    return _REGISTRY[name]


def create_metric(name: str, **options: Any) -> RegisteredMetric:
    """Build the metric registered as ``name`` with ``options`` (and ``batch_size``, the
    images per forward of a metric that queries the model, where it takes one)."""
    cls = metric_class(name)
    if "batch_size" in options and "batch_size" not in inspect.signature(cls.__init__).parameters:
        options = {k: v for k, v in options.items() if k != "batch_size"}
    return cls(**options)


def describe_value(value_name: str) -> tuple[type[RegisteredMetric], str] | None:
    """``(metric class, title)`` of a per-sample value name: an exact value name of a
    registered metric (``aupr1``), else a custom label that starts with one, the longest
    (``deletion_auc_white`` → Deletion AUC (deletion_auc_white)); ``None`` for an unknown
    name."""
    exact = {cls.name + s: (cls, t) for cls in _REGISTRY.values() for s, t in cls.outputs.items()}
    if value_name in exact:
        return exact[value_name]
    for prefix, (cls, title) in sorted(exact.items(), key=lambda item: -len(item[0])):
        if value_name.startswith(prefix):
            return cls, f"{title} ({value_name})"
    return None


def curve_info(kind: str) -> tuple[CurveInfo, type[SampleMetric]]:
    """``(curve, metric class)`` of a curve kind a metric class declares (the registered
    metrics and the PIC curves); the class's ``higher_is_better`` says which area is better."""
    if kind not in _CURVES:
        raise KeyError(f"no metric declares a curve {kind!r}; known: {', '.join(sorted(_CURVES))}")
    return _CURVES[kind]
