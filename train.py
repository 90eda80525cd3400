"""Train an image classifier. Defaults: the embedded shapes benchmark and a small CNN.

    uv run python train.py --seed 3
    uv run python train.py --config configs/experiment/<name>.yaml --trainer.max_epochs 10
    uv run python train.py --help

Writes everything of a run under ``outputs/<run_name>/``: ``config.yaml``, ``metrics.csv``,
``checkpoints/{last,best-*}.ckpt``, ``confusion_matrix.{npy,csv}`` and the offline W&B run.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    import lightning as L

    from callbacks.confusion_matrix import ConfusionMatrixCallback
    from lightning_modules.checkpoints import hand_filter_model
    from lightning_modules.cli import CONFIG_DIR, ProjectCLI, alias_seed, finish_wandb
    from lightning_modules.linear_probe import LinearProbeModule

    class TrainCLI(ProjectCLI):
        job_type = "train"

        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.link_arguments(
                "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
            )

        def run_callbacks(self) -> list:
            from lightning.pytorch.callbacks import ModelCheckpoint

            checkpoints = ModelCheckpoint(
                dirpath=str(self.run_dir / "checkpoints"),
                filename="best-epoch{epoch:02d}",
                auto_insert_metric_name=False,
                monitor="val/acc_top1",
                mode="max",
                save_last=True,
            )
            return [checkpoints, ConfusionMatrixCallback()]

    cli = TrainCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        parser_kwargs={"default_config_files": [str(CONFIG_DIR / "train.yaml")]},
        args=None if argv is None else alias_seed(argv),
        run=False,
    )
    trainer = cli.trainer
    hand_filter_model(cli.datamodule)  # e.g. quad grids from confidently classified images
    data = cli.datamodule
    if isinstance(cli.model, LinearProbeModule):
        data = cli.model.fit_data(data)  # train/val as cached backbone features
    trainer.fit(cli.model, datamodule=data)
    metrics = {
        name: float(value)
        for name, value in trainer.callback_metrics.items()
        if name.startswith("val/")
    }
    finish_wandb(trainer)
    _require_checkpoint(cli.run_dir / "checkpoints", trainer)
    if trainer.is_global_zero:
        _report(cli.run_dir, metrics, trainer)
    return metrics


def _require_checkpoint(folder, trainer) -> None:
    """A run that trained nothing (``max_epochs 0``, ``limit_train_batches 0``, ...) writes no
    checkpoint and so gives nothing to evaluate: say so instead of ending quietly."""
    from contrastive_saliency.errors import ConfigurationError

    if any(folder.glob("*.ckpt")):
        return
    settings = ", ".join(
        f"{name}={value}"
        for name, value in (
            ("max_epochs", trainer.max_epochs),
            ("max_steps", trainer.max_steps),
            ("limit_train_batches", trainer.limit_train_batches),
        )
    )
    raise ConfigurationError(
        f"training wrote no checkpoint into {folder} ({settings}; {trainer.global_step} "
        f"optimizer steps): train for at least one step, e.g. --trainer.max_epochs 1"
    )


def _report(run_dir, metrics: dict[str, float], trainer) -> None:
    print("\nfinal validation metrics:")
    for name, value in sorted(metrics.items()):
        print(f"  {name:<16} {value:.4f}")
    print(f"\nrun directory: {run_dir}")
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and "wandb" not in p.parts):
        print(f"  {path}")
    wandb_runs = sorted((run_dir / "wandb").glob("*run-*"))
    for path in wandb_runs:
        print(f"  {path}  (upload: wandb sync {path})")


if __name__ == "__main__":
    from lightning_modules.cli import run_cli

    run_cli(main)
