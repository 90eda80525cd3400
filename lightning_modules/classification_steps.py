"""Training, validation and test steps shared by every classifier module (end-to-end and
linear probe): cross-entropy, top-1/top-5 accuracy, the metric names the configs monitor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy


class ClassificationSteps:
    """Mixin for a ``LightningModule`` that calls :meth:`init_accuracy` in ``__init__`` and
    defines ``batch_logits(batch) -> [B, N]`` (the logits of a batch: from the images, or
    from cached features for a linear probe). Logs ``train/loss``, ``train/acc_top1``, ``val/loss``,
    ``val/acc_top1``, ``val/acc_top5``, ``test/acc_top1``, ``test/acc_top5``; ``test_step``
    returns the logits for the evaluation callbacks."""

    label_smoothing: float = 0.0

    def init_accuracy(self, num_classes: int) -> None:
        top5 = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.batch_logits(batch)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(1) == batch["label"]).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc_top1", accuracy, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict:
        logits = self.batch_logits(batch)
        labels = batch["label"]
        self.val_top1(logits, labels)
        self.val_top5(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("val/acc_top1", self.val_top1, prog_bar=True)
        self.log("val/acc_top5", self.val_top5)
        return {"preds": logits.argmax(1)}

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict:
        logits = self.batch_logits(batch)
        self.test_top1(logits, batch["label"])
        self.test_top5(logits, batch["label"])
        self.log("test/acc_top1", self.test_top1)
        self.log("test/acc_top5", self.test_top5)
        return {"logits": logits}
