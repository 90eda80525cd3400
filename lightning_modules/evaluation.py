"""SaliencyEvaluationModule: the classifier to explain, from a checkpoint, by name, or as a
backbone by name with a linear-probe head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from lightning_modules.backbones import build_backbone
from lightning_modules.checkpoints import load_classifier, newest_checkpoint
from lightning_modules.probe_classifier import (
    Pooling,
    ProbeClassifier,
    build_feature_backbone,
    load_linear_head,
)


class SaliencyEvaluationModule(L.LightningModule):
    """Holds the classifier to explain; ``test_step`` returns its logits for the callbacks.

    The classifier comes from exactly one source: a ``train.py`` checkpoint (``checkpoint``, by
    default the newest under ``outputs_dir``), a network by name (``model_name``), or a frozen
    backbone by name plus a linear-probe head (``model_name`` and ``head_path``).

    Args:
        checkpoint: a ``train.py`` checkpoint; default: the newest under ``outputs_dir``.
        num_classes: classes of a model by name (needed unless ``pretrained`` weights define
            them); for a checkpoint or probe head, a guard that must equal theirs.
        outputs_dir: where to look for the newest checkpoint.
        model_name: ``timm:<name>``, ``torchvision:<name>``, ``hf:<repo id or directory>``
            (a Hugging Face image classifier) or ``small_cnn`` (see
            :func:`~lightning_modules.backbones.build_backbone`).
        pretrained: start from the library's default weights (local cache only offline).
        weights_path: a state-dict file loaded into the network (for a probe: the backbone
            without its classifier).
        head_path: a ``torch.save`` file with a linear head ``weight`` ``[N, D]`` and ``bias``
            ``[N]`` (or ``head.weight`` / ``head.bias``) on top of ``model_name``'s features.
        pooling: a timm ViT probe's features: ``default`` (the model's own), ``cls`` (class
            token) or ``mean_patch`` (mean of the patch tokens, Finer-CAM's DINOv2 probe).
        backbone_kwargs: constructor arguments of ``model_name`` (timm ``create_model`` /
            torchvision ``get_model``, e.g. a ViT's ``img_size``), as for ``ClassifierModule``.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        num_classes: int | None = None,
        outputs_dir: str = "outputs",
        model_name: str | None = None,
        pretrained: bool = False,
        weights_path: str | None = None,
        head_path: str | None = None,
        pooling: Pooling = "default",
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_source_arguments(
            checkpoint, model_name, pretrained, weights_path, head_path, pooling, backbone_kwargs
        )
        self.checkpoint_path: Path | None = None
        self.model_name = model_name
        self.head_path = Path(head_path) if head_path is not None else None
        if model_name is None:
            path = Path(checkpoint) if checkpoint is not None else newest_checkpoint(outputs_dir)
            if not path.is_file():
                raise ConfigurationError(
                    f"checkpoint not found: {path}; run `uv run python train.py` first or pass "
                    f"an existing file to --model.checkpoint"
                )
            self.checkpoint_path = path
            classifier = load_classifier(path)
            self.model: nn.Module = classifier.model
            source_classes = classifier.num_classes
        elif head_path is None:
            source_classes = num_classes
            if source_classes is None:
                if not pretrained:
                    raise ConfigurationError(
                        f"--model.num_classes is required with --model.model_name={model_name} "
                        f"unless --model.pretrained true keeps the pretrained head"
                    )
                source_classes = _pretrained_num_classes(model_name)
            self.model = build_backbone(
                model_name,
                source_classes,
                pretrained,
                weights_path,
                model_kwargs=backbone_kwargs,
            )
        else:
            head = load_linear_head(self.head_path)  # before the (slower) backbone
            backbone, feature_dim = build_feature_backbone(
                model_name, pretrained, weights_path, pooling, backbone_kwargs
            )
            self.model = _probe(backbone, head, feature_dim, model_name, self.head_path, pooling)
            source_classes = self.model.head.out_features
        self.eval()  # also the network: it is only ever explained, never trained here
        self._num_classes = source_classes
        self.save_hyperparameters(
            {
                "checkpoint": None if self.checkpoint_path is None else str(self.checkpoint_path),
                "num_classes": source_classes,
                "model_name": model_name,
                "pretrained": pretrained,
                "weights_path": weights_path,
                "head_path": head_path,
                "pooling": pooling,
                "backbone_kwargs": backbone_kwargs,
            }
        )
        if num_classes is not None and num_classes != source_classes:
            raise ConfigurationError(
                f"--model.num_classes={num_classes} does not match {self.source_description}, "
                f"which has {source_classes} classes"
            )

    @property
    def network(self) -> nn.Module:
        """The plain network (images → logits) that saliency methods explain."""
        return self.model

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def source_name(self) -> str:
        """A short name for run directories: the training run's directory for a checkpoint in
        ``<run>/checkpoints/``, else the file's stem; the model name (``:`` and ``/`` replaced
        by ``-``) for a model by name, plus ``-probe`` with a linear head."""
        if self.checkpoint_path is not None:
            run_dir = self._training_run_dir
            return run_dir.name if run_dir is not None else self.checkpoint_path.stem
        name = self.model_name.replace(":", "-").replace("/", "-")
        return f"{name}-probe" if self.head_path is not None else name

    @property
    def source_description(self) -> str:
        """What is explained, for messages and reports: the checkpoint, or the model by name."""
        if self.checkpoint_path is not None:
            return f"checkpoint {self.checkpoint_path}"
        hparams = self.hparams
        extras = ["pretrained"] if hparams.pretrained else []
        if hparams.weights_path is not None:
            extras.append(f"weights {hparams.weights_path}")
        if self.head_path is not None:
            extras.append(f"linear head {self.head_path}, pooling {hparams.pooling}")
        return f"model {self.model_name}" + (f" ({'; '.join(extras)})" if extras else "")

    @property
    def confusion_matrix_path(self) -> Path | None:
        """``<run>/confusion_matrix.npy`` written by ``train.py`` next to ``<run>/checkpoints/``,
        if it exists (CASE's contrast classes come from it); else None."""
        run_dir = self._training_run_dir
        if run_dir is None or not (run_dir / "confusion_matrix.npy").is_file():
            return None
        return run_dir / "confusion_matrix.npy"

    @property
    def _training_run_dir(self) -> Path | None:
        if self.checkpoint_path is None or self.checkpoint_path.parent.name != "checkpoints":
            return None
        return self.checkpoint_path.parent.parent

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"logits": self(batch["image"])}

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        """Predictions for ``evaluation.confusion_matrix: validate`` (CASE's contrast classes)."""
        with torch.no_grad():
            return {"preds": self(batch["image"]).argmax(dim=1)}

    def on_validation_start(self) -> None:
        self.on_test_start()

    def on_test_start(self) -> None:
        data_classes = getattr(self.trainer.datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ConfigurationError(
                f"the data has {data_classes} classes but {self.source_description} predicts "
                f"{self.num_classes}: evaluate on the dataset the model was trained on"
            )
        mismatch = _processor_mismatch(self.model_name, self.trainer.datamodule)
        if mismatch:
            rank_zero_warn(mismatch)


def _processor_mismatch(model_name: str | None, datamodule) -> str | None:
    """For a Hugging Face model: how the data's transform differs from the model's image
    processor (size, mean, std), or None (same, no processor config, or not an ``hf:`` model)."""
    config = getattr(datamodule, "transform_config", None)
    if model_name is None or not model_name.startswith("hf:") or config is None:
        return None
    from datamodules.transforms import config_from_image_processor

    try:
        expected = config_from_image_processor(model_name)
    except ConfigurationError:
        return None
    differs = [
        f"{key} {getattr(config, key)} (processor: {getattr(expected, key)})"
        for key in ("image_size", "mean", "std")
        if getattr(config, key) != getattr(expected, key)
    ]
    if not differs:
        return None
    return (
        f"the data transform differs from {model_name}'s image processor: {'; '.join(differs)}; "
        f"pass --data.transform.from_model {model_name} to use the processor's"
    )


def _check_source_arguments(
    checkpoint: str | None,
    model_name: str | None,
    pretrained: bool,
    weights_path: str | None,
    head_path: str | None,
    pooling: str,
    backbone_kwargs: dict[str, Any] | None,
) -> None:
    """Reject combinations that would silently ignore an argument."""
    if checkpoint is not None and model_name is not None:
        raise ConfigurationError(
            f"give either --model.checkpoint or --model.model_name, not both "
            f"(checkpoint={checkpoint!r}, model_name={model_name!r})"
        )
    if model_name is None:
        given = [
            f"{name}={value!r}"
            for name, value, unset in (
                ("pretrained", pretrained, False),
                ("weights_path", weights_path, None),
                ("head_path", head_path, None),
                ("pooling", pooling, "default"),
                ("backbone_kwargs", backbone_kwargs or None, None),
            )
            if value != unset
        ]
        if given:
            raise ConfigurationError(
                f"{', '.join(given)} need(s) --model.model_name (a network by name); a "
                f"checkpoint carries its own network and weights"
            )
    if pooling != "default" and head_path is None:
        raise ConfigurationError(
            f"pooling={pooling!r} applies to a linear probe: also pass --model.head_path"
        )


def _pretrained_num_classes(model_name: str) -> int:
    """Classes of the library's default pretrained weights of ``model_name`` (timm: the
    pretrained config; torchvision: the default weights' categories; hf: the model's config)."""
    source, _, name = model_name.partition(":")
    count: int | None = None
    known = False
    if source == "timm":
        import timm

        known = timm.is_model(name)
        config = timm.get_pretrained_cfg(name) if known else None
        count = None if config is None else config.num_classes
    elif source == "torchvision":
        import torchvision

        known = name in torchvision.models.list_models()
        if known:
            meta = torchvision.models.get_model_weights(name).DEFAULT.meta
            count = len(meta["categories"]) if "categories" in meta else None
    elif source == "hf":
        from lightning_modules.backbones import hf_config

        known, count = True, int(hf_config(model_name).num_labels)
    if not known:
        # Unknown model or a source without pretrained weights: build_backbone explains which.
        build_backbone(model_name, 1, pretrained=True)
    if not count:
        raise ConfigurationError(
            f"{model_name} has no pretrained classifier head (pretrained classes: {count}); pass "
            f"--model.num_classes, or --model.head_path for a linear probe on its features"
        )
    return count


def _probe(
    backbone: nn.Module,
    head: nn.Linear,
    feature_dim: int,
    model_name: str,
    head_path: Path,
    pooling: Pooling,
) -> ProbeClassifier:
    """``ProbeClassifier``, its dimension error naming the head file and the backbone."""
    try:
        return ProbeClassifier(backbone, head, feature_dim)
    except ConfigurationError as error:
        raise ConfigurationError(
            f"linear head {head_path} does not fit {model_name} (pooling {pooling}): {error}"
        ) from error
