"""Logging an evaluation's results to every W&B run of the trainer: the summary means (under
:func:`wandb_keys`, the names the callback also logs its means under while a model trains),
the config, the tables, plots and gallery."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from callbacks.evaluation.engine import CONTRASTS_FROM_MATRIX
from callbacks.evaluation.keys import MetricKey, value_keys
from lightning_modules.wandb_runs import wandb_runs

log = logging.getLogger(__name__)


def log_wandb(callback: Any, trainer: Any, plot_paths, gallery_paths) -> None:
    """Log ``callback``'s results to every W&B run of ``trainer``; a failure only warns (the
    results are on disk already)."""
    for run in wandb_runs(trainer):
        try:
            log_to_run(run, callback, plot_paths, gallery_paths)
        except Exception as error:  # the results are on disk already
            log.warning(
                "W&B logging failed (%s: %s); every result is in %s",
                type(error).__name__, error, callback._staging.run_dir,
            )  # fmt: skip


def wandb_key(key: MetricKey, unique: bool) -> str:
    """``eval/<method>/<metric>`` when ``unique``, else
    ``eval/<method>/<layer>/<target_policy>/<metric>``."""
    if unique:
        return f"eval/{key.method}/{key.metric}"
    return f"eval/{key.method}/{key.layer}/{key.target_policy}/{key.metric}"


def wandb_keys(values: Iterable[MetricKey]) -> dict[MetricKey, str]:
    """The W&B name of each value of a run (:func:`callbacks.evaluation.keys.value_keys`), the
    one rule of the evaluation's summary and of the means logged while training: a method's
    metric is ``eval/<method>/<metric>`` when the run has it at one (layer, target policy)
    only, else ``eval/<method>/<layer>/<target_policy>/<metric>``."""
    values = list(values)
    count = Counter((key.method, key.metric) for key in values)
    return {key: wandb_key(key, count[(key.method, key.metric)] == 1) for key in values}


def log_to_run(run, callback: Any, plot_paths, gallery_paths) -> None:
    import wandb

    summary = callback.summary
    names = wandb_keys(value_keys(callback._metrics))
    for row in summary.itertuples():
        key = names[MetricKey(row.method, row.layer, row.target_policy, row.metric)]
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
