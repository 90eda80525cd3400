"""What an analysis callback explains during ``evaluate.py``'s test loop: the plain network,
a readable name for plot titles, which test samples come first, and the data's normalisation."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from contrastive_saliency.errors import ConfigurationError


def explained_network(pl_module: L.LightningModule) -> nn.Module:
    """The plain images → logits network of a module: ``network`` (the evaluation's
    ``SaliencyEvaluationModule``) or ``model`` (training modules)."""
    for attribute in ("network", "model"):
        network = getattr(pl_module, attribute, None)
        if isinstance(network, nn.Module):
            return network
    raise ConfigurationError(
        f"{type(pl_module).__name__} has no 'network' or 'model' attribute holding the "
        "classifier to analyse"
    )


def model_name(pl_module: L.LightningModule) -> str | None:
    """``model_name`` of a network chosen by name (``torchvision:resnet50``), else None."""
    name = getattr(pl_module, "model_name", None)
    return name if isinstance(name, str) else None


def network_label(pl_module: L.LightningModule, network: nn.Module | None = None) -> str:
    """``"<network class> (<training run>)"``, e.g. ``"DenseNet (torchvision-densenet201)"``."""
    network = explained_network(pl_module) if network is None else network
    source = getattr(pl_module, "source_name", None)
    return f"{type(network).__name__} ({source})" if source else type(network).__name__


def model_description(pl_module: L.LightningModule, network: nn.Module) -> str:
    """The model's name, else its class and training run (``SmallCNN (seed3-run)``)."""
    return model_name(pl_module) or network_label(pl_module, network)


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
