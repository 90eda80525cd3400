"""The quad-grid datamodule (Rao et al. 2022; VAR App. B.1): grids
(:mod:`datamodules.quad_grid_dataset`) over the splits of any base datamodule, optionally from
the images a filter model classifies confidently (:mod:`datamodules.confidence_filter`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from contrastive_saliency.checks import check_positive_int
from contrastive_saliency.errors import ConfigurationError
from datamodules.base import SplitLoaders
from datamodules.confidence_filter import RAO_CONFIDENCE, confident_indices, model_device
from datamodules.dataset_labels import dataset_labels
from datamodules.quad_grid_dataset import QuadGridDataset
from datamodules.split_source import split_source

STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}
"""Grid splits each Trainer stage reads."""


def _base_image_size(base: Any, dataset: Dataset) -> int:
    """The base image side: from the datamodule's config when it has one, else sample 0."""
    for owner in ("config", "transform_config"):
        size = getattr(getattr(base, owner, None), "image_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the base split is empty; give cell_size explicitly")
    height, width = torch.as_tensor(dataset[0]["image"]).shape[-2:]
    if height != width:
        raise ValueError(
            f"base images are {height}×{width}, not square; give cell_size explicitly "
            f"(each image is resized to cell_size × cell_size)"
        )
    return int(height)


class QuadGridDataModule(SplitLoaders, L.LightningDataModule):
    """Quad grids (module docstring; Rao et al. 2022, VAR App. B.1) over any datamodule with
    ``dataset(split)``, ``num_classes``, ``class_names``, ``mean`` and ``std``; those four are
    the base's. Split ``s`` of the grids is built from split ``s`` of the base.

    Args:
        base: the datamodule whose images fill the cells (in YAML a nested
            ``class_path``/``init_args``; see ``configs/data/quad_shapes.yaml``).
        cell_size: side of each cell (default: the base image size); grids are twice as large.
            Rao et al.: 224 (448² grids), VAR code: 112 (224² grids).
        train_samples, val_samples, test_samples: grids per split (0: no loader for it).
            Train grids use the base's train transform, including its random augmentation.
        seed: grid seed (the same seed and filter give identical grids).
        filter_checkpoint: a ``train.py`` (``ClassifierModule``) checkpoint whose network filters
            the candidate images (Rao et al.); None and no other filter: all images (VAR code).
            The entry points load it and hand its network to :meth:`set_filter_model`
            (:func:`lightning_modules.checkpoints.hand_filter_model`): data never imports a
            model module.
        filter_trainer_model: filter with the LightningModule the Trainer runs (in
            ``evaluate.py`` the model being explained, Rao et al.'s protocol). Do not use it
            when training: an untrained model keeps almost nothing.
        confidence_threshold: softmax probability of the true class an image needs (0.99).
        cache_dir: where filtered index lists are cached (None: no cache, every rank recomputes).
        filter_batch_size: batch size of the filter pass.
        filter_device: device of the filter pass (default: the Trainer's root device, else the
            model's).
        batch_size, num_workers: grid loading.

    A filter model can also be set in Python with :meth:`set_filter_model` (it takes precedence
    over ``filter_trainer_model``).
    With a cache, ``prepare_data`` (rank 0 of each node) computes the filter once and every
    rank's ``setup`` reads it; without one, every rank computes it.
    """

    def __init__(
        self,
        base: L.LightningDataModule,
        cell_size: int | None = None,
        train_samples: int = 0,
        val_samples: int = 1000,
        test_samples: int = 1000,
        seed: int = 0,
        filter_checkpoint: str | None = None,
        filter_trainer_model: bool = False,
        confidence_threshold: float = RAO_CONFIDENCE,
        cache_dir: str | None = "outputs/cache/quad_grids",
        filter_batch_size: int = 64,
        filter_device: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        # The base is an object; the run's config.yaml records its class_path and init_args.
        self.save_hyperparameters(ignore=["base"])
        if not callable(getattr(base, "dataset", None)):
            raise ConfigurationError(
                f"base {type(base).__name__} has no dataset(split) method; quad grids need a "
                f"datamodule such as datamodules.ShapesDataModule or a FileDataModule"
            )
        if cell_size is not None:
            check_positive_int(cell_size, "cell_size", "or None for the base image size")
        for name, value in (("train", train_samples), ("val", val_samples), ("test", test_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{name}_samples must be a non-negative number of grids, got {value!r}"
                )
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(
                f"confidence_threshold must be a probability in [0, 1], got "
                f"{confidence_threshold}; Rao et al. use {RAO_CONFIDENCE}"
            )
        if filter_checkpoint is not None and filter_trainer_model:
            raise ConfigurationError(
                "give either filter_checkpoint or filter_trainer_model=true, not both"
            )
        self.base = base
        self.cell_size = cell_size
        self.samples = {"train": train_samples, "val": val_samples, "test": test_samples}
        self.seed = seed
        self.filter_checkpoint = filter_checkpoint
        self.filter_trainer_model = filter_trainer_model
        self.confidence_threshold = confidence_threshold
        self.cache_dir = cache_dir
        self.filter_batch_size = filter_batch_size
        self.filter_device = filter_device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._filter_model: nn.Module | None = None
        self._datasets: dict[str, QuadGridDataset] = {}

    # -- the base's description --------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self.base.num_classes  # type: ignore[attr-defined]

    @property
    def class_names(self) -> list[str]:
        return self.base.class_names  # type: ignore[attr-defined]

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.base.mean  # type: ignore[attr-defined]

    @property
    def std(self) -> tuple[float, float, float]:
        return self.base.std  # type: ignore[attr-defined]

    # -- the filter ---------------------------------------------------------------------------

    def set_filter_model(self, model: nn.Module | None) -> None:
        """Filter candidate images with ``model`` (images → logits); None removes the filter
        set here. Grids built before are rebuilt on next use."""
        self._filter_model = model
        self._datasets.clear()

    def filter_model(self) -> nn.Module | None:
        """The model that filters candidates: :meth:`set_filter_model`'s (for
        ``filter_checkpoint`` the entry points hand its network in), else the Trainer's module
        if ``filter_trainer_model``, else None (no filter)."""
        if self._filter_model is not None:
            return self._filter_model
        if self.filter_checkpoint is not None:
            raise ConfigurationError(
                f"filter_checkpoint={self.filter_checkpoint!r} is loaded by the entry points "
                f"(train.py, evaluate.py); in Python hand its network in with "
                f"lightning_modules.checkpoints.hand_filter_model(datamodule) or "
                f"set_filter_model(load_classifier(path).model)"
            )
        if self.filter_trainer_model:
            trainer = getattr(self, "trainer", None)
            module = trainer.lightning_module if trainer is not None else None
            if module is None:
                raise ConfigurationError(
                    "filter_trainer_model=true needs the datamodule to be used by a Trainer "
                    "with a model; outside a Trainer call set_filter_model(model)"
                )
            return module
        return None

    def _filter_device(self, model: nn.Module) -> torch.device:
        if self.filter_device is not None:
            return torch.device(self.filter_device)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return model_device(model)

    def candidates(self, split: str, labels: Sequence[int] | None = None) -> list[int] | None:
        """Base indices of ``split`` allowed in grids: the confident ones when a filter model is
        set (computed once, cached under ``cache_dir``), else None (all)."""
        model = self.filter_model()
        if model is None:
            return None
        return confident_indices(
            model,
            self.base.dataset(split),  # type: ignore[attr-defined]
            labels=labels,
            threshold=self.confidence_threshold,
            batch_size=self.filter_batch_size,
            device=self._filter_device(model),
            cache_dir=self.cache_dir,
            split=split,
            num_workers=self.num_workers,
        )

    # -- grids --------------------------------------------------------------------------------

    def split_source(self, split: str) -> str | None:
        """The base's source of ``split``: grids of split s are built from the base's split s
        (:mod:`datamodules.split_source`); None when the base declares none."""
        return split_source(self.base, split)

    def dataset(self, split: str) -> QuadGridDataset:
        """The grids of ``split`` (built once; ``<split>_samples`` of them)."""
        if split not in self.samples:
            raise ValueError(f"unknown split {split!r}; expected one of {list(self.samples)}")
        if split not in self._datasets:
            base_dataset = self.base.dataset(split)  # type: ignore[attr-defined]
            labels = dataset_labels(base_dataset)
            candidates = self.candidates(split, labels)
            if candidates is not None:
                classes = len({labels[i] for i in candidates})
                if classes < 4:
                    raise ConfigurationError(
                        f"the confidence filter (threshold {self.confidence_threshold}) kept "
                        f"{len(candidates)} of {len(base_dataset)} {split} images from only "
                        f"{classes} classes; a 2×2 grid needs 4 distinct classes: lower "
                        f"confidence_threshold, filter with a better model, or drop the filter"
                    )
            cell_size = self.cell_size or _base_image_size(self.base, base_dataset)
            self._datasets[split] = QuadGridDataset(
                base_dataset, self.samples[split], cell_size, self.seed, labels, candidates
            )
        return self._datasets[split]

    def _splits_of(self, stage: str | None) -> list[str]:
        """Splits with grids that ``stage`` (``fit``, ``validate``, ``test``, ``predict``; None:
        all) reads."""
        splits = STAGE_SPLITS.get(stage, tuple(self.samples)) if stage else tuple(self.samples)
        return [split for split in splits if self.samples[split] > 0]

    def prepare_data(self) -> None:
        """With a filter and a cache: compute the filter of each split the Trainer's stage
        needs (all splits outside a Trainer), once, on rank 0 of each node."""
        if self.cache_dir is None or self.filter_model() is None:
            return
        trainer = getattr(self, "trainer", None)
        stage = trainer.state.fn.value if trainer is not None and trainer.state.fn else None
        for split in self._splits_of(stage):
            base_dataset = self.base.dataset(split)  # type: ignore[attr-defined]
            self.candidates(split, dataset_labels(base_dataset))

    def setup(self, stage: str) -> None:
        for split in self._splits_of(stage):
            self.dataset(split)

    def split_loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.samples[split] == 0:
            raise ConfigurationError(
                f"QuadGridDataModule has no {split} grids: set {split}_samples > 0"
            )
        return super().split_loader(split, shuffle)
