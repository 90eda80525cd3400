"""Saliency evaluation as a Lightning callback: methods × layers × target policies × metrics on
every test batch (:mod:`callbacks.evaluation.engine`). At the end of the epoch the per-sample
values are gathered from every process (:mod:`callbacks.evaluation.results`); rank 0 then runs
the sanity check (:mod:`callbacks.evaluation.sanity`), builds ``summary.csv``, ``stats.csv``
(every method vs the reference method), plots, a gallery and ``report.md`` and publishes them
at once (:mod:`callbacks.evaluation.outputs`), and logs the same to W&B.

During ``trainer.fit`` the callback can also watch explanations as a model trains:
``every_n_epochs`` evaluates the first ``validation_batches`` validation batches and logs the
means under the names the evaluation gives them in W&B (``eval/<method>/<metric>``;
:func:`callbacks.evaluation.wandb_logging.wandb_keys`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from callbacks.evaluation.checks import (
    check_metric_policies,
    check_sample_fields,
    check_sanity_options,
    reference_labels,
    require_keys,
)
from callbacks.evaluation.engine import (
    CONFUSION_FROM_HOLDOUT,
    CONFUSION_FROM_VALIDATION,
    EvaluationEngine,
    _Combination,
    computed_confusion_matrix,
)
from callbacks.evaluation.keys import PolicyKey, value_keys
from callbacks.evaluation.outputs import ResultWriter
from callbacks.evaluation.results import GatheredResults
from callbacks.evaluation.sanity import SanityCheck
from callbacks.evaluation.spec import parse_methods, parse_metrics
from callbacks.evaluation.target_policies import parse_policies
from callbacks.evaluation.wandb_logging import wandb_keys
from callbacks.explained_model import data_normalisation, first_test_indices
from callbacks.run_outputs import StagedResults
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.metrics.per_sample import PerSampleValues
from contrastive_saliency.stats import method_alternative


class SaliencyEvaluationCallback(
    EvaluationEngine, SanityCheck, GatheredResults, ResultWriter, L.Callback
):
    """Evaluate saliency methods on the test split (and optionally during training).

    Args:
        methods: names or ``{name, label, kwargs}`` (:mod:`callbacks.evaluation.spec`).
        layers: dotted layer paths; ``null`` = each network's default layer;
            ``protocol:case`` = the layer CASE explains on this architecture
            (:func:`contrastive_saliency.layers.case_layer`). Methods that explain the input (gradients,
            RISE) run once, under layer ``input``.
        targets: target policies (:mod:`callbacks.evaluation.target_policies`).
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
            (``evaluate.py`` tests on
            :class:`callbacks.evaluation.test_subset.SampledTestData`).
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
            max_steps, seed, order, group_depth}`` (:func:`check_sanity_options`).
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
        self.reference_methods = reference_labels(
            reference_method, reference_methods, [spec.label for spec in self.method_specs]
        )
        self.reference_method = self.reference_methods[0]
        check_metric_policies(self.metric_specs, self.policies)
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
        self.sanity_check = check_sanity_options(sanity_check, gallery_size)
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

    def prepare(
        self,
        network: torch.nn.Module,
        sample: dict[str, Any],
        confusion_matrix: str | Path | np.ndarray | None = None,
        device_type: str = "cpu",
        normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        """Check the config against the model and the data and build every method — before
        any computation (:meth:`setup` calls it with the trainer's model and data). ``sample``
        is one dataset item (its keys say what the data has); ``confusion_matrix`` is the
        matrix of the ``confusion`` selectors (None: ``evaluation.confusion_matrix``);
        ``normalisation`` is the data's ``(mean, std)``, passed to every method with a
        ``normalisation`` option that the config leaves unset (CAAP's white blank)."""
        if self.autocast and device_type != "cuda":
            raise ConfigurationError(
                "evaluation.autocast needs a CUDA device (float16 autocast); the trainer runs on "
                f"{device_type}: drop --evaluation.autocast or use --trainer.accelerator gpu"
            )
        keys = set(sample)
        for policy in self.policies:
            require_keys(
                keys, policy.needs, f"target policy {policy.name!r}",
                "use a grid datamodule (e.g. configs/data/quad_shapes.yaml) or drop the policy",
            )  # fmt: skip
        matrix = self.confusion_matrix if confusion_matrix is None else confusion_matrix
        if isinstance(matrix, str) and matrix in (
            CONFUSION_FROM_VALIDATION,
            CONFUSION_FROM_HOLDOUT,
        ):
            raise ConfigurationError(
                f"evaluation.confusion_matrix={matrix!r} is computed by evaluate.py before the "
                f"test run; call prepare() with a matrix"
            )
        if isinstance(matrix, (str, Path)) and not Path(matrix).is_file():
            raise ConfigurationError(f"confusion matrix not found: {matrix}")
        self._matrix = matrix
        self._normalisation = normalisation
        self.combinations = self._build(network, matrix)
        check_sample_fields(self.metric_specs, self.method_specs, self.combinations, keys)
        self._sanity_order(network)  # a wrong layer name fails now, not after the evaluation

    # ----------------------------------------------------------------------------- setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Prepare (:meth:`prepare`) before any computation: for ``test`` on the test data's
        first sample with the study's confusion matrix (:meth:`_confusion_matrix`); for
        ``fit`` on the validation data's, when watching (``every_n_epochs``)."""
        watching = stage == "fit" and self.every_n_epochs is not None
        if stage != "test" and not watching:
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ConfigurationError(
                f"the saliency evaluation reads the data's fields, normalisation and class "
                f"names from a datamodule: run trainer.{stage}(module, datamodule=...)"
            )
        if watching:
            sample, network, matrix = datamodule.val_dataloader().dataset[0], pl_module.model, None
        else:
            sample = datamodule.test_dataloader().dataset[0]
            network, matrix = pl_module.network, self._confusion_matrix(trainer, pl_module)
        device_type = trainer.strategy.root_device.type
        self.prepare(network, sample, matrix, device_type, data_normalisation(datamodule))

    def _confusion_matrix(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        """``evaluation.confusion_matrix`` (a file; ``validate`` / ``holdout``: the matrix
        ``evaluate.py`` computed first, :func:`computed_confusion_matrix`), else the training
        run's (the module's ``confusion_matrix_path``), else None."""
        matrix = self.confusion_matrix
        if matrix in (CONFUSION_FROM_VALIDATION, CONFUSION_FROM_HOLDOUT):
            computed = computed_confusion_matrix(trainer.default_root_dir)
            if not computed.is_file():
                raise ConfigurationError(
                    f"evaluation.confusion_matrix={matrix!r}: the matrix evaluate.py computes "
                    f"before the test run is missing ({computed}); run evaluate.py, or pass "
                    f"a matrix file"
                )
            return computed
        return matrix or getattr(pl_module, "confusion_matrix_path", None)

    # ------------------------------------------------------------------------------ test
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        self._metrics = self.new_metrics(device)
        self._predictions = PerSampleValues(row_shape=(5,)).to(device)
        self._contrast_counts = {
            PolicyKey(c.spec.label, c.layer, policy.name): PerSampleValues(row_shape=()).to(device)
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

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gallery = self._gather_results(trainer)  # collective: every rank calls it
        if not trainer.is_global_zero:
            return
        gallery = sorted({g["index"]: g for g in gallery}.values(), key=lambda g: g["index"])
        self.sanity = self._run_sanity_check(pl_module, gallery)
        self._write_results(trainer, gallery)

    # --------------------------------------------------------------------- during training
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._watch = self._watching(trainer)
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
        names = wandb_keys(value_keys(self._watched))  # the evaluation's names
        for key, state in self._watched.items():
            _, columns = state.labelled_values(key.metric, sync=False)  # this process's samples
            for metric, values in columns.items():
                if values.numel():
                    name = names[key._replace(metric=metric)]
                    pl_module.log(name, values.mean(), sync_dist=True)
