"""LinearProbeModule: a linear head trained on a frozen backbone, from cached features."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from datamodules.cache_files import model_fingerprint
from lightning_modules.classification_steps import ClassificationSteps
from lightning_modules.feature_cache import (
    CachedFeatures,
    cache_path,
    cached_split_features,
    data_identity,
    extract_features,
    feature_cache_key,
    loader_batch_size,
    require_deterministic,
    split_dataset,
)
from lightning_modules.feature_data import CachedFeatureData
from lightning_modules.probe_classifier import Pooling, ProbeClassifier, build_feature_backbone

CHECKPOINT_CLASS_KEY = "classifier_class"
"""Checkpoint entry naming the module class, read by ``checkpoints.load_classifier``."""


def probe_adam(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam with learning rate 3e-4, the probe optimiser of Finer-CAM (Sec. 4.1)."""
    return torch.optim.Adam(parameters, lr=3e-4)


class LinearProbeModule(ClassificationSteps, L.LightningModule):
    """A linear probe ``logits = W φ(x) + b`` on a frozen backbone ``φ`` (Finer-CAM Sec. 4.1 and
    App. B.3: CLIP / DINOv2 encoders, Adam 3e-4, 100 epochs), trained with cross-entropy on the
    head only. ``self.model`` is a :class:`ProbeClassifier`, an ordinary images → logits network,
    so checkpoints load for evaluation and saliency methods explain it (layer paths
    ``backbone.<name>``). The backbone stays in eval mode, also while the head trains.

    Feature cache (``feature_cache=True``): ``fit`` runs on :meth:`fit_data`, whose train and
    val loaders serve cached features instead of images — ``φ`` of each split is computed once
    (batched, no gradients, in the trainer's precision), stored under ``cache_dir`` keyed by
    backbone, weights, pooling, data and split (:mod:`lightning_modules.feature_cache`), read back on
    later runs, and the loaders yield ``{"features", "label", "index"}`` batches with the
    datamodule's batch size and the same shuffling. Caching needs deterministic samples: a
    datamodule with ``transform.train_augment=True`` is refused with a :class:`ConfigurationError`
    (set ``--data.transform.train_augment false``, or ``feature_cache: false`` to run the backbone on augmented
    images every step). Under DDP the local rank 0 computes and the others wait at a barrier,
    then read the file. Validation and test outside ``fit`` run on images.

    Args:
        backbone: ``timm:<name>`` or ``torchvision:<name>`` (its classifier removed).
        num_classes: outputs of the head.
        pretrained: start from the library's pretrained weights (local cache only offline).
        weights_path: a state dict of the headless backbone, loaded last.
        backbone_kwargs: constructor arguments (e.g. a ViT's ``img_size``).
        pooling: a timm ViT's features: ``default``, ``cls`` (class token) or ``mean_patch``
            (mean of the patch tokens; Finer-CAM's DINOv2 probe).
        optimizer: built on the head's parameters; default Adam, lr 3e-4.
        feature_cache: train on cached features (see above).
        cache_dir: where the feature files live.
    """

    def __init__(
        self,
        backbone: str = "timm:vit_base_patch16_clip_224.openai",
        num_classes: int = 10,
        pretrained: bool = True,
        weights_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        pooling: Pooling = "cls",
        optimizer: OptimizerCallable = probe_adam,
        feature_cache: bool = True,
        cache_dir: str = "outputs/cache/features",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        features, feature_dim = build_feature_backbone(
            backbone, pretrained, weights_path, pooling, backbone_kwargs
        )
        self.model = ProbeClassifier(features, nn.Linear(feature_dim, num_classes), feature_dim)
        # Lightning keeps submodule modes during fit (it warns that modules are in eval mode:
        # intended here), and train() below keeps the backbone in eval mode on later calls.
        self.model.backbone.eval()
        self.optimizer = optimizer
        self.init_accuracy(num_classes)

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def train(self, mode: bool = True) -> LinearProbeModule:
        """Set the head's mode; the frozen backbone always stays in eval mode (no dropout or
        drop-path, fixed normalisation statistics), as its cached features were computed."""
        super().train(mode)
        self.model.backbone.eval()
        return self

    def batch_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``W φ(x) + b`` from cached ``features`` or from ``image`` through the backbone."""
        if "features" in batch:
            return self.model.head(batch["features"])
        with torch.no_grad():
            features = self.model.backbone(batch["image"])
        return self.model.head(features)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.model.head.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"

    # ---------------------------------------------------------------- feature cache

    def fit_data(self, datamodule: L.LightningDataModule) -> L.LightningDataModule:
        """The datamodule to fit on: with ``feature_cache`` the train and val splits of
        ``datamodule`` as cached features
        (:class:`~lightning_modules.feature_data.CachedFeatureData`), else ``datamodule`` itself. ``train.py`` fits on it:
        ``trainer.fit(probe, datamodule=probe.fit_data(datamodule))``."""
        if not self.hparams.feature_cache:
            return datamodule
        return CachedFeatureData(datamodule, self)

    def setup(self, stage: str) -> None:
        if stage != "fit" or not self.hparams.feature_cache:
            return
        if not isinstance(self.trainer.datamodule, CachedFeatureData):
            raise ConfigurationError(
                "feature_cache=true trains the head on cached features of the datamodule's "
                "splits: fit with trainer.fit(probe, datamodule=probe.fit_data(datamodule)) "
                "(as train.py does), or set feature_cache=false to train on images"
            )

    def backbone_identity(self) -> dict[str, Any]:
        """What the features depend on besides the data: backbone name, constructor arguments,
        pooling, a hash of its weights and the trainer's precision."""
        trainer = self._trainer
        return {
            "name": self.hparams.backbone,
            "backbone_kwargs": self.hparams.backbone_kwargs,
            "pooling": self.hparams.pooling,
            "feature_dim": self.model.head.in_features,
            "weights": model_fingerprint(self.model.backbone),
            "precision": "32-true" if trainer is None else str(trainer.precision),
        }

    def cache_key(self, datamodule: Any, split: str) -> dict[str, Any]:
        """The cache key of ``split`` of ``datamodule`` (:func:`feature_cache_key`)."""
        dataset = split_dataset(datamodule, split)
        return feature_cache_key(
            self.backbone_identity(), data_identity(datamodule, dataset, split)
        )

    def cached_features(self, datamodule: Any, split: str) -> CachedFeatures:
        """``φ`` of every sample of ``split`` of ``datamodule``: read from ``cache_dir``, else
        computed once (on this module's device, the datamodule's batch size and workers) and
        written there. Refuses splits whose samples are not deterministic."""
        dataset = split_dataset(datamodule, split)
        require_deterministic(datamodule, dataset, split)
        key = feature_cache_key(self.backbone_identity(), data_identity(datamodule, dataset, split))
        path = cache_path(self.hparams.cache_dir, key, f"{self.hparams.backbone}-{split}")
        trainer = self._trainer

        def compute() -> CachedFeatures:
            return extract_features(
                self.model.backbone,
                dataset,
                batch_size=loader_batch_size(datamodule),
                device=self.device,
                num_workers=int(getattr(datamodule, "num_workers", 0)),
                forward_context=(
                    nullcontext if trainer is None else trainer.precision_plugin.forward_context
                ),
            )

        if trainer is None:
            return cached_split_features(path, key, compute)
        return cached_split_features(
            path,
            key,
            compute,
            compute_here=trainer.local_rank == 0,
            barrier=lambda: trainer.strategy.barrier("linear_probe_feature_cache"),
        )
