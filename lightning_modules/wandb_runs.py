"""Weights & Biases in one place: the one way a W&B run is created (``train.py``,
``evaluate.py`` and the experiment scripts all get a Lightning ``WandbLogger`` from
:func:`wandb_logger`), the runs a Trainer logs to, and tables and images logged to a run.

``offline`` (the default mode) needs no account; ``wandb sync <dir>/wandb/offline-run-*``
uploads later. ``disabled`` creates no run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch.loggers import WandbLogger


def wandb_logger(
    save_dir: str | Path,
    name: str,
    *,
    job_type: str,
    mode: str,
    project: str,
    group: str | None = None,
    tags: Iterable[str] = (),
    entity: str | None = None,
    config: dict[str, Any] | None = None,
) -> WandbLogger | None:
    """A W&B logger writing under ``<save_dir>/wandb``; None when ``mode`` is ``disabled``.
    ``mode``: ``offline``, ``online`` or ``disabled``; ``config`` goes to the run's config."""
    if mode == "disabled":
        return None
    extra = {} if config is None else {"config": config}
    return WandbLogger(
        save_dir=str(save_dir),
        name=name,
        project=project,
        group=group,
        tags=list(tags),
        entity=entity,
        job_type=job_type,
        offline=mode == "offline",
        mode=mode,
        **extra,
    )


def wandb_runs(trainer: Any) -> list[Any]:
    """The W&B runs of ``trainer``'s W&B loggers on the global-zero process (none on the other
    ranks and without a W&B logger)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_tables_and_images(
    run: Any, tables: Mapping[str, pd.DataFrame], images: Mapping[str, Path]
) -> None:
    """One ``run.log`` of ``tables`` (W&B tables; float columns stored as float64, since W&B
    rejects float16 and nullable dtypes) and ``images`` (PNG files), under their keys."""
    import wandb

    run.log(
        {
            **{key: wandb.Table(dataframe=_float64(table)) for key, table in tables.items()},
            **{key: wandb.Image(str(path)) for key, path in images.items()},
        }
    )


def _float64(table: pd.DataFrame) -> pd.DataFrame:
    floats = table.select_dtypes(include=[np.floating]).columns
    return table.astype({column: np.float64 for column in floats})
