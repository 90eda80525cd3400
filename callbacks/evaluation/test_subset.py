"""A fixed, seeded sample of a datamodule's test split (evaluation's ``sample_size``)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from contrastive_saliency.errors import ConfigurationError


def sample_test_split(datamodule: L.LightningDataModule, size: int, seed: int = 0) -> list[int]:
    """Restrict ``datamodule``'s test dataloader to ``size`` samples drawn without replacement
    with ``seed`` (the same on every process, so DDP ranks agree), keeping the loader's batch
    size, workers and collate function. Samples keep their own ``index``. Returns the chosen
    positions, sorted; a ``size`` at least the split's length keeps the whole split."""
    if size < 1:
        raise ConfigurationError(f"evaluation sample_size must be at least 1, got {size}")
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    total = len(loader.dataset)
    if size >= total:
        return list(range(total))
    generator = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(total, generator=generator)[:size].tolist())
    subset = DataLoader(
        Subset(loader.dataset, chosen),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )
    datamodule.test_dataloader = lambda: subset  # Lightning asks the datamodule for it
    return chosen
