"""Explain a trained classifier on a test split and score the explanations.

    uv run python evaluate.py                                  # newest checkpoint under outputs/
    uv run python evaluate.py --model.checkpoint outputs/<run>/checkpoints/last.ckpt
    uv run python evaluate.py --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp
    uv run python evaluate.py --help

Writes ``per_sample.parquet``, ``summary.csv``, ``stats.csv``, ``curves.csv``, ``plots/``,
``gallery/``, ``report.md``, ``manifest.json`` (last: the result is complete), ``config.yaml``
and the offline W&B run under ``outputs/<run_name>/`` (default run name:
``eval-<training run or model>-<time>``). Studies: ``--config configs/evaluate/<study>.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None):
    import lightning as L

    from callbacks.evaluation import (
        CONFUSION_FROM_HOLDOUT,
        CONFUSION_FROM_VALIDATION,
        SaliencyEvaluationCallback,
    )
    from callbacks.evaluation.test_subset import SampledTestData
    from lightning_modules.checkpoints import hand_filter_model
    from lightning_modules.cli import CONFIG_DIR, ProjectCLI, alias_seed, finish_wandb
    from lightning_modules.evaluation import SaliencyEvaluationModule

    class EvaluateCLI(ProjectCLI):
        job_type = "evaluate"

        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_lightning_class_args(SaliencyEvaluationCallback, "evaluation")

        def default_run_name(self, stamp: str) -> str:
            return f"eval-{self.model.source_name}-{stamp}"

        def instantiate_trainer(self, **kwargs):
            # Maps need gradients: Lightning's default inference mode would block them.
            kwargs |= {"inference_mode": False, "enable_checkpointing": False}
            return super().instantiate_trainer(**kwargs)

    cli = EvaluateCLI(
        SaliencyEvaluationModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        # a rerun into the same run directory replaces the previous results, config included
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_config_files": [str(CONFIG_DIR / "evaluate.yaml")]},
        args=None if argv is None else alias_seed(argv),
        run=False,
    )
    trainer = cli.trainer
    hand_filter_model(cli.datamodule)  # e.g. quad grids from confidently classified images
    evaluation = next(c for c in trainer.callbacks if isinstance(c, SaliencyEvaluationCallback))
    # The callback checks everything the config names against the model and the data in its
    # setup(), before any map is computed; CASE's matrix, when computed here, is read there.
    matrix = _held_out_confusion_matrix(cli, evaluation)
    if matrix in (CONFUSION_FROM_VALIDATION, CONFUSION_FROM_HOLDOUT):
        _compute_confusion_matrix(cli, trainer, evaluation, matrix)
    data = cli.datamodule
    if evaluation.sample_size is not None:
        data = SampledTestData(data, evaluation.sample_size, evaluation.sample_seed)
    trainer.test(cli.model, datamodule=data)
    finish_wandb(trainer)
    if trainer.is_global_zero:
        _report(cli, evaluation)
    return evaluation


def _held_out_confusion_matrix(cli, evaluation):
    """The confusion matrix CASE's ``confusion`` selectors will read — a file, or
    ``validate`` / ``holdout`` (computed next) — checked to come from data disjoint from the
    explained test split (:func:`callbacks.confusion_matrix.check_held_out`), before any
    computation. Without a ``confusion`` selector nothing is checked."""
    from callbacks.confusion_matrix import check_held_out, read_provenance
    from callbacks.evaluation import CONFUSION_FROM_HOLDOUT, CONFUSION_FROM_VALIDATION
    from datamodules.split_source import split_source

    matrix = evaluation.confusion_matrix or cli.model.confusion_matrix_path
    if matrix is None or not any(s.needs_confusion_matrix for s in evaluation.method_specs):
        return matrix
    explained = split_source(cli.datamodule, "test")
    if matrix == CONFUSION_FROM_VALIDATION:
        check_held_out(split_source(cli.datamodule, "val"), explained, "validate: the val split")
    elif matrix == CONFUSION_FROM_HOLDOUT:
        check_held_out(split_source(cli.datamodule, "train"), explained, "holdout of train")
    elif Path(matrix).is_file():
        provenance = read_provenance(matrix) or {}
        check_held_out(provenance.get("source"), explained, str(matrix))
    return matrix


def _compute_confusion_matrix(cli, trainer, evaluation, kind: str) -> None:
    """CASE's contrast classes for a model without a usable training-run matrix (e.g.
    pretrained): its confusion matrix on the datamodule's validation split (``validate``) or on
    a seeded per-class sample of its train split (``holdout``; the same on every rank), each
    sample counted once (also under DDP), saved with its provenance as
    ``<run_dir>/confusion_matrix.{npy,csv,json}``
    (:func:`callbacks.evaluation.engine.computed_confusion_matrix`), where the evaluation
    reads it."""
    from callbacks.confusion_matrix import ConfusionMatrixCallback
    from callbacks.evaluation import CONFUSION_FROM_VALIDATION
    from callbacks.evaluation.engine import computed_confusion_matrix

    target = computed_confusion_matrix(trainer.default_root_dir)
    if kind == CONFUSION_FROM_VALIDATION:
        callback = ConfusionMatrixCallback(str(target.parent), filename=target.stem)
        run = {"datamodule": cli.datamodule}
    else:
        from torch.utils.data import DataLoader

        from datamodules.split_source import split_source
        from datamodules.train_holdout import train_holdout

        per_class, seed = evaluation.confusion_holdout_per_class, evaluation.confusion_holdout_seed
        holdout = train_holdout(cli.datamodule, per_class, seed)
        template = cli.datamodule.test_dataloader()  # batch size, workers, collation
        loader = DataLoader(
            holdout, batch_size=template.batch_size, num_workers=template.num_workers,
            collate_fn=template.collate_fn,
        )  # fmt: skip
        source = split_source(cli.datamodule, "train")
        split = f"train hold-out: {per_class} per class, seed {seed}"
        callback = ConfusionMatrixCallback(
            str(target.parent), filename=target.stem, source=source, split=split
        )
        run = {"dataloaders": loader}
    trainer.callbacks.append(callback)
    try:
        trainer.validate(cli.model, verbose=False, **run)
    finally:
        trainer.callbacks.remove(callback)
    trainer.strategy.barrier()  # rank zero has written the file


def _report(cli, evaluation) -> None:
    import pandas as pd

    columns = [
        "method", "layer", "target_policy", "metric", "n", "mean", "ci_low", "ci_high",
        "wilcoxon_p",
    ]  # fmt: skip
    with pd.option_context("display.width", 160, "display.float_format", "{:.4g}".format):
        print("\n" + evaluation.summary[columns].to_string(index=False))
    if evaluation.dataset_checks:
        from callbacks.evaluation.tables import describe_sibling_share

        share = describe_sibling_share(evaluation.dataset_checks)
        print(f"\ntop-2 = sibling among correctly classified samples: {share}")
    print(f"\nexplained: {cli.model.source_description}")
    print(f"run directory: {cli.run_dir}")
    for path in evaluation.published:
        print(f"  {path}{'/' if path.is_dir() else ''}")
    print(f"  {cli.run_dir / 'config.yaml'}")
    for path in sorted((cli.run_dir / "wandb").glob("*run-*")):
        print(f"  {path}  (upload: wandb sync {path})")


if __name__ == "__main__":
    from lightning_modules.cli import run_cli

    run_cli(main)
