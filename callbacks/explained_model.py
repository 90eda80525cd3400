"""What an analysis callback explains during ``evaluate.py``'s test loop: the plain network,
a readable name for plot titles, which test samples come first, and the data's normalisation."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn


def explained_network(pl_module: L.LightningModule) -> nn.Module:
    """The plain network (``SaliencyEvaluationModule.network``; a training module's ``model``)."""
    network = getattr(pl_module, "network", None)
    return network if isinstance(network, nn.Module) else pl_module.model


def model_name(pl_module: L.LightningModule) -> str | None:
    """``model_name`` of a network chosen by name (``torchvision:resnet50``), else None."""
    name = getattr(pl_module, "model_name", None)
    return name if isinstance(name, str) else None


def model_description(pl_module: L.LightningModule, network: nn.Module) -> str:
    """The model's name, else its class and training run (``SmallCNN (seed3-run)``)."""
    name = model_name(pl_module)
    if name is not None:
        return name
    source = getattr(pl_module, "source_name", None)
    return f"{type(network).__name__} ({source})" if source else type(network).__name__


def first_test_indices(dataloaders: Any, count: int) -> list[int]:
    """The ``count`` lowest sample indices of the (first) test dataloader's dataset: a
    ``Subset``'s own indices when ``evaluate.py`` samples the split."""
    loader = dataloaders[0] if isinstance(dataloaders, list | tuple) else dataloaders
    dataset = loader.dataset
    indices = getattr(dataset, "indices", None)
    if indices is not None:
        return sorted(int(i) for i in indices)[:count]
    return list(range(min(count, len(dataset))))


def data_normalisation(datamodule: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The ``(mean, std)`` a datamodule normalises its images with (the transform's statistics,
    DESIGN.md "Sample format"), or None when it does not say."""
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is None or std is None:
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
