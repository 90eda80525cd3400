"""The data a linear probe with a feature cache is fitted on: the train and val splits of an
image datamodule as cached backbone features, through Lightning's public datamodule hooks.

Lightning takes the loaders of ``trainer.fit(module, datamodule=...)`` from the datamodule, so
the probe's feature loaders reach ``fit`` as a datamodule of their own:
:class:`CachedFeatureData` wraps the image datamodule and serves ``{"features", "label",
"index"}`` batches for ``train`` and ``val`` (the datamodule's batch size, the same shuffling);
its other hooks (``prepare_data``, ``setup``, ``teardown``, state) and attributes
(``num_classes``, ``class_names``, ``split_source``, ...) are the image datamodule's, so
callbacks such as the confusion matrix see the data they would see without the cache.
"""

from __future__ import annotations

from typing import Any, Protocol

import lightning as L
from torch.utils.data import DataLoader

from lightning_modules.feature_cache import CachedFeatures, feature_loader, loader_batch_size


class FeatureSource(Protocol):
    """What computes or reads the features of a split (:class:`LinearProbeModule`)."""

    def cached_features(self, datamodule: Any, split: str) -> CachedFeatures: ...


class CachedFeatureData(L.LightningDataModule):
    """``images``' train and val splits as the cached features of ``source``; everything else
    is ``images``'. Features are computed (or read) at the first loader request of a fit, i.e.
    after a checkpoint is restored and the module is on its device."""

    def __init__(self, images: L.LightningDataModule, source: FeatureSource) -> None:
        super().__init__()
        self.images = images
        self.source = source
        self.prepare_data_per_node = images.prepare_data_per_node
        # the run's logged hyper-parameters stay the image datamodule's
        self.save_hyperparameters(dict(images.hparams_initial))
        self._features: dict[str, CachedFeatures] = {}

    def __getattr__(self, name: str) -> Any:
        """Attributes this wrapper lacks are the image datamodule's."""
        if name.startswith("__") or name in ("images", "source", "_features"):
            raise AttributeError(name)
        return getattr(self.images, name)

    def features(self, split: str) -> CachedFeatures:
        """``φ`` of every sample of ``split`` of the image datamodule (once per fit)."""
        if split not in self._features:
            self._features[split] = self.source.cached_features(self.images, split)
        return self._features[split]

    def train_dataloader(self) -> DataLoader:
        return feature_loader(self.features("train"), loader_batch_size(self.images), True)

    def val_dataloader(self) -> DataLoader:
        return feature_loader(self.features("val"), loader_batch_size(self.images), False)

    # -- the image datamodule's hooks -----------------------------------------------------------

    def prepare_data(self) -> None:
        self.images.trainer = self.trainer
        self.images.prepare_data()

    def setup(self, stage: str) -> None:
        self.images.trainer = self.trainer
        self._features = {}
        self.images.setup(stage)

    def teardown(self, stage: str) -> None:
        self.images.teardown(stage)

    def state_dict(self) -> dict[str, Any]:
        return self.images.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.images.load_state_dict(state_dict)
