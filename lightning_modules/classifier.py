"""ClassifierModule: train and validate an image classifier with a backbone chosen by name."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_modules.backbones import build_backbone
from lightning_modules.classification_steps import ClassificationSteps


class ClassifierModule(ClassificationSteps, L.LightningModule):
    """A classifier ``model`` (images → logits) with cross-entropy training.

    The network lives in ``self.model``; saliency methods receive ``module.model`` and layer
    paths relative to it (e.g. ``layer4`` for a ResNet), the names the papers use.

    Args:
        backbone: ``small_cnn``, ``timm:<name>`` or ``torchvision:<name>``.
        num_classes: outputs of the head.
        pretrained: start from the library's pretrained weights (local cache only offline).
        weights_path: optional state-dict file loaded into the network.
        optimizer: any torch optimizer, configured as ``class_path``/``init_args``.
        scheduler: learning-rate schedule stepped every batch: ``onecycle`` (warm-up then
            cosine decay from the optimizer's lr), ``cosine`` (decay only) or ``none``.
        warmup_fraction: share of the steps spent warming up (``onecycle`` only).
        label_smoothing: cross-entropy label smoothing.
        backbone_kwargs: constructor arguments of the timm / torchvision model (e.g. a ViT's
            ``img_size``, ``patch_size``, ``depth``, ``embed_dim`` for the 64² benchmark).
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        num_classes: int = 10,
        pretrained: bool = False,
        weights_path: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: Literal["onecycle", "cosine", "none"] = "onecycle",
        warmup_fraction: float = 0.15,
        label_smoothing: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.model: nn.Module = build_backbone(
            backbone, num_classes, pretrained, weights_path, model_kwargs=backbone_kwargs
        )
        self.optimizer = optimizer
        self.label_smoothing = label_smoothing
        self.init_accuracy(num_classes)

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def batch_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["image"])

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.hparams.scheduler == "none":
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        if self.hparams.scheduler == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[group["lr"] for group in optimizer.param_groups],
                total_steps=total_steps,
                pct_start=self.hparams.warmup_fraction,
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
