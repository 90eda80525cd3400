"""Shared LightningCLI plumbing of ``train.py`` and ``evaluate.py``.

Every run writes into one directory ``<output_dir>/<run_name>/``: the resolved config, the
per-epoch ``metrics.csv`` (CSVLogger), checkpoints, W&B's offline run and whatever the
callbacks write. Errors in what the user asked for end the program with one line on stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger

from contrastive_saliency.errors import UserInputError
from lightning_modules.group_files import route_group_files
from lightning_modules.wandb_runs import wandb_logger, wandb_runs

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RUN_NAME_VARIABLE = "CONTRASTIVE_SALIENCY_RUN_NAME"


@dataclass
class WandbSettings:
    """Weights & Biases logging. ``offline`` (default) needs no account; upload later with
    ``wandb sync <run dir>/wandb/offline-run-*``. ``disabled`` creates no W&B run."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "contrastive-saliency"
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    entity: str | None = None


def alias_seed(argv: Sequence[str]) -> list[str]:
    """Rewrite ``--seed N`` / ``--seed=N`` to LightningCLI's ``--seed_everything``."""
    rewritten = []
    for argument in argv:
        if argument == "--seed":
            rewritten.append("--seed_everything")
        elif argument.startswith("--seed="):
            rewritten.append("--seed_everything=" + argument.removeprefix("--seed="))
        else:
            rewritten.append(argument)
    return rewritten


class ProjectCLI(LightningCLI):
    """LightningCLI with a run directory, CSV + W&B loggers and checkpoints placed in it."""

    job_type = "train"

    def parse_arguments(self, parser, args) -> None:
        """Parse ``args`` (``None``: the command line) after routing group config files
        (``--data configs/data/X.yaml`` or ``--config configs/data/X.yaml``; see
        :mod:`lightning_modules.group_files`)."""
        if args is None:
            args = sys.argv[1:]
        if not isinstance(args, list | tuple):  # a dict or Namespace: no files to route
            return super().parse_arguments(parser, args)
        self.config = parser.parse_args(route_group_files(args))

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None,
            help="name of the run directory under output_dir (default: <job>-<time>-seed<N>)",
        )  # fmt: skip
        parser.add_argument("--output_dir", type=str, default="outputs", help="parent of run dirs")
        parser.add_dataclass_arguments(WandbSettings, "wandb")

    @property
    def run_dir(self) -> Path:
        return Path(self.config["output_dir"]) / self.run_name

    @property
    def run_name(self) -> str:
        if getattr(self, "_run_name", None) is None:
            name = self.config["run_name"] or os.environ.get(RUN_NAME_VARIABLE)
            if name is None:
                name = self.default_run_name(datetime.now().strftime("%Y%m%d-%H%M%S"))
                # DDP re-launches this script for the other ranks: they inherit this name.
                os.environ[RUN_NAME_VARIABLE] = name
            self._run_name = name
        return self._run_name

    def default_run_name(self, stamp: str) -> str:
        return f"{self.job_type}-{stamp}-seed{self.config['seed_everything']}"

    def run_callbacks(self) -> list:
        """Callbacks this job adds to the trainer (besides the configured ones)."""
        return []

    def instantiate_trainer(self, **kwargs: Any):
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        kwargs.setdefault("default_root_dir", str(run_dir))
        kwargs.setdefault("logger", self.loggers(run_dir))
        kwargs.setdefault("callbacks", [*configured, *self.run_callbacks()])
        return super().instantiate_trainer(**kwargs)

    def loggers(self, run_dir: Path) -> list[Logger]:
        loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
        settings = self.config["wandb"]
        wandb = wandb_logger(
            run_dir, self.run_name, job_type=self.job_type, mode=settings["mode"],
            project=settings["project"], group=settings["group"], tags=settings["tags"],
            entity=settings["entity"],
        )  # fmt: skip
        return loggers if wandb is None else [*loggers, wandb]


def run_cli(main: Callable[[Sequence[str] | None], Any]) -> Any:
    """Run ``main`` on the command line (``--seed`` aliased). A :class:`UserInputError`
    anywhere behind the exception that ends it (a bad option, file or dataset, also one raised
    in a data-loading worker) becomes one ``error: ...`` line on stderr and exit status 2."""
    # Rewritten in place: DDP re-launches the other ranks with sys.argv.
    sys.argv[1:] = alias_seed(sys.argv[1:])
    try:
        return main(None)
    except Exception as error:
        cause = user_input_error_in(error)
        if cause is None:
            raise
        print(f"error: {user_message(cause)}", file=sys.stderr)
        raise SystemExit(2) from None


def user_input_error_in(error: BaseException) -> UserInputError | None:
    """The :class:`UserInputError` behind ``error``, if any. jsonargparse re-raises errors
    of constructors it instantiates as a generic ``ValueError`` chained to the original."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserInputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def user_message(error: UserInputError) -> str:
    """The error's own message. One re-raised from a DataLoader worker carries the worker's
    traceback in its text ("Caught X in DataLoader worker process 0. Original Traceback ...");
    its last line holds the original message."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name = type(error).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def finish_wandb(trainer) -> None:
    """Close the W&B run so its offline files are complete before the program prints paths."""
    for run in wandb_runs(trainer):
        run.finish()
