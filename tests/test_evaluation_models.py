"""SaliencyEvaluationModule's model sources: a checkpoint, a network by name, a frozen backbone
by name with a linear-probe head (logits checked against a hand-written forward pass)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import contrastive_saliency.methods  # noqa: F401  (registers the methods)
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.layers import default_layer
from contrastive_saliency.methods.registry import create_method
from lightning_modules.evaluation import SaliencyEvaluationModule
from lightning_modules.probe_classifier import load_linear_head

pytestmark = pytest.mark.usefixtures("one_thread")


def _save_head(path: Path, weight: torch.Tensor, bias: torch.Tensor, prefix: str = "") -> Path:
    torch.save({f"{prefix}weight": weight, f"{prefix}bias": bias}, path)
    return path


def test_timm_model_by_name_gives_logits_in_eval_mode():
    torch.manual_seed(0)
    module = SaliencyEvaluationModule(model_name="timm:resnet18", num_classes=7)
    network = module.network
    assert not network.training and not module.training
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = network(images)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert module.num_classes == 7 and module.hparams.num_classes == 7
    torch.testing.assert_close(module(images), logits)  # forward is the network
    assert module.source_name == "timm-resnet18"
    assert module.checkpoint_path is None and module.confusion_matrix_path is None
    assert module.source_description == "model timm:resnet18"


@pytest.mark.parametrize("model_name", ["timm:resnet18", "torchvision:resnet18"])
def test_pretrained_weights_missing_offline_name_the_model(model_name, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import: the variables alone come too late.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # num_classes left out: the pretrained head's size is looked up, then the weights fail.
    with pytest.raises(ConfigurationError, match=f"pretrained weights for {model_name} "):
        SaliencyEvaluationModule(model_name=model_name, pretrained=True)
    assert not any(tmp_path.rglob("*.pth")) and not any(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (
            {"checkpoint": "run/last.ckpt", "model_name": "timm:resnet18"},
            ("not both", "checkpoint='run/last.ckpt'", "model_name='timm:resnet18'"),
        ),
        ({"model_name": "timm:resnet18"}, ("num_classes is required", "timm:resnet18")),
        ({"head_path": "head.pt"}, ("head_path='head.pt'", "need(s) --model.model_name")),
        (
            {"checkpoint": "run/last.ckpt", "backbone_kwargs": {"img_size": 32}},
            ("backbone_kwargs={'img_size': 32}", "checkpoint carries its own network"),
        ),
        ({"model_name": "timm:resnet18", "num_classes": 3, "pooling": "cls"}, ("head_path",)),
        (
            {"model_name": "timm:vit_small_patch14_dinov2", "pretrained": True},
            ("has no pretrained classifier head", "--model.head_path"),
        ),
    ],
)
def test_conflicting_or_missing_arguments_are_configuration_errors(arguments, fragments):
    with pytest.raises(ConfigurationError) as error:
        SaliencyEvaluationModule(**arguments)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_probe_head_with_wrong_input_dim_is_a_clear_error(tmp_path):
    head = _save_head(tmp_path / "head.pt", torch.randn(3, 100), torch.zeros(3))
    with pytest.raises(ConfigurationError) as error:
        SaliencyEvaluationModule(model_name="timm:resnet18", head_path=str(head))
    message = str(error.value)
    for fragment in (str(head), "timm:resnet18", "takes 100 input features", "gives 512"):
        assert fragment in message, message


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"w": torch.zeros(3, 4)}, "no 'weight' or 'head.weight'"),
        ({"weight": torch.zeros(3, 4), "bias": torch.zeros(4)}, "bias must be [3]"),
        ({"head.weight": torch.zeros(12)}, "must be [N, D], got (12,)"),
    ],
)
def test_malformed_head_files_are_rejected(state, expected, tmp_path):
    torch.save(state, tmp_path / "head.pt")
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        load_linear_head(tmp_path / "head.pt")


def test_head_is_read_from_a_probe_checkpoint(tmp_path):
    """head_path takes train.py's probe checkpoint: the head is ``model.head.*`` of its state
    dict (a LinearProbeModule's layout), loaded with weights_only=True like any checkpoint."""
    torch.manual_seed(0)
    state_dict = {
        "model.backbone.blocks.0.weight": torch.randn(4, 4),
        "model.head.weight": torch.randn(3, 8),
        "model.head.bias": torch.randn(3),
    }
    torch.save({"state_dict": state_dict, "epoch": 99}, tmp_path / "last.ckpt")
    head = load_linear_head(tmp_path / "last.ckpt")
    assert torch.equal(head.weight, state_dict["model.head.weight"])
    assert torch.equal(head.bias, state_dict["model.head.bias"])


@pytest.mark.parametrize(("pooling", "prefix"), [("cls", ""), ("mean_patch", "head.")])
def test_vit_probe_logits_equal_head_of_pooled_tokens(pooling, prefix, tmp_path):
    torch.manual_seed(0)
    weight, bias = torch.randn(5, 192), torch.randn(5)
    head = _save_head(tmp_path / "head.pt", weight, bias, prefix)
    module = SaliencyEvaluationModule(
        model_name="timm:vit_tiny_patch16_224",
        head_path=str(head),
        pooling=pooling,
        backbone_kwargs={"img_size": 32},  # a 2x2 patch grid: fast
    )
    probe = module.network
    assert not probe.training and module.num_classes == 5
    assert module.source_name == "timm-vit_tiny_patch16_224-probe"
    assert not any(p.requires_grad for p in probe.backbone.parameters())

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = probe(images)
        tokens = probe.backbone.forward_features(images)  # [B, 1 + 4, 192], after the norm
    assert tokens.shape == (2, 5, 192)
    features = tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(dim=1)
    torch.testing.assert_close(logits, features @ weight.T + bias, rtol=1e-5, atol=1e-5)
    other = tokens[:, 1:].mean(dim=1) if pooling == "cls" else tokens[:, 0]
    assert not torch.allclose(logits, other @ weight.T + bias, atol=1e-3)  # pooling matters

    # Layer paths are backbone.<name>; the token layout is the backbone's (1 prefix, 2x2).
    assert default_layer(probe) == "backbone.blocks.11.norm1"
    maps = create_method("grad_cam", probe)(images, logits.argmax(1))
    assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all() and maps.amax() > 0


def test_torchvision_probe_replaces_the_last_linear(tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(512, 4)
    torch.save(linear.state_dict(), tmp_path / "head.pt")
    module = SaliencyEvaluationModule(
        model_name="torchvision:resnet18", head_path=str(tmp_path / "head.pt"), num_classes=4
    )
    backbone = module.network.backbone
    assert isinstance(backbone.fc, nn.Identity)
    assert default_layer(module.network) == "backbone.layer4"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
        x = backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(x))))
        expected = linear(backbone.avgpool(x).flatten(1))
        torch.testing.assert_close(module.network(images), expected)


def test_checkpoint_source_finds_the_training_runs_confusion_matrix(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    module = SaliencyEvaluationModule(checkpoint=str(checkpoint))
    assert module.checkpoint_path == checkpoint
    assert module.confusion_matrix_path == trained_run / "confusion_matrix.npy"
    assert module.source_name == "tiny-seed5"
    assert not module.network.training
    with torch.no_grad():
        assert module.network(torch.randn(2, 3, 64, 64)).shape == (2, module.num_classes)

    # The same checkpoint in a run directory without a confusion matrix.
    copy = tmp_path / "copied-run" / "checkpoints" / "last.ckpt"
    copy.parent.mkdir(parents=True)
    shutil.copy(checkpoint, copy)
    copied = SaliencyEvaluationModule(checkpoint=str(copy))
    assert copied.confusion_matrix_path is None and copied.source_name == "copied-run"


def test_confusion_matrix_validate_equals_the_training_runs_matrix(trained_run, tmp_path):
    """``evaluation.confusion_matrix: validate`` (models without a training run) computes the
    matrix on the validation split before evaluating: on a copy of a checkpoint without its
    run's matrix it must reproduce the matrix train.py saved for the same weights and split."""
    import numpy as np

    import evaluate
    from tests.conftest import TINY_DATA

    copy = tmp_path / "bare-run" / "checkpoints" / "last.ckpt"
    copy.parent.mkdir(parents=True)
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", copy)
    evaluate.main(
        [
            "--model.checkpoint", str(copy),
            "--seed", "5",  # the training run's seed: the same shapes splits
            "--run_name", "validated", "--output_dir", str(tmp_path),
            "--wandb.mode", "disabled", "--trainer.enable_progress_bar", "false",
            *TINY_DATA,
            "--evaluation.methods",
            "[{name: case, kwargs: {contrast: {selector: confusion, k: 1}}}]",
            "--evaluation.metrics", "[feature_agreement]",
            "--evaluation.targets", "[top1_vs_top2]",
            "--evaluation.confusion_matrix", "validate",
            "--evaluation.gallery_size", "0",
        ]
    )  # fmt: skip
    computed = np.load(tmp_path / "validated" / "confusion_matrix.npy")
    np.testing.assert_array_equal(computed, np.load(trained_run / "confusion_matrix.npy"))
    assert computed.sum() == 30  # each of the 30 validation samples once
