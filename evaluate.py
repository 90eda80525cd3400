"""Explain a trained classifier on a test split and score the explanations.

    uv run python evaluate.py                                  # newest checkpoint under outputs/
    uv run python evaluate.py --model.checkpoint outputs/<run>/checkpoints/last.ckpt
    uv run python evaluate.py --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp
    uv run python evaluate.py --help

Writes ``per_sample.parquet``, ``summary.csv``, ``config.yaml`` and the offline W&B run under
``outputs/<run_name>/`` (default run name: ``eval-<training run>-<time>``).
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None):
    import lightning as L

    from callbacks.saliency_evaluation import SaliencyEvaluationCallback
    from lightning_modules.cli import CONFIG_DIR, ProjectCLI, alias_seed, finish_wandb
    from lightning_modules.evaluation import SaliencyEvaluationModule

    class EvaluateCLI(ProjectCLI):
        job_type = "evaluate"

        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_lightning_class_args(SaliencyEvaluationCallback, "evaluation")

        def default_run_name(self, stamp: str) -> str:
            return f"eval-{self.model.checkpoint_path.parent.parent.name}-{stamp}"

        def instantiate_trainer(self, **kwargs):
            # Maps need gradients: Lightning's default inference mode would block them.
            kwargs |= {"inference_mode": False, "enable_checkpointing": False}
            return super().instantiate_trainer(**kwargs)

    cli = EvaluateCLI(
        SaliencyEvaluationModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        parser_kwargs={"default_config_files": [str(CONFIG_DIR / "evaluate.yaml")]},
        args=None if argv is None else alias_seed(argv),
        run=False,
    )
    trainer = cli.trainer
    trainer.test(cli.model, datamodule=cli.datamodule)
    evaluation = next(c for c in trainer.callbacks if isinstance(c, SaliencyEvaluationCallback))
    finish_wandb(trainer)
    if trainer.is_global_zero:
        _report(cli, evaluation)
    return evaluation


def _report(cli, evaluation) -> None:
    import pandas as pd

    columns = ["method", "metric", "n", "mean", "median", "ci_low", "ci_high", "wilcoxon_p"]
    with pd.option_context("display.width", 120, "display.float_format", "{:.4g}".format):
        print("\n" + evaluation.summary[columns].to_string(index=False))
    print(f"\ncheckpoint: {cli.model.checkpoint_path}")
    print(f"run directory: {cli.run_dir}")
    for name in ("per_sample.parquet", "summary.csv", "config.yaml"):
        print(f"  {cli.run_dir / name}")
    for path in sorted((cli.run_dir / "wandb").glob("*run-*")):
        print(f"  {path}  (upload: wandb sync {path})")


if __name__ == "__main__":
    from lightning_modules.cli import run_cli

    run_cli(main)
