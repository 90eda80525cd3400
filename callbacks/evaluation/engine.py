"""The evaluation engine, free of Lightning: build every (method, layer) of a study and, per
batch, make all the maps the target policies need in one call per (method, layer) and update
one registered metric per (method, layer, policy, metric).

Per batch: the module's logits (one forward) give the predictions; the classes of every target
policy are collected into one ``[B, U]`` request, so each (method, layer) makes all the maps the
policies need in ONE call, and every metric of that (method, layer, policy) reads the same maps
(and shares perturbation forwards through a per-batch cache).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from callbacks.evaluation.keys import MapsKey, MetricKey, PolicyKey
from callbacks.evaluation.spec import MethodSpec, matrix_contrast_selectors, resolve_selectors
from callbacks.evaluation.target_policies import TargetColumn, column_classes, correct_rows
from contrastive_saliency.layers import layer_path
from contrastive_saliency.metrics.registry import (
    Explainer,
    MetricInputs,
    RegisteredMetric,
    create_metric,
    metric_class,
)

INPUT_LAYER = "input"  # the layer label of methods that explain the input (no layer)
CONFUSION_FROM_VALIDATION = "validate"  # evaluation.confusion_matrix: computed by evaluate.py
CONFUSION_FROM_HOLDOUT = "holdout"  # ... on a seeded per-class hold-out of the train split
CONTRASTS_FROM_MATRIX = "contrasts_from_matrix"  # per_sample.parquet column


def computed_confusion_matrix(run_dir: str | Path) -> Path:
    """Where ``evaluate.py`` saves the matrix it computes for ``validate`` / ``holdout`` (with
    its ``.csv`` and ``.json`` provenance beside it), and where the evaluation reads it."""
    return Path(run_dir) / "confusion_matrix.npy"


class _Combination:
    """One built method at one layer."""

    def __init__(self, spec: MethodSpec, layer: str, method: Any, counters: list[Any]) -> None:
        self.spec, self.layer, self.method = spec, layer, method
        self.counters = counters  # its confusion selectors (contrasts_from_matrix)

    def contrasts_from_matrix(self, classes: torch.Tensor) -> torch.Tensor | None:
        """``[B]``: per sample, the fewest contrasts taken from the confusion matrix among the
        explained ``classes [B, K]`` (over its selectors); None without a confusion selector."""
        if not self.counters:
            return None
        counts = [c.contrasts_from_matrix(classes.reshape(-1)) for c in self.counters]
        return torch.stack(counts).amin(dim=0).view_as(classes).amin(dim=1)

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """The batch fields the method declares it reads (``SaliencyMethod.batch_fields``)."""
        return tuple(getattr(self.method, "batch_fields", ()))

    def maps(
        self,
        images: torch.Tensor,
        classes: torch.Tensor,
        batch: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The method's maps; ``batch`` supplies the fields it declares (none: no fields)."""
        batch = batch or {}
        fields = {name: batch[name] for name in self.batch_fields if name in batch}
        return self.method(images, classes, **fields, **kwargs)

    def explainer(self, batch: dict[str, Any]) -> Explainer:
        """The method on other images for the metrics that re-explain
        (:attr:`MetricInputs.explain`): ``rows`` picks each image's batch fields."""
        fields = {name: batch[name] for name in self.batch_fields if name in batch}
        size = batch["image"].shape[0]

        def explain(images: torch.Tensor, classes: torch.Tensor, rows: torch.Tensor):
            chosen = {
                name: value[rows.to(value.device)]
                if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == size
                else value
                for name, value in fields.items()
            }
            return self.method(images, classes, **chosen)

        return explain


class EvaluationEngine:
    """Building methods and evaluating batches (mixed into
    :class:`callbacks.evaluation.SaliencyEvaluationCallback`). Reads the study's
    ``method_specs``, ``layers``, ``policies``, ``metric_specs``, ``correct_only``,
    ``autocast``, ``perturbation_batch_size`` and ``_normalisation``; :meth:`_build` gives
    ``combinations``."""

    combinations: list[_Combination] | None

    def _build(self, network: torch.nn.Module, matrix: str | Path | None) -> list[_Combination]:
        from contrastive_saliency.methods import create_method

        combinations: list[_Combination] = []
        for configured in self.layers:
            # None: each method's default; protocol:<name>: that protocol's layer for this
            # network; a path is checked here, listing the nearest valid names
            layer = layer_path(network, configured)
            for spec in self.method_specs:
                kwargs = self._method_kwargs(spec, matrix)
                method = create_method(spec.name, network, layer=layer, **kwargs)
                used = getattr(method, "layer", None)
                label = used if isinstance(used, str) else INPUT_LAYER
                if any(c.spec is spec and c.layer == label for c in combinations):
                    continue  # a layer-free method runs once, not once per layer
                counters = matrix_contrast_selectors(kwargs)
                combinations.append(_Combination(spec, label, method, counters))
        return combinations

    def _method_kwargs(self, spec: MethodSpec, matrix: str | Path | None) -> dict[str, Any]:
        """The spec's options with selectors built and the data's normalisation added where
        the method takes one and the config does not set it."""
        from contrastive_saliency.methods import method_options

        kwargs = resolve_selectors(dict(spec.kwargs), matrix)
        if self._normalisation is not None and "normalisation" in method_options(spec.name):
            kwargs.setdefault("normalisation", self._normalisation)
        return kwargs

    # ------------------------------------------------------------------------- per batch
    def _columns(self, batch: dict[str, Any]) -> list[TargetColumn]:
        columns: list[TargetColumn] = []
        for policy in self.policies:
            columns += [c for c in policy.columns(batch) if c not in columns]
        return columns

    def _maps(
        self, combination: _Combination, images: torch.Tensor, classes: torch.Tensor,
        columns: list[TargetColumn], batch: dict[str, Any],
    ) -> torch.Tensor:  # fmt: skip
        """All columns' maps ``[B, U, H, W]`` in one call; for a method that takes a class set
        per call (``per_call_class_set``: VAR), a grid's cells compete within their grid (the
        class set = the grid's classes), so they get their own call."""
        from contrastive_saliency.methods import method_factory

        grid = [i for i, c in enumerate(columns) if c.kind == "cell"]
        per_call_class_set = getattr(
            method_factory(combination.spec.name), "per_call_class_set", False
        )
        if not per_call_class_set or not grid:
            return combination.maps(images, classes, batch)
        rest = [i for i in range(len(columns)) if i not in grid]
        grid_maps = combination.maps(
            images, classes[:, grid], batch, class_set=batch["grid_labels"].to(classes.device)
        )
        if rest:
            rest_maps = combination.maps(images, classes[:, rest], batch)
            maps = torch.empty(
                (images.shape[0], len(columns), *grid_maps.shape[-2:]), device=grid_maps.device
            )
            maps[:, grid], maps[:, rest] = grid_maps, rest_maps
            return maps
        return grid_maps

    def new_metrics(self, device: torch.device) -> dict[MetricKey, RegisteredMetric]:
        """One registered metric per (method, layer, policy, metric label) whose target kind
        the policy has, in one fixed order (all processes gather their states in it)."""
        metrics: dict[MetricKey, RegisteredMetric] = {}
        for combination in self.combinations:
            for policy in self.policies:
                key = PolicyKey(combination.spec.label, combination.layer, policy.name)
                for spec in self.metric_specs:
                    if metric_class(spec.name).target_kind != policy.kind:
                        continue
                    metric = create_metric(
                        spec.name, **spec.kwargs, batch_size=self.perturbation_batch_size
                    )
                    metrics[MetricKey(*key, spec.label)] = metric.to(device)
        return metrics

    def evaluate_batch(
        self,
        network: torch.nn.Module,
        batch: dict[str, Any],
        logits: torch.Tensor,
        metrics: dict[MetricKey, RegisteredMetric],
    ) -> dict[str, Any]:
        """Update ``metrics`` (:meth:`new_metrics`) with one batch; returns the rows used."""
        rows = correct_rows(logits, batch) if self.correct_only else None
        if rows is not None:
            batch = {k: _select(v, rows) for k, v in batch.items()}
            logits = logits[rows]
        if logits.shape[0] == 0:
            return batch
        images = batch["image"]
        columns = self._columns(batch)
        classes = torch.stack([column_classes(c, logits, batch) for c in columns], dim=1)
        self._batch_maps: dict[MapsKey, torch.Tensor] = {}
        # metrics that re-run the method on perturbed images get it (MetricInputs.explain)
        explaining = any(metric_class(s.name).needs_explainer for s in self.metric_specs)
        autocast = (
            torch.autocast("cuda", dtype=torch.float16)
            if self.autocast
            else contextlib.nullcontext()
        )
        with autocast:
            for combination in self.combinations:
                maps = self._maps(combination, images, classes, columns, batch).float()
                self._batch_maps[MapsKey(combination.spec.label, combination.layer)] = maps
                for policy in self.policies:
                    chosen = [columns.index(c) for c in policy.columns(batch)]
                    inputs = MetricInputs(
                        model=network, images=images, maps=maps[:, chosen],
                        classes=classes[:, chosen], logits=logits, batch=batch,
                        explain=combination.explainer(batch) if explaining else None,
                    )  # fmt: skip
                    key = PolicyKey(combination.spec.label, combination.layer, policy.name)
                    for spec in self.metric_specs:
                        metric = metrics.get(MetricKey(*key, spec.label))
                        if metric is not None:
                            metric.update(**metric.update_arguments(inputs))
        self._batch_columns, self._batch_classes = columns, classes
        return batch

    def _method_fields(self) -> list[str]:
        """Every batch field some method of the run reads (kept for the sanity check)."""
        return sorted({name for c in self.combinations for name in c.batch_fields})


def _select(value: Any, rows: torch.Tensor) -> Any:
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows.shape[0]:
        return value[rows.to(value.device)]
    return value
