"""The keys of an evaluation's results: which method, at which layer, for which target policy
(and which metric or curve) a metric state, a value, a curve or a batch's maps belong to. Named
tuples, so each position says what it is; they unpack, hash and compare like the plain tuples
they replace. ``method`` is the method's label, ``layer`` the layer label (``input`` for a
layer-free method), ``target_policy`` the policy's name: the columns of ``per_sample.parquet``.
The gallery's keys are :class:`callbacks.report.gallery.GalleryKey`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from contrastive_saliency.metrics.registry import RegisteredMetric


class MapsKey(NamedTuple):
    """One method built at one layer: the maps it gave for a batch."""

    method: str
    layer: str


class PolicyKey(NamedTuple):
    """One method at one layer under one target policy (its confusion-matrix contrast counts)."""

    method: str
    layer: str
    target_policy: str


class MetricKey(NamedTuple):
    """One metric of a method at a layer under a target policy: ``metric`` is the configured
    metric label for a metric state, or one of the state's value names for a value (a summary
    row, a W&B key)."""

    method: str
    layer: str
    target_policy: str
    metric: str


class CurveKey(NamedTuple):
    """The per-sample curves of one curve kind (``deletion``, ``insertion``, ...) of a method at
    a layer under a target policy."""

    method: str
    layer: str
    target_policy: str
    curve: str


def value_keys(metrics: Mapping[MetricKey, RegisteredMetric]) -> list[MetricKey]:
    """The key of every per-sample value that ``metrics`` (metric label → state) give, one per
    value name of each state (``aupr`` gives ``aupr1`` and ``aupr0``), in the states' order. Read
    from the configuration, not from the values, so every process gets the same keys."""
    return [
        MetricKey(*key[:3], name)
        for key, state in metrics.items()
        for name in state.labelled_names(key[3])
    ]
