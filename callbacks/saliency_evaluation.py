"""Saliency evaluation: methods × layers × target policies × metrics on every test batch.

Per batch: the module's logits (one forward) give the predictions; the classes of every target
policy are collected into one ``[B, U]`` request, so each (method, layer) makes all the maps the
policies need in ONE call, and every metric of that (method, layer, policy) reads the same maps
(and shares perturbation forwards through a per-batch cache). Per-sample scalars and resampled
curves are kept with the sample ``index``; at the end of the epoch they are gathered from every
process and de-duplicated by index (exactly once under DDP; only scalars, curves and the few
gallery samples travel). Rank 0 then builds ``summary.csv``, ``stats.csv`` (every method vs the
reference method), plots, a gallery and ``report.md`` in a staging directory and publishes them
at once (:mod:`callbacks.run_outputs`), and logs the same to W&B.

During ``trainer.fit`` the callback can also watch explanations as a model trains:
``every_n_epochs`` evaluates the first ``validation_batches`` validation batches and logs the
means as ``eval/<method>/<metric>``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import yaml

from callbacks.evaluation_spec import (
    MethodSpec,
    MetricSpec,
    matrix_contrast_selectors,
    parse_methods,
    parse_metrics,
    resolve_selectors,
)
from callbacks.evaluation_tables import (
    describe_sibling_share,
    mean_curves,
    method_tests,
    sibling_share,
    summarise,
)
from callbacks.explained_model import data_normalisation, first_test_indices
from callbacks.run_outputs import StagedResults
from callbacks.target_policies import (
    POLICIES,
    column_classes,
    correct_rows,
    parse_policies,
)
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.layers import layer_path
from contrastive_saliency.metrics.per_sample import PerSampleValues
from contrastive_saliency.metrics.registry import (
    MetricInputs,
    RegisteredMetric,
    create_metric,
    metric_class,
)
from contrastive_saliency.stats import hypothesis_text, method_alternative
from lightning_modules.wandb_runs import wandb_runs

log = logging.getLogger(__name__)
INPUT_LAYER = "input"  # the layer label of methods that explain the input (no layer)
CONFUSION_FROM_VALIDATION = "validate"  # evaluation.confusion_matrix: computed by evaluate.py
CONFUSION_FROM_HOLDOUT = "holdout"  # ... on a seeded per-class hold-out of the train split
CONTRASTS_FROM_MATRIX = "contrasts_from_matrix"  # per_sample.parquet column


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


class SaliencyEvaluationCallback(L.Callback):
    """Evaluate saliency methods on the test split (and optionally during training).

    Args:
        methods: names or ``{name, label, kwargs}`` (:mod:`callbacks.evaluation_spec`).
        layers: dotted layer paths; ``null`` = each network's default layer;
            ``protocol:case`` = the layer CASE explains on this architecture
            (:func:`contrastive_saliency.layers.case_layer`). Methods that explain the input (gradients,
            RISE) run once, under layer ``input``.
        targets: target policies (:mod:`callbacks.target_policies`).
        metrics: names or ``{name, label, kwargs}`` of registered metrics
            (:mod:`contrastive_saliency.metrics.registry`); each runs on the policies of its
            ``target_kind`` (pair metrics on ``top1_vs_top2``, ...).
        reference_method: label of the method every other is tested against in ``stats.csv``
            (default: the first method).
        reference_methods: several such labels (e.g. ``[grad_cam, edge]``): ``stats.csv`` has
            one row per (method, reference), Holm/BH-corrected over the whole table (instead
            of ``reference_method``; not both).
        agreement_threshold: Wilcoxon threshold for feature agreement (CASE paper 0.5, code 0.7).
        test_alternative: direction of each method's paired t-test against the reference
            method, by name (:data:`contrastive_saliency.stats.METHOD_ALTERNATIVES`): ``method_greater``,
            ``method_less`` or ``two_sided`` (default; CASE's code). CASE Eq. 9 with CASE as
            the reference is ``method_less``. ``stats.csv`` and ``report.md`` state H1 in words.
        correct_only: explain only correctly classified samples (CASE RQ2 protocol).
        sample_size / sample_seed: evaluate a fixed random sample of the test split
            (``evaluate.py`` restricts the loader: :func:`datamodules.test_subset.sample_test_split`).
        confusion_matrix: ``.npy``/``.csv`` for ``confusion`` selectors; default: the one the
            training run saved next to the checkpoint. ``evaluate.py`` computes one first (each
            sample once, also under DDP; saved as ``<run>/confusion_matrix.npy`` with its
            provenance) for ``validate``: on the datamodule's validation split, or
            ``holdout``: on a seeded per-class hold-out of the train split (pretrained models
            whose validation split is the explained one, e.g. ImageNet). A matrix computed on
            the explained split is refused (:mod:`callbacks.confusion_matrix`).
        confusion_holdout_per_class / confusion_holdout_seed: size (images per class, all of
            a smaller class) and seed of the ``holdout`` sample.
        perturbation_batch_size: images per forward pass of perturbation metrics.
        gallery_size: samples (the lowest indices) whose maps are drawn in ``gallery/``.
        sanity_check: cascading randomisation (Adebayo et al. 2018; VAR Fig. 6) on the first
            ``samples`` gallery samples (``null`` = off): ``{samples, measures, target,
            max_steps, seed, order, group_depth}`` (:func:`_check_sanity_options`).
        autocast: run methods and metrics under CUDA autocast (float16); CUDA only.
        every_n_epochs / validation_batches: evaluate during ``fit`` (off by default).
        title: study title for ``report.md``.
        output_dir: where results go (default: the trainer's ``default_root_dir``).
    """

    def __init__(
        self,
        methods: list[str | dict[str, Any]] | None = None,
        layers: list[str | None] | None = None,
        targets: list[str] | None = None,
        metrics: list[str | dict[str, Any]] | None = None,
        reference_method: str | None = None,
        reference_methods: list[str] | None = None,
        agreement_threshold: float = 0.5,
        test_alternative: str = "two_sided",
        correct_only: bool = False,
        sample_size: int | None = None,
        sample_seed: int = 0,
        confusion_matrix: str | None = None,
        confusion_holdout_per_class: int = 50,
        confusion_holdout_seed: int = 0,
        perturbation_batch_size: int = 256,
        gallery_size: int = 4,
        sanity_check: dict[str, Any] | None = None,
        autocast: bool = False,
        every_n_epochs: int | None = None,
        validation_batches: int = 1,
        title: str = "Saliency evaluation",
        output_dir: str | None = None,
    ) -> None:
        self.method_specs = parse_methods(methods or ["grad_cam"])
        self.layers = list(layers) if layers else [None]
        self.policies = parse_policies(list(targets or ["top1_vs_top2", "top1"]))
        self.metric_specs = parse_metrics(metrics or ["feature_agreement", "deletion_auc"])
        self.reference_methods = _reference_labels(
            reference_method, reference_methods, [spec.label for spec in self.method_specs]
        )
        self.reference_method = self.reference_methods[0]
        self._check_metric_policies()
        self.agreement_threshold = agreement_threshold
        try:
            method_alternative(test_alternative)
        except ValueError as error:
            raise ConfigurationError(f"evaluation.test_alternative: {error}") from None
        self.test_alternative = test_alternative
        self.correct_only = correct_only
        self.sample_size = sample_size
        self.sample_seed = sample_seed
        self.confusion_matrix = confusion_matrix
        if isinstance(confusion_holdout_per_class, bool) or confusion_holdout_per_class < 1:
            raise ConfigurationError(
                f"evaluation.confusion_holdout_per_class must be a positive number of train "
                f"images per class, got {confusion_holdout_per_class!r}"
            )
        self.confusion_holdout_per_class = confusion_holdout_per_class
        self.confusion_holdout_seed = confusion_holdout_seed
        self.perturbation_batch_size = perturbation_batch_size
        self.gallery_size = gallery_size
        self.sanity_check = _check_sanity_options(sanity_check, gallery_size)
        self.autocast = autocast
        self.every_n_epochs = every_n_epochs
        self.validation_batches = validation_batches
        self.title = title
        self.output_dir = output_dir
        self.combinations: list[_Combination] | None = None
        self._normalisation: tuple[Sequence[float], Sequence[float]] | None = None
        self.per_sample: pd.DataFrame | None = None
        self.summary: pd.DataFrame | None = None
        self.stats: pd.DataFrame | None = None
        self.curves: pd.DataFrame | None = None
        self.sanity: pd.DataFrame | None = None
        self.dataset_checks: dict[str, Any] = {}
        self.published: list[Path] = []

    # ----------------------------------------------------------------- configuration checks
    def _check_metric_policies(self) -> None:
        kinds = {policy.kind for policy in self.policies}
        for spec in self.metric_specs:
            wanted = metric_class(spec.name).target_kind
            if wanted not in kinds:
                valid = [name for name, p in POLICIES.items() if p.kind == wanted]
                raise ConfigurationError(
                    f"metric {spec.label!r} needs a target policy of kind "
                    f"{wanted} ({', '.join(valid)}), but evaluation.targets "
                    f"is {[p.name for p in self.policies]}"
                )

    def prepare(
        self,
        network: torch.nn.Module,
        sample: dict[str, Any],
        confusion_matrix: str | Path | np.ndarray | None = None,
        device_type: str = "cpu",
        normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        """Check the config against the model and the data and build every method — before
        any computation. ``sample`` is one dataset item (its keys say what the data has);
        ``confusion_matrix`` is the training run's matrix (``evaluation.confusion_matrix``
        wins); ``normalisation`` is the data's ``(mean, std)``, passed to every method with a
        ``normalisation`` option that the config leaves unset (CAAP's white blank)."""
        if self.autocast and device_type != "cuda":
            raise ConfigurationError(
                "evaluation.autocast needs a CUDA device (float16 autocast); the trainer runs on "
                f"{device_type}: drop --evaluation.autocast or use --trainer.accelerator gpu"
            )
        keys = set(sample)
        for policy in self.policies:
            _require_keys(
                keys, policy.needs, f"target policy {policy.name!r}",
                "use a grid datamodule (e.g. configs/data/quad_shapes.yaml) or drop the policy",
            )  # fmt: skip
        matrix = self.confusion_matrix or confusion_matrix
        if isinstance(matrix, str) and matrix in (
            CONFUSION_FROM_VALIDATION,
            CONFUSION_FROM_HOLDOUT,
        ):
            raise ConfigurationError(
                f"evaluation.confusion_matrix={matrix!r} is resolved by evaluate.py (it "
                f"computes the matrix first); call prepare() with the computed matrix"
            )
        if isinstance(matrix, (str, Path)) and not Path(matrix).is_file():
            raise ConfigurationError(f"confusion matrix not found: {matrix}")
        self._matrix = matrix
        self._normalisation = normalisation
        self.combinations = self._build(network, matrix)
        _check_sample_fields(self.metric_specs, self.method_specs, self.combinations, keys)
        self._sanity_order(network)  # a wrong layer name fails now, not after the evaluation

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
    def _columns(self, batch: dict[str, Any]) -> list[str]:
        columns: list[str] = []
        for policy in self.policies:
            columns += [c for c in policy.columns(batch) if c not in columns]
        return columns

    def _maps(
        self, combination: _Combination, images: torch.Tensor, classes: torch.Tensor,
        columns: list[str], batch: dict[str, Any],
    ) -> torch.Tensor:  # fmt: skip
        """All columns' maps ``[B, U, H, W]`` in one call; for a method that takes a class set
        per call (``per_call_class_set``: VAR), a grid's cells compete within their grid (the
        class set = the grid's classes), so they get their own call."""
        from contrastive_saliency.methods import method_factory

        grid = [i for i, c in enumerate(columns) if c.startswith("cell")]
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

    def new_metrics(self, device: torch.device) -> dict[tuple, RegisteredMetric]:
        """One registered metric per (method, layer, policy, metric label) whose target kind
        the policy has, in one fixed order (all processes gather their states in it)."""
        metrics: dict[tuple, RegisteredMetric] = {}
        for combination in self.combinations:
            for policy in self.policies:
                key = (combination.spec.label, combination.layer, policy.name)
                for spec in self.metric_specs:
                    if metric_class(spec.name).target_kind != policy.kind:
                        continue
                    metric = create_metric(
                        spec.name, **spec.kwargs, batch_size=self.perturbation_batch_size
                    )
                    metrics[(*key, spec.label)] = metric.to(device)
        return metrics

    def evaluate_batch(
        self,
        network: torch.nn.Module,
        batch: dict[str, Any],
        logits: torch.Tensor,
        metrics: dict[tuple, RegisteredMetric],
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
        self._batch_maps: dict[tuple[str, str], torch.Tensor] = {}
        autocast = (
            torch.autocast("cuda", dtype=torch.float16)
            if self.autocast
            else contextlib.nullcontext()
        )
        with autocast:
            for combination in self.combinations:
                maps = self._maps(combination, images, classes, columns, batch).float()
                self._batch_maps[(combination.spec.label, combination.layer)] = maps
                for policy in self.policies:
                    chosen = [columns.index(c) for c in policy.columns(batch)]
                    inputs = MetricInputs(
                        model=network, images=images, maps=maps[:, chosen],
                        classes=classes[:, chosen], logits=logits, batch=batch,
                    )  # fmt: skip
                    key = (combination.spec.label, combination.layer, policy.name)
                    for spec in self.metric_specs:
                        metric = metrics.get((*key, spec.label))
                        if metric is not None:
                            metric.update(**metric.update_arguments(inputs))
        self._batch_columns, self._batch_classes = columns, classes
        return batch

    # ------------------------------------------------------------------------------ test
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.combinations is None:  # not prepared by evaluate.py: do it now
            sample = trainer.test_dataloaders.dataset[0]
            self.prepare(
                pl_module.network, sample,
                getattr(pl_module, "confusion_matrix_path", None), pl_module.device.type,
                data_normalisation(getattr(trainer, "datamodule", None)),
            )  # fmt: skip
        device = pl_module.device
        self._metrics = self.new_metrics(device)
        self._predictions = PerSampleValues(row_shape=(5,)).to(device)
        self._contrast_counts = {
            (c.spec.label, c.layer, policy.name): PerSampleValues(row_shape=()).to(device)
            for c in self.combinations
            if c.counters
            for policy in self.policies
        }
        self._gallery_indices = set(first_test_indices(trainer.test_dataloaders, self.gallery_size))
        self._gallery: list[dict[str, Any]] = []
        if trainer.is_global_zero:
            directory = Path(self.output_dir or trainer.default_root_dir)
            self._staging = StagedResults(directory)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A failed evaluation leaves no staging directory behind."""
        staging = getattr(self, "_staging", None)
        if staging is not None:
            staging.discard()

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        logits = outputs["logits"].detach()
        indices = batch["index"]
        top2 = logits.topk(2, dim=1)
        probs = logits.softmax(dim=1).gather(1, top2.indices)
        self._predictions.update(
            torch.cat([batch["label"][:, None].float(), top2.indices.float(), probs], dim=1),
            indices,
        )
        used = self.evaluate_batch(pl_module.network, batch, logits, self._metrics)
        if used["index"].shape[0]:
            self._count_matrix_contrasts(used, pl_module.device)
            self._keep_gallery(used, logits if not self.correct_only else None, trainer)

    def _count_matrix_contrasts(self, batch: dict[str, Any], device: torch.device) -> None:
        """Per (method, layer, policy) with a confusion selector: how many contrasts of the
        explained classes came from the matrix (the fewest among a policy's classes)."""
        for combination in self.combinations:
            for policy in self.policies:
                key = (combination.spec.label, combination.layer, policy.name)
                if key not in self._contrast_counts:
                    continue
                chosen = [self._batch_columns.index(c) for c in policy.columns(batch)]
                counts = combination.contrasts_from_matrix(self._batch_classes[:, chosen])
                self._contrast_counts[key].update(counts.to(device), batch["index"])

    def _keep_gallery(self, batch, logits, trainer) -> None:
        wanted = [
            i for i, index in enumerate(batch["index"].tolist()) if index in self._gallery_indices
        ]
        if not wanted:
            return
        datamodule = trainer.datamodule
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        for row in wanted:
            maps = {
                (method, layer, column): self._batch_maps[(method, layer)][row, j].cpu()
                for (method, layer) in self._batch_maps
                for j, column in enumerate(self._batch_columns)
            }
            self._gallery.append(
                {
                    "index": int(batch["index"][row]),
                    "image": batch["image"][row].cpu(),
                    "pixels": _display_pixels(batch["image"][row].cpu(), mean, std),
                    "masks": {
                        k: batch[k][row].cpu()
                        for k in ("mask", "part_mask")
                        if k in batch and torch.is_tensor(batch[k])
                    },
                    "label": int(batch["label"][row]),
                    "maps": maps,
                    "fields": {name: batch[name][row].cpu() for name in self._method_fields()},
                }
            )

    def _method_fields(self) -> list[str]:
        """Every batch field some method of the run reads (kept for the sanity check)."""
        return sorted({name for c in self.combinations for name in c.batch_fields})

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # compute() gathers across processes: every rank calls it, in the same order.
        sample_index, predictions = (t.cpu() for t in self._predictions.compute())
        samples = pd.DataFrame(
            {
                "index": sample_index.numpy(),
                "label": predictions[:, 0].long().numpy(),
                "top1": predictions[:, 1].long().numpy(),
                "top2": predictions[:, 2].long().numpy(),
                "top1_prob": predictions[:, 3].numpy(),
            }
        )
        frames = []
        curves: dict[tuple, np.ndarray] = {}
        for (method, layer, policy, label), state in self._metrics.items():
            indices, columns = state.labelled_values(label)
            for metric, values in columns.items():
                frames.append(
                    pd.DataFrame(
                        {
                            "method": method,
                            "layer": layer,
                            "target_policy": policy,
                            "metric": metric,
                            "index": indices.cpu().numpy(),
                            "value": values.cpu().numpy(),
                        }
                    )
                )
            for curve in state.curves:  # the first metric of a curve kind gives its curve
                if (method, layer, policy, curve.kind) not in curves:
                    per_sample_curves = state.per_sample_curves()[1].cpu().numpy()
                    curves[(method, layer, policy, curve.kind)] = per_sample_curves
        gallery = _gather_objects(self._gallery)
        self.per_sample = self._with_contrast_counts(
            pd.concat(frames, ignore_index=True).merge(samples, on="index")
        )
        if self.per_sample.empty:
            raise ConfigurationError(_nothing_explained(len(samples), self.correct_only))
        self.dataset_checks = sibling_share(
            samples, getattr(trainer.datamodule, "sibling_classes", None)
        )
        self.summary = summarise(self.per_sample, self.agreement_threshold)
        self.stats = method_tests(
            self.per_sample, self.reference_methods, self.agreement_threshold,
            self.test_alternative,
        )  # fmt: skip
        self.curves = mean_curves(curves)
        if not trainer.is_global_zero:
            return
        gallery = sorted({g["index"]: g for g in gallery}.values(), key=lambda g: g["index"])
        self.sanity = self._run_sanity_check(pl_module, gallery)
        self._write_results(trainer, gallery)

    def _with_contrast_counts(self, per_sample: pd.DataFrame) -> pd.DataFrame:
        """``per_sample`` with the column ``contrasts_from_matrix`` (nullable int): filled for
        the rows of methods with a confusion selector, NA for the others. Gathered and
        de-duplicated by index like every per-sample value (collective: every rank calls it)."""
        keys = ["method", "layer", "target_policy", "index"]
        frames = []
        for (method, layer, policy), state in self._contrast_counts.items():
            indices, counts = (t.cpu() for t in state.compute())
            frame = pd.DataFrame({"index": indices.numpy(), CONTRASTS_FROM_MATRIX: counts.numpy()})
            frames.append(frame.assign(method=method, layer=layer, target_policy=policy))
        if not frames:
            return per_sample.assign(**{CONTRASTS_FROM_MATRIX: pd.NA}).astype(
                {CONTRASTS_FROM_MATRIX: "Int64"}
            )
        counts = pd.concat(frames, ignore_index=True).round({CONTRASTS_FROM_MATRIX: 0})
        merged = per_sample.merge(counts, on=keys, how="left")
        return merged.astype({CONTRASTS_FROM_MATRIX: "Int64"})

    # ---------------------------------------------------------------------- outputs, W&B
    def _sanity_order(self, network: torch.nn.Module) -> list[str] | None:
        """The sanity check's randomisation order (``None``: every parameterised layer), checked
        against ``network``."""
        if self.sanity_check is None:
            return None
        from contrastive_saliency.metrics.functional import (
            grouped_randomisation_order,
            resolve_randomisation_order,
        )

        order, depth = self.sanity_check["order"], self.sanity_check["group_depth"]
        if depth is not None:
            order = grouped_randomisation_order(network, depth)
        try:
            return resolve_randomisation_order(network, order)
        except (TypeError, ValueError) as error:
            raise ConfigurationError(f"evaluation.sanity_check.order: {error}") from error

    def _sanity_bases(self) -> dict[str, str]:
        """Label of each method → label of the line it shares a colour with: a wrapper's
        (``base_option``: VAR's ``base``) plain base method in this run (same name and
        ``base_kwargs``), else itself."""
        import inspect

        from contrastive_saliency.methods import method_factory

        bases = {}
        for spec in self.method_specs:
            bases[spec.label] = spec.label
            factory = method_factory(spec.name)
            option = getattr(factory, "base_option", None)
            if option is None:
                continue
            base = spec.kwargs.get(option, inspect.signature(factory).parameters[option].default)
            if not isinstance(base, str):
                continue
            wrapped = dict(spec.kwargs.get("base_kwargs") or {})
            plain = [s for s in self.method_specs if s.name == base]
            plain.sort(key=lambda s: dict(s.kwargs) != wrapped)  # same options first
            if plain:
                bases[spec.label] = plain[0].label
        return bases

    def _run_sanity_check(self, pl_module: L.LightningModule, gallery) -> pd.DataFrame | None:
        """Cascading randomisation of ``pl_module.network`` on the first gallery samples
        (:func:`callbacks.sanity_checks.randomisation_curves`), every method and layer of the
        run, all configured measures in one pass."""
        if self.sanity_check is None or not gallery:
            return None
        from callbacks.sanity_checks import randomisation_curves
        from contrastive_saliency.methods import create_method

        network = pl_module.network
        chosen = gallery[: self.sanity_check["samples"]]
        device = next(network.parameters()).device
        images = torch.stack([g["image"] for g in chosen]).to(device)
        fields = {
            name: torch.stack([g["fields"][name] for g in chosen]).to(device)
            for name in self._method_fields()
        }
        matrix = self._matrix

        def builder(combination: _Combination):
            kwargs = self._method_kwargs(combination.spec, matrix)
            layer = None if combination.layer == INPUT_LAYER else combination.layer
            bound = {name: fields[name] for name in combination.batch_fields}

            def build(model: torch.nn.Module):
                method = create_method(combination.spec.name, model, layer=layer, **kwargs)
                return lambda images, classes: method(images, classes, **bound)

            return build

        builders = {(c.spec.label, c.layer): builder(c) for c in self.combinations}
        curves = randomisation_curves(
            network, images, builders,
            measures=self.sanity_check["measures"], target=self.sanity_check["target"],
            order=self._sanity_order(network), max_steps=self.sanity_check["max_steps"],
            seed=self.sanity_check["seed"],
        )  # fmt: skip
        from contrastive_saliency.methods import method_factory

        wrappers = {
            spec.label: getattr(method_factory(spec.name), "base_option", None) is not None
            for spec in self.method_specs
        }
        source = getattr(pl_module, "source_name", None)
        architecture = type(network).__name__
        return curves.assign(
            base_method=curves["method"].map(self._sanity_bases()),
            wrapper=curves["method"].map(wrappers),
            model=f"{source} ({architecture})" if source else architecture,
        )

    def _write_results(self, trainer: L.Trainer, gallery: list[dict[str, Any]]) -> None:
        from callbacks.report import (
            GallerySample,
            agreement_histograms,
            gallery_grid,
            metric_summary,
            perturbation_curves,
            render_gallery,
            sanity_curves,
            write_report,
        )

        staging = self._staging.path
        self.per_sample.to_parquet(staging / "per_sample.parquet", index=False)
        self.summary.to_csv(staging / "summary.csv", index=False)
        self.stats.to_csv(staging / "stats.csv", index=False)
        self.curves.to_csv(staging / "curves.csv", index=False)
        if self.sanity is not None:
            self.sanity.to_csv(staging / "sanity_checks.csv", index=False)
        plots = staging / "plots"
        plots.mkdir()
        plot_paths = [
            *metric_summary(self.summary, plots),
            *agreement_histograms(self.per_sample, self.summary, plots),
            *perturbation_curves(self.curves, plots),
        ]
        if self.sanity is not None:
            plot_paths += sanity_curves(self.sanity, plots)
        samples = self.per_sample.drop_duplicates("index").set_index("index")
        class_names = getattr(trainer.datamodule, "class_names", None)
        gallery_samples = [
            GallerySample(
                index=g["index"],
                image=g["pixels"],
                masks=g["masks"],
                label=g["label"],
                top1=int(samples.loc[g["index"], "top1"]) if g["index"] in samples.index else -1,
                top2=int(samples.loc[g["index"], "top2"]) if g["index"] in samples.index else -1,
                class_names=list(class_names) if class_names else None,
                maps=g["maps"],
            )
            for g in gallery
        ]
        gallery_dir = staging / "gallery"
        gallery_dir.mkdir()
        gallery_paths = [
            *(
                gallery_grid(gallery_samples, gallery_dir, column=self._gallery_column(gallery))
                if gallery_samples
                else []
            ),
            *render_gallery(gallery_samples, gallery_dir),
        ]
        write_report(
            staging,
            title=self.title,
            run_info=self._run_info(trainer),
            summary=self.summary,
            stats=self.stats,
            plot_paths=plot_paths,
            gallery_paths=gallery_paths,
            notes=self._notes(),
        )
        self.published = self._staging.publish(
            {"dataset_checks": self.dataset_checks} if self.dataset_checks else None
        )
        run_dir = self._staging.run_dir
        self._log_wandb(
            trainer,
            [run_dir / p.relative_to(staging) for p in plot_paths],
            [run_dir / p.relative_to(staging) for p in gallery_paths],
        )

    @staticmethod
    def _gallery_column(gallery: list[dict[str, Any]]) -> str:
        """The overview shows the first explained column: ``top1``, else e.g. ``cell0``."""
        columns = [column for _, _, column in gallery[0]["maps"]]
        return "top1" if "top1" in columns else columns[0]

    def _run_info(self, trainer: L.Trainer) -> dict[str, str]:
        module = trainer.lightning_module
        source = getattr(module, "checkpoint_path", None) or getattr(module, "source_name", "")
        info = {
            "model": str(source),
            "data": type(trainer.datamodule).__name__,
            "samples": str(self.per_sample["index"].nunique()),
            "methods": ", ".join(s.label for s in self.method_specs),
            "layers": ", ".join(sorted({c.layer for c in self.combinations})),
            "target policies": ", ".join(p.name for p in self.policies),
            "devices": f"{trainer.world_size} ({trainer.strategy.__class__.__name__})",
            "reference methods": ", ".join(self.reference_methods),
        }
        if self.dataset_checks:
            checks = self.dataset_checks
            info["top-2 = sibling (correctly classified)"] = describe_sibling_share(checks)
        return info

    def _reference_word(self) -> str:
        return self.reference_method if len(self.reference_methods) == 1 else "reference"

    def _notes(self) -> list[str]:
        notes = [
            f"Feature agreement: one-sided Wilcoxon signed-rank test of H1: median < "
            f"{self.agreement_threshold} (CASE Eq. 8).",
            f"stats.csv: paired t-tests of each method against "
            f"{' and '.join(repr(r) for r in self.reference_methods)} on the same samples, "
            f"test_alternative {self.test_alternative}: "
            f"{hypothesis_text(self.test_alternative, 'method', self._reference_word())} "
            f"(per row in the column hypothesis); Cohen's d_z, Holm and BH corrections over the "
            f"whole table.",
        ]
        if self.correct_only:
            notes.append("Only correctly classified samples were explained.")
        return notes + self._contrast_notes()

    def _contrast_notes(self) -> list[str]:
        """One line per method with a confusion selector: how often the matrix gave all k."""
        notes = []
        for combination in self.combinations:
            if not combination.counters:
                continue
            selector = combination.counters[0]
            rows = self.per_sample[
                (self.per_sample["method"] == combination.spec.label)
                & (self.per_sample["layer"] == combination.layer)
            ].drop_duplicates(["target_policy", "index"])[CONTRASTS_FROM_MATRIX]
            if rows.empty:
                continue
            notes.append(
                f"{combination.spec.label} ({combination.layer}): all k={selector.k} contrasts "
                f"came from the confusion matrix for {rows.eq(selector.k).mean():.0%} of the "
                f"explained samples (mean {rows.mean():.2f}); the rest from fallback "
                f"{selector.fallback!r} (per sample: per_sample.parquet {CONTRASTS_FROM_MATRIX})."
            )
        return notes

    def _log_wandb(self, trainer: L.Trainer, plot_paths, gallery_paths) -> None:
        for run in wandb_runs(trainer):
            try:
                _log_to_run(run, self, plot_paths, gallery_paths)
            except Exception as error:  # the results are on disk already
                log.warning(
                    "W&B logging failed (%s: %s); every result is in %s",
                    type(error).__name__, error, self._staging.run_dir,
                )  # fmt: skip

    # --------------------------------------------------------------------- during training
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._watch = self._watching(trainer)
        if self._watch and self.combinations is None:
            sample = trainer.val_dataloaders.dataset[0]
            self.prepare(
                pl_module.model, sample, None, pl_module.device.type,
                data_normalisation(getattr(trainer, "datamodule", None)),
            )  # fmt: skip
        self._watched = self.new_metrics(pl_module.device) if self._watch else {}

    def _watching(self, trainer: L.Trainer) -> bool:
        return (
            self.every_n_epochs is not None
            and trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not self._watch or batch_idx >= self.validation_batches:
            return
        network = pl_module.model
        with torch.no_grad():
            logits = network(batch["image"])
        self.evaluate_batch(network, batch, logits, self._watched)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._watch:
            return
        for (method, layer, policy, label), state in self._watched.items():
            _, columns = state.labelled_values(label, sync=False)  # this process's samples
            for metric, values in columns.items():
                if not values.numel():
                    continue
                name = f"eval/{method}/{metric}"
                if len(self.layers) > 1 or len(self.policies) > 1:
                    name = f"eval/{method}/{layer}/{policy}/{metric}"
                pl_module.log(name, values.mean(), sync_dist=True)


def _require_keys(keys: set[str], needed: Sequence[str], what: str, advice: str) -> None:
    """A :class:`ConfigurationError` naming ``what`` and the fields of ``needed`` that the
    dataset's samples (``keys``) lack."""
    missing = [k for k in needed if k not in keys]
    if missing:
        raise ConfigurationError(
            f"{what} needs {missing} in each sample, but the dataset gives only "
            f"{sorted(keys)}; {advice}"
        )


def _reference_labels(
    single: str | None, several: list[str] | None, labels: list[str]
) -> list[str]:
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


def _check_sanity_options(
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
    from callbacks.sanity_checks import MEASURES, TARGETS, check_measures

    defaults = {
        "samples": 4, "measures": list(MEASURES), "target": "randomised_argmax",
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


def _display_pixels(image: torch.Tensor, mean, std) -> torch.Tensor:
    """A normalised ``[3, H, W]`` image back in [0, 1] with the datamodule's mean/std; a
    datamodule that declares none gets its image min-max scaled for display."""
    if mean is None or std is None:
        low, high = image.min(), image.max()
        return (image - low) / (high - low) if high > low else torch.zeros_like(image)
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image * std + mean).clamp(0, 1)


def _select(value: Any, rows: torch.Tensor) -> Any:
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows.shape[0]:
        return value[rows.to(value.device)]
    return value


def _nothing_explained(evaluated: int, correct_only: bool) -> str:
    """Why an evaluation has no value to report, and what to change."""
    if correct_only and evaluated:
        return (
            f"nothing was explained: evaluation.correct_only is true and the model classified "
            f"none of the {evaluated} evaluated test samples correctly (an untrained or "
            f"randomly initialised model?); evaluate a trained model, or pass "
            f"--evaluation.correct_only false"
        )
    return (
        f"nothing was explained: the evaluation saw {evaluated} test samples; check the "
        f"dataset's test split and evaluation.sample_size"
    )


def _gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a list from every process (the gallery: a few samples)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(items)
    gathered: list[list[Any] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]


def wandb_key(method: str, layer: str, policy: str, metric: str, unique: bool) -> str:
    """``eval/<method>/<metric>``, with layer and policy when the method has several."""
    if unique:
        return f"eval/{method}/{metric}"
    return f"eval/{method}/{layer}/{policy}/{metric}"


def _log_to_run(run, callback: SaliencyEvaluationCallback, plot_paths, gallery_paths) -> None:
    import wandb

    summary = callback.summary
    combos = summary.groupby(["method", "metric"]).size()
    for row in summary.itertuples():
        unique = combos[(row.method, row.metric)] == 1
        key = wandb_key(row.method, row.layer, row.target_policy, row.metric, unique)
        run.summary[key] = row.mean
        if not math.isnan(row.wilcoxon_p):
            run.summary[f"{key}_wilcoxon_p"] = row.wilcoxon_p
    run.config.update(
        {
            "evaluation": {
                "methods": [
                    {"name": s.name, "label": s.label, "kwargs": dict(s.kwargs)}
                    for s in callback.method_specs
                ],
                "layers": sorted({c.layer for c in callback.combinations}),
                "targets": [p.name for p in callback.policies],
                "metrics": [
                    {"name": s.name, "label": s.label, "kwargs": dict(s.kwargs)}
                    for s in callback.metric_specs
                ],
                "reference_method": callback.reference_method,
                "reference_methods": list(callback.reference_methods),
                "agreement_threshold": callback.agreement_threshold,
            }
        },
        allow_val_change=True,
    )
    per_sample = callback.per_sample.astype(
        {"value": np.float64, CONTRASTS_FROM_MATRIX: np.float64}
    )
    run.log(
        {
            "eval/summary_table": wandb.Table(dataframe=summary),
            "eval/per_sample_table": wandb.Table(dataframe=per_sample),
            "eval/stats_table": wandb.Table(dataframe=callback.stats),
            **{f"eval/plots/{p.stem}": wandb.Image(str(p)) for p in plot_paths},
            **{f"eval/gallery/{p.stem}": wandb.Image(str(p)) for p in gallery_paths},
        }
    )


def _check_sample_fields(
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
