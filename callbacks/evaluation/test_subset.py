"""A fixed, seeded sample of a datamodule's test split (evaluation's ``sample_size``), reaching
``trainer.test`` through Lightning's public datamodule hooks.

``trainer.test(module, datamodule=SampledTestData(data, size, seed))``: Lightning asks the
datamodule for its test loader, and :class:`SampledTestData` serves the sample; its other hooks
(``prepare_data``, ``setup``, ``teardown``, state) and attributes (``num_classes``, ``mean``,
``class_names``, ``sibling_classes``, ...) are the wrapped datamodule's, so the evaluation and
the module see the data they would see without the sample.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from contrastive_saliency.errors import ConfigurationError


def sampled_positions(total: int, size: int, seed: int = 0) -> list[int]:
    """``size`` of the positions ``0 … total − 1`` drawn without replacement with ``seed`` (the
    same on every process, so DDP ranks agree), sorted; all of them when ``size >= total``."""
    _check_size(size)
    if size >= total:
        return list(range(total))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=generator)[:size].tolist())


def sample_test_split(loader: DataLoader, size: int, seed: int = 0) -> DataLoader:
    """``loader`` restricted to :func:`sampled_positions` of its dataset (a ``Subset``; samples
    keep their own ``index``), keeping its batch size, workers, collate function and pinning;
    ``loader`` itself when the sample is the whole split."""
    chosen = sampled_positions(len(loader.dataset), size, seed)
    if len(chosen) == len(loader.dataset):
        return loader
    return DataLoader(
        Subset(loader.dataset, chosen),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


class SampledTestData(L.LightningDataModule):
    """``data`` whose test loader is :func:`sample_test_split` of its own; everything else is
    ``data``'s."""

    def __init__(self, data: L.LightningDataModule, size: int, seed: int = 0) -> None:
        super().__init__()
        _check_size(size)  # now, before any data is read
        self.data, self.size, self.seed = data, size, seed
        self.prepare_data_per_node = data.prepare_data_per_node
        # the run's logged hyper-parameters stay the datamodule's
        self.save_hyperparameters(dict(data.hparams_initial))

    def __getattr__(self, name: str) -> Any:
        """Attributes this wrapper lacks are the wrapped datamodule's."""
        if name.startswith("__") or name in ("data", "size", "seed"):
            raise AttributeError(name)
        return getattr(self.data, name)

    def test_dataloader(self) -> DataLoader:
        return sample_test_split(self.data.test_dataloader(), self.size, self.seed)

    # -- the wrapped datamodule's hooks ---------------------------------------------------------

    def prepare_data(self) -> None:
        self.data.trainer = self.trainer
        self.data.prepare_data()

    def setup(self, stage: str) -> None:
        self.data.trainer = self.trainer
        self.data.setup(stage)

    def teardown(self, stage: str) -> None:
        self.data.teardown(stage)

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.data.load_state_dict(state_dict)


def _check_size(size: int) -> None:
    if size < 1:
        raise ConfigurationError(f"evaluation sample_size must be at least 1, got {size}")


def explained_data(datamodule: Any) -> Any:
    """The datamodule whose data is explained: the one a :class:`SampledTestData` samples, else
    ``datamodule`` itself (e.g. its class name in the run's report)."""
    return datamodule.data if isinstance(datamodule, SampledTestData) else datamodule
