"""CAAP layer-cutoff and selection-operator sweeps (``caap.md`` Sec. 4.4: Fig. 7, the
cumulative intervention-depth sweep, and Fig. 5, the selection-operator ablation).

On every test batch the top-1 class is explained by CAAP (parallel form, Sec. 3.3.1) once per
variant, all samples of the batch in one call:

- cutoff sweep (Fig. 7): layers ``first … L'`` intervened for each cutoff ``L'`` (``None``: every
  ``L'`` from ``first`` to the depth L), with the default operator;
- operator sweep (Fig. 5): each selection operator (``none`` = no padding, ``box1`` = radius-1
  box, the default, ``box2`` = radius-2 box, ``manhattan`` = radius-1 Manhattan) at the
  default cutoff ⌈2L/3⌉.

A variant in both sweeps (the default operator at ⌈2L/3⌉) is computed once. Each map is scored
with the registered metrics of :mod:`contrastive_saliency.metrics.registry` (one metric object per variant
and metric; the deletion and insertion curves behind Ins−Del are shared through the per-batch
cache of each variant): by default those of the paper's figures, insertion and deletion AUC,
Ins−Del, pointing game and AUPR₁/AUPR₀ against the object mask. Per-sample values are kept with
the sample ``index``, gathered from every process and de-duplicated by index (exactly once
under DDP). Titles, directions (the cutoff sweep's best variant) and families (the figure's
panels) are the metric classes'. Rank zero publishes ``cutoff_sweep.csv`` and ``operator_sweep.csv`` (mean, 95 %
t-interval, n), ``per_sample.csv`` and the plots ``cutoff_sweep.png`` / ``operator_sweep.png``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, NamedTuple

import lightning as L
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from callbacks.evaluation.spec import MetricSpec, parse_metrics
from callbacks.explained_model import (
    data_normalisation,
    explained_network,
    first_test_indices,
    model_description,
)
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods.caap import CAAP, SELECTIONS, check_layers
from contrastive_saliency.metrics.registry import (
    FAMILIES,
    MetricInputs,
    RegisteredMetric,
    create_metric,
    describe_value,
    metric_class,
)
from contrastive_saliency.stats import mean_confidence_interval

log = logging.getLogger(__name__)

DEFAULT_METRICS: list[str | dict[str, Any]] = [
    "insertion_auc",
    "deletion_auc",
    "insertion_minus_deletion",
    "pointing_game",
    "aupr",
]
OPERATOR_NAMES = {
    "none": "no padding",
    "box1": "radius-1 box (3×3)",
    "box2": "radius-2 box (5×5)",
    "manhattan": "radius-1 Manhattan",
}
_RESERVED = ("mode", "selection", "layers", "layer")


class Variant(NamedTuple):
    """One CAAP configuration of a sweep: patch layers ``first_layer..cutoff`` with the
    neighbourhood ``operator`` (Sec. 3.2)."""

    first_layer: int
    cutoff: int
    operator: str


class SweepMetric(NamedTuple):
    """The key of one metric object of a sweep: a variant and a configured metric label."""

    variant: Variant
    label: str


class CAAPSweepCallback(L.Callback):
    """CAAP maps per layer cutoff (Fig. 7) and per selection operator (Fig. 5), scored.

    Args:
        cutoffs: the last intervened layers ``L'`` of the cutoff sweep (layers ``first_layer …
            L'`` are patched); ``None``: every ``L'`` from ``first_layer`` to the depth.
        operators: selection operators of the operator sweep (of ``none``, ``box1``,
            ``box2``, ``manhattan``).
        metrics: names or ``{name, label, kwargs}`` of single-map evaluation metrics
            (:mod:`contrastive_saliency.metrics.registry`).
        first_layer: the first intervened layer ``l_s`` (paper: 1, "from the first block").
        default_operator: the operator of the cutoff sweep (paper default ``box1``).
        samples: sweep only the ``samples`` lowest sample indices of the test split
            (``None``: all the samples ``evaluate.py`` loads).
        missing_annotations: what to do with a metric whose annotation (e.g. ``mask``) the
            dataset lacks: ``error`` (default) or ``skip`` it with a warning (e.g. ImageNet
            without ImageNet-S masks: the faithfulness metrics still run).
        caap_kwargs: further :class:`~contrastive_saliency.methods.caap.CAAP` options (``blank``,
            ``patch_batch_size``, ``precompute_blank``, ``blank_prototype``,
            ``normalisation``: default the datamodule's); the mode is always ``parallel`` and
            the layers / selection come from the sweep.
        perturbation_batch_size: images per forward of the deletion / insertion curves.
        name: the analysis directory ``<run_dir>/analyses/<name>/`` and W&B prefix.
    """

    def __init__(
        self,
        cutoffs: list[int] | None = None,
        operators: list[str] | None = None,
        metrics: list[str | dict[str, Any]] | None = None,
        first_layer: int = 1,
        default_operator: str = "box1",
        samples: int | None = None,
        missing_annotations: Literal["error", "skip"] = "error",
        caap_kwargs: dict[str, Any] | None = None,
        perturbation_batch_size: int = 256,
        name: str = "caap_sweeps",
    ) -> None:
        operators = list(operators) if operators is not None else list(SELECTIONS)
        for operator in [*operators, default_operator]:
            if operator not in SELECTIONS:
                raise ConfigurationError(
                    f"unknown CAAP selection operator {operator!r}; use one of "
                    f"{', '.join(SELECTIONS)} (caap.md Fig. 5)"
                )
        if not operators or len(set(operators)) != len(operators):
            raise ConfigurationError(
                f"operators must list distinct selection operators, got {operators}"
            )
        if isinstance(first_layer, bool) or not isinstance(first_layer, int) or first_layer < 0:
            raise ConfigurationError(
                f"first_layer must be a layer index >= 0 (h^0 = the embedding), got {first_layer!r}"
            )
        if cutoffs is not None:
            bad = [c for c in cutoffs if isinstance(c, bool) or not isinstance(c, int)]
            if bad or not cutoffs or len(set(cutoffs)) != len(cutoffs):
                raise ConfigurationError(
                    f"cutoffs must be distinct integer layer indices (or null: all), got "
                    f"{cutoffs!r}"
                )
            low = [c for c in cutoffs if c < first_layer]
            if low:
                raise ConfigurationError(
                    f"cutoffs {low} lie below first_layer = {first_layer}: a cutoff is the last "
                    f"intervened layer of first_layer … cutoff"
                )
        if samples is not None and (isinstance(samples, bool) or samples < 1):
            raise ConfigurationError(
                f"samples must be a positive number of test samples or null (all), got {samples!r}"
            )
        if missing_annotations not in ("error", "skip"):
            raise ConfigurationError(
                f"missing_annotations must be 'error' or 'skip', got {missing_annotations!r}"
            )
        extra = dict(caap_kwargs or {})
        reserved = sorted(set(extra) & set(_RESERVED))
        if reserved:
            raise ConfigurationError(
                f"caap_kwargs may not set {reserved}: the sweep chooses the layers and the "
                f"selection, and always runs the parallel form"
            )
        self.metric_specs = parse_metrics(metrics if metrics is not None else DEFAULT_METRICS)
        not_single = [
            s.label for s in self.metric_specs if metric_class(s.name).target_kind != "single"
        ]
        if not_single:
            raise ConfigurationError(
                f"metrics {not_single} do not score one map per sample; the CAAP sweeps explain "
                f"the top-1 class with one map"
            )
        self.cutoffs = sorted(cutoffs) if cutoffs is not None else None
        self.operators = operators
        self.first_layer = first_layer
        self.default_operator = default_operator
        self.samples = samples
        self.missing_annotations = missing_annotations
        self.caap_kwargs = extra
        self.perturbation_batch_size = perturbation_batch_size
        self.name = name
        self.per_sample: pd.DataFrame | None = None
        self.tables: dict[str, pd.DataFrame] = {}

    # ------------------------------------------------------------------------------ setup
    def variants(self, depth: int) -> tuple[list[Variant], list[Variant]]:
        """``(cutoff sweep, operator sweep)`` variants ``(first, last, operator)`` for a ViT
        of ``depth`` blocks; a cutoff above the depth is an error naming it."""
        cutoffs = self.cutoffs or list(range(max(self.first_layer, 1), depth + 1))
        high = [c for c in cutoffs if c > depth]
        if high:
            raise ConfigurationError(
                f"CAAP cutoffs {high} exceed the model's depth L = {depth} (it has {depth} "
                f"transformer blocks); use cutoffs in {self.first_layer}..{depth} or null (all)"
            )
        default_cutoff = check_layers(None, depth)[1]  # ⌈2L/3⌉ (Sec. 3.2)
        if default_cutoff < self.first_layer:
            raise ConfigurationError(
                f"first_layer = {self.first_layer} lies above the default cutoff "
                f"⌈2L/3⌉ = {default_cutoff} of this {depth}-block model"
            )
        by_cutoff = [Variant(self.first_layer, c, self.default_operator) for c in cutoffs]
        by_operator = [Variant(self.first_layer, default_cutoff, op) for op in self.operators]
        return by_cutoff, by_operator

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        network = explained_network(pl_module)
        kwargs = dict(self.caap_kwargs)
        # the data's mean/std place a white / black blank in the images' normalised space
        normalisation = data_normalisation(getattr(trainer, "datamodule", None))
        if normalisation is not None:
            kwargs.setdefault("normalisation", normalisation)
        probe = CAAP(network, mode="parallel", **kwargs)  # checks the ViT and kwargs
        self.depth = len(probe.vit.blocks)
        self.default_cutoff = check_layers(None, self.depth)[1]
        self._by_cutoff, self._by_operator = self.variants(self.depth)
        unique = list(dict.fromkeys([*self._by_cutoff, *self._by_operator]))
        self._methods = {
            v: CAAP(
                network,
                mode="parallel",
                selection=v.operator,
                layers=(v.first_layer, v.cutoff),
                **kwargs,
            )
            for v in unique
        }
        self._active_specs = self._applicable_metrics(_first_sample(trainer.test_dataloaders))
        self._value_names = [
            (spec, name)
            for spec in self._active_specs
            for name in metric_class(spec.name).labelled_names(spec.label)
        ]
        self._model_name = model_description(pl_module, network)
        self._wanted = (
            None
            if self.samples is None
            else set(first_test_indices(trainer.test_dataloaders, self.samples))
        )
        device = pl_module.device
        self._metrics = {
            SweepMetric(v, spec.label): create_metric(
                spec.name, **spec.kwargs, batch_size=self.perturbation_batch_size
            ).to(device)
            for v in unique
            for spec in self._active_specs
        }

    def _applicable_metrics(self, sample: dict[str, Any]) -> list[MetricSpec]:
        active = []
        for spec in self.metric_specs:
            missing = [
                k for k in metric_class(spec.name).needed_keys(spec.kwargs) if k not in sample
            ]
            if not missing:
                active.append(spec)
                continue
            message = (
                f"metric {spec.label!r} needs {missing} in each sample, but the dataset gives "
                f"only {sorted(sample)}"
            )
            if self.missing_annotations == "error":
                raise ConfigurationError(
                    f"{message}; drop the metric, use annotated data (e.g. ImageNet-S masks: "
                    f"data.init_args.imagenet_s_root) or set missing_annotations: skip"
                )
            log.warning("CAAP sweeps: %s; skipped", message)
        if not active:
            raise ConfigurationError(
                "no CAAP sweep metric can be computed on this dataset; list a faithfulness "
                "metric (insertion_auc, deletion_auc, insertion_minus_deletion)"
            )
        return active

    # ------------------------------------------------------------------------- per batch
    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        network = explained_network(pl_module)
        images, index = batch["image"], batch["index"]
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if logits is None:
            with torch.no_grad():
                logits = network(images)
        logits = logits.detach()
        if self._wanted is not None:
            keep = torch.tensor([int(i) in self._wanted for i in index.tolist()], dtype=torch.bool)
            if not bool(keep.any()):
                return
            batch = {
                k: v[keep.to(v.device)] if torch.is_tensor(v) and v.dim() > 0 and
                v.shape[0] == keep.shape[0] else v
                for k, v in batch.items()
            }  # fmt: skip
            images, index, logits = batch["image"], batch["index"], logits[keep.to(logits.device)]
        self.score_batch(network, images, logits, batch)

    def score_batch(
        self,
        network: nn.Module,
        images: torch.Tensor,
        logits: torch.Tensor,
        batch: dict[str, Any],
    ) -> None:
        """Per variant: the CAAP map of each image's top-1 class (one call for the batch),
        scored by every active metric of the variant."""
        classes = logits.argmax(dim=1, keepdim=True)
        for variant, method in self._methods.items():
            maps = method(images, classes)
            inputs = MetricInputs(
                model=network, images=images, maps=maps, classes=classes, logits=logits,
                batch=batch, explain=lambda x, c, rows, method=method: method(x, c),
            )  # fmt: skip
            for spec in self._active_specs:
                metric = self._metrics[SweepMetric(variant, spec.label)]
                metric.update(**metric.update_arguments(inputs))

    # ------------------------------------------------------------------------ at the end
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        frames = []
        # compute() gathers across processes: every rank calls it, in the same order.
        for (variant, label), state in self._metrics.items():
            indices, columns = state.labelled_values(label)
            for name, values in columns.items():
                frames.append(
                    pd.DataFrame(
                        {
                            "first_layer": variant.first_layer,
                            "cutoff": variant.cutoff,
                            "operator": variant.operator,
                            "metric": name,
                            "index": indices.cpu().numpy(),
                            "value": values.cpu().double().numpy(),
                        }
                    )
                )
        self.per_sample = pd.concat(frames, ignore_index=True)
        if self.per_sample.empty:
            raise ConfigurationError(
                "the CAAP sweeps saw no test sample; give evaluate.py test data (and a samples "
                "count that selects some)"
            )
        self.tables = self._tables()
        if trainer.is_global_zero:
            from callbacks.analyses.outputs import publish_analysis

            publish_analysis(trainer, self.name, self.tables, self._figures(), self._summary())

    def _tables(self) -> dict[str, pd.DataFrame]:
        metric_order = [name for _, name in self._value_names]
        cutoff = _summarise(self.per_sample, self._by_cutoff, metric_order)
        cutoff["default_cutoff"] = cutoff["cutoff"] == self.default_cutoff
        operator = _summarise(self.per_sample, self._by_operator, metric_order)
        operator["default_operator"] = operator["operator"] == self.default_operator
        return {
            "cutoff_sweep": cutoff,
            "operator_sweep": operator,
            "per_sample": self.per_sample,
        }

    def _summary(self) -> dict[str, float]:
        summary: dict[str, float] = {"depth": float(self.depth)}
        cutoff = self.tables["cutoff_sweep"]
        described = describe_values(self._active_specs)
        for metric, rows in cutoff.groupby("metric", sort=False):
            higher = described[metric][0].higher_is_better
            best = rows.loc[rows["mean"].idxmax() if higher else rows["mean"].idxmin()]
            summary[f"cutoff/{metric}/best_cutoff"] = float(best["cutoff"])
            summary[f"cutoff/{metric}/best_mean"] = float(best["mean"])
        for row in self.tables["operator_sweep"].itertuples():
            summary[f"operator/{row.operator}/{row.metric}"] = float(row.mean)
        return summary

    def _figures(self) -> dict[str, Figure]:
        described = describe_values(self._active_specs)
        return {
            "cutoff_sweep": build_cutoff_figure(
                self.tables["cutoff_sweep"],
                self._model_name,
                self.depth,
                self.default_cutoff,
                described,
            ),
            "operator_sweep": build_operator_figure(
                self.tables["operator_sweep"], self._model_name, self.depth, described
            ),
        }


# ------------------------------------------------------------------------------------- tables

SWEEP_COLUMNS = [
    "first_layer", "cutoff", "operator", "metric", "n", "mean", "sd", "ci_low", "ci_high",
]  # fmt: skip


def _summarise(
    per_sample: pd.DataFrame, variants: list[Variant], metrics: list[str]
) -> pd.DataFrame:
    """Mean, sd, 95 % t-interval and n per (variant, metric), in sweep order."""
    rows = []
    for first, last, operator in variants:
        chosen = per_sample[
            (per_sample["first_layer"] == first)
            & (per_sample["cutoff"] == last)
            & (per_sample["operator"] == operator)
        ]
        for metric in metrics:
            values = chosen.loc[chosen["metric"] == metric, "value"].to_numpy(np.float64)
            values = values[np.isfinite(values)]
            ci_low, ci_high = mean_confidence_interval(values)
            rows.append(
                {
                    "first_layer": first,
                    "cutoff": last,
                    "operator": operator,
                    "metric": metric,
                    "n": int(values.size),
                    "mean": float(values.mean()) if values.size else math.nan,
                    "sd": float(values.std(ddof=1)) if values.size > 1 else math.nan,
                    "ci_low": ci_low,
                    "ci_high": ci_high,
                }
            )
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


Described = dict[str, tuple[type[RegisteredMetric], str]]
"""Value name → (its metric class, its title), for the configured labels of a sweep."""


def describe_values(specs: list[MetricSpec]) -> Described:
    """Each value name of ``specs`` → its metric class and title (a custom label is named in
    the title: ``confidence drop (drop_10)``)."""
    described: Described = {}
    for spec in specs:
        cls = metric_class(spec.name)
        for suffix, title in cls.outputs.items():
            name = spec.label + suffix
            described[name] = (cls, title if spec.label == spec.name else f"{title} ({name})")
    return described


def _described(metric: str, known: Described | None) -> tuple[type[RegisteredMetric], str] | None:
    return (known or {}).get(metric) or describe_value(metric)


def _family(metric: str, known: Described | None = None) -> str:
    """The family of a value name as its metric class declares (``faithfulness``,
    ``localisation``, ``robustness``, ...); ``localisation`` for an unknown name."""
    described = _described(metric, known)
    return described[0].family if described else "localisation"


def _value_text(metric: str, known: Described | None = None) -> tuple[str, str]:
    """``(title, ↑ or ↓)`` of a value name from its metric class (``known``: the sweep's
    configured labels; else a registered value name or a label that starts with one)."""
    described = _described(metric, known)
    if described is None:
        return metric, ""
    cls, title = described
    return title, "↑" if cls.higher_is_better else "↓"


# -------------------------------------------------------------------------------------- plots


def build_cutoff_figure(
    table: pd.DataFrame, model: str, depth: int, default_cutoff: int, known: Described | None = None
) -> Figure:
    """CAAP Fig. 7: each metric's mean (95 % CI band) vs the last intervened layer, the default
    ⌈2L/3⌉ marked; faithfulness (the figure's metrics) and localisation in separate panels."""
    metrics = list(dict.fromkeys(table["metric"]))
    families = {family: [m for m in metrics if _family(m, known) == family] for family in FAMILIES}
    families = {family: chosen for family, chosen in families.items() if chosen}
    figure = Figure(figsize=(9.0, 3.4 * len(families) + 1.0), layout="constrained")
    axes = figure.subplots(len(families), 1, sharex=True, squeeze=False)[:, 0]
    first = int(table["first_layer"].iloc[0])
    for ax, (family, chosen) in zip(axes, families.items(), strict=True):
        for metric in chosen:
            rows = table[table["metric"] == metric].sort_values("cutoff")
            x = rows["cutoff"].to_numpy()
            label, better = _value_text(metric, known)
            (line,) = ax.plot(x, rows["mean"].to_numpy(), marker="o", label=f"{label} ({better})")
            low, high = rows["ci_low"].to_numpy(), rows["ci_high"].to_numpy()
            if np.isfinite(low).any():
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.18, linewidth=0)
        ax.axvline(
            default_cutoff, color="black", linestyle="--", linewidth=1,
            label=f"default cutoff ⌈2L/3⌉ = {default_cutoff}",
        )  # fmt: skip
        if (table.loc[table["metric"].isin(chosen), "mean"] < 0).any():
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_ylabel(f"{family} metric\n(AUC / fraction / AP)")
        ax.grid(alpha=0.3)
        ax.legend(
            fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title_fontsize=8,
            title=f"{family} (↑ / ↓ = higher /\nlower is better);\nband = 95 % CI",
        )  # fmt: skip
    axes[-1].set_xticks(sorted(table["cutoff"].unique()))
    axes[-1].set_xlabel(f"last intervened layer L' (blocks {first}…L' patched, of L = {depth})")
    operator = str(table["operator"].iloc[0])
    axes[0].set_title(
        f"CAAP intervention-depth sweep (caap.md Fig. 7) — {model}\n"
        f"selection {OPERATOR_NAMES[operator]}, top-1 class, n = {int(table['n'].max())} images",
        fontsize=10,
    )
    return figure


def build_operator_figure(
    table: pd.DataFrame, model: str, depth: int, known: Described | None = None
) -> Figure:
    """CAAP Fig. 5: each metric's mean per selection operator (bars, 95 % CI whiskers)."""
    metrics = list(dict.fromkeys(table["metric"]))
    operators = list(dict.fromkeys(table["operator"]))
    width = 0.8 / len(operators)
    figure = Figure(figsize=(max(7.0, 1.5 * len(metrics) + 2.5), 5.6), layout="constrained")
    ax = figure.subplots()
    for position, operator in enumerate(operators):
        rows = table[table["operator"] == operator].set_index("metric").loc[metrics]
        x = np.arange(len(metrics)) + (position - (len(operators) - 1) / 2) * width
        mean = rows["mean"].to_numpy(np.float64)
        error = np.stack([mean - rows["ci_low"].to_numpy(), rows["ci_high"].to_numpy() - mean])
        default = bool(rows["default_operator"].iloc[0]) if "default_operator" in rows else False
        ax.bar(
            x, mean, width, yerr=np.nan_to_num(error), capsize=3,
            label=f"{OPERATOR_NAMES[operator]}{' (default)' if default else ''}",
        )  # fmt: skip
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(np.arange(len(metrics)))
    texts = [_value_text(m, known) for m in metrics]
    ax.set_xticklabels([f"{title} {arrow}" for title, arrow in texts], rotation=15)
    ax.set_xlabel("metric (↑ / ↓ = higher / lower is better)")
    ax.set_ylabel("mean metric value (AUC / fraction / average precision)")
    ax.grid(axis="y", alpha=0.3)
    figure.legend(
        fontsize=8, loc="outside lower center", ncols=min(4, len(operators)), title_fontsize=8,
        title="selection operator S(p); whiskers = 95 % CI",
    )  # fmt: skip
    first, cutoff = int(table["first_layer"].iloc[0]), int(table["cutoff"].iloc[0])
    ax.set_title(
        f"CAAP selection-operator ablation (caap.md Fig. 5) — {model}\n"
        f"layers {first}…{cutoff} of {depth} intervened, top-1 class, "
        f"n = {int(table['n'].max())} images",
        fontsize=10,
    )
    return figure


# ------------------------------------------------------------------------------------ helpers


def _loader(dataloaders: Any) -> Any:
    return dataloaders[0] if isinstance(dataloaders, list | tuple) else dataloaders


def _first_sample(dataloaders: Any) -> dict[str, Any]:
    return _loader(dataloaders).dataset[0]
