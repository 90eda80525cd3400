"""Where the analysis callbacks (channel activity, classifier-weight similarity, ClusCAM
hyper-parameter selection, CAAP sweeps, ...) put their results, and how they reach W&B.

Every analysis writes into ``<run_dir>/analyses/<name>/`` (the run directory is the trainer's
``default_root_dir``, set by ``train.py`` / ``evaluate.py``): its CSV tables and PNG plots.
The directory is replaced as a whole, so a rerun into the same run directory never mixes old and
new files. The same tables and plots go to every W&B logger of the trainer under
``analysis/<name>/...``; a W&B failure is logged as a warning, the files are already on disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import lightning as L
import pandas as pd

from lightning_modules.wandb_runs import log_tables_and_images, wandb_runs

ANALYSES = "analyses"

log = logging.getLogger(__name__)


def analysis_directory(trainer: L.Trainer, name: str) -> Path:
    """``<run_dir>/analyses/<name>/`` (not created; see :func:`publish_analysis`)."""
    return Path(trainer.default_root_dir).resolve() / ANALYSES / name


def publish_analysis(
    trainer: L.Trainer,
    name: str,
    tables: dict[str, pd.DataFrame],
    figures: dict[str, object],
    summary: dict[str, float] | None = None,
) -> Path:
    """Write ``tables`` as ``<key>.csv`` and ``figures`` (matplotlib) as ``<key>.png`` into the
    analysis directory, replacing an earlier one, then log them (and ``summary`` scalars) to W&B.

    Call on global rank zero only. Returns the analysis directory.
    """
    from callbacks.report.plots import save_figure

    target = analysis_directory(trainer, name)
    staging = target.with_name(f".{name}.{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    for key, table in tables.items():
        table.to_csv(staging / f"{key}.csv", index=False)
    for key, figure in figures.items():
        save_figure(figure, staging / f"{key}.png")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    _log_wandb(trainer, name, target, tables, summary or {})
    return target


def _log_wandb(
    trainer: L.Trainer,
    name: str,
    directory: Path,
    tables: dict[str, pd.DataFrame],
    summary: dict[str, float],
) -> None:
    prefix = f"analysis/{name}"
    for run in wandb_runs(trainer):
        try:
            for key, value in summary.items():
                run.summary[f"{prefix}/{key}"] = value
            log_tables_and_images(
                run,
                {f"{prefix}/{key}": table for key, table in tables.items()},
                {f"{prefix}/{path.stem}": path for path in sorted(directory.glob("*.png"))},
            )
        except Exception as error:  # the results are on disk already
            log.warning(
                "W&B logging of analysis %r failed (%s: %s); its results are in %s",
                name, type(error).__name__, error, directory,
            )  # fmt: skip
