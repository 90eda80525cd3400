"""The CASE layer protocol (``protocol:case``): the layer CASE explains, per architecture, for
torchvision and timm names; studies configured with it run every method at that layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import yaml
from torch import nn

from callbacks.evaluation import SaliencyEvaluationCallback
from contrastive_saliency.errors import ConfigurationError, UnknownLayerError
from contrastive_saliency.layers import case_layer, default_layer, layer_path
from lightning_modules.small_cnn import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent

CASE_LAYERS = {
    ("torchvision", "resnet50"): "layer4.2.conv3",  # CASE's ResNet-50
    ("torchvision", "resnet18"): "layer4.1.conv2",  # basic blocks: their last conv
    ("torchvision", "wide_resnet50_2"): "layer4.2.conv3",
    ("torchvision", "densenet121"): "features.denseblock4.denselayer16.conv2",
    ("torchvision", "densenet201"): "features.denseblock4.denselayer32.conv2",  # CASE's
    ("torchvision", "vgg19_bn"): "features.49",  # CASE's
    ("torchvision", "convnext_large"): "features.7.2.block.0",  # CASE's
    ("timm", "resnet50"): "layer4.2.conv3",
    ("timm", "resnet18"): "layer4.1.conv2",
    ("timm", "seresnet50"): "layer4.2.conv3",  # not the squeeze-excitation's 1x1 convs
    ("timm", "densenet121"): "features.denseblock4.denselayer16.conv2",
    ("timm", "densenet201"): "features.denseblock4.denselayer32.conv2",
    ("timm", "vgg19_bn"): "features.49",
    ("timm", "convnext_atto"): "stages.3.blocks.1.conv_dw",
}


def _build(source: str, name: str, **kwargs) -> nn.Module:
    if source == "torchvision":
        return torchvision.models.get_model(name, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def test_case_layer_per_architecture_and_its_differences_from_the_defaults():
    with torch.device("meta"):  # structure only: no weights are initialised
        models = {key: _build(*key) for key in CASE_LAYERS}
    found = {key: case_layer(model) for key, model in models.items()}
    assert found == CASE_LAYERS
    for key, model in models.items():
        assert isinstance(model.get_submodule(found[key]), nn.Conv2d), key
    # The generic defaults are other layers (CASE Table II: the layer changes RQ1).
    assert default_layer(models["torchvision", "resnet50"]) == "layer4"
    assert default_layer(models["torchvision", "densenet201"]) == "features.norm5"
    assert default_layer(models["torchvision", "vgg19_bn"]) == "features.52"
    # A model declaring its saliency layer keeps it.
    assert case_layer(SmallCNN(10)) == SmallCNN(10).default_saliency_layer


def test_the_protocol_gives_the_layers_the_case_imagenet_configs_name():
    configs = sorted((REPO / "configs" / "experiment").glob("case_*.yaml"))
    checked = 0
    for path in configs:
        config = yaml.safe_load(path.read_text())
        name = (config.get("model") or {}).get("model_name")
        if name is None:
            continue
        source, _, architecture = name.partition(":")
        with torch.device("meta"):
            model = _build(source, architecture)
        assert case_layer(model) == config["evaluation"]["layers"][0], path.name
        checked += 1
    assert checked == 4  # ResNet-50, VGG-19-bn, ConvNeXt-L, DenseNet-201


def test_uncovered_architectures_and_unknown_protocols_fail_clearly():
    with torch.device("meta"):
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        efficientnet = torchvision.models.efficientnet_b0()
    for model in (vit, efficientnet, nn.Sequential(nn.Conv2d(3, 4, 3))):
        with pytest.raises(ConfigurationError, match=r"does not cover .*ResNet.*DenseNet.*VGG"):
            layer_path(model, "protocol:case")
    with pytest.raises(ConfigurationError, match=r"unknown layer protocol 'protocol:cas'.*case"):
        layer_path(efficientnet, "protocol:cas")
    assert layer_path(vit, None) is None
    assert layer_path(vit, "blocks.0.norm1") == "blocks.0.norm1"
    with pytest.raises(UnknownLayerError, match="nearest valid names"):
        layer_path(vit, "blocks.0.norm3")


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("torchvision", "resnet50"),
        ("torchvision", "resnet18"),
        ("torchvision", "densenet121"),
        ("timm", "resnet18"),
        ("timm", "densenet121"),
        ("timm", "convnext_atto"),
    ],
)
def test_a_study_with_protocol_case_runs_every_method_at_the_case_layer(source, name):
    torch.manual_seed(0)
    model = _build(source, name, num_classes=4).eval()
    counts = np.eye(4) * 10 + 1
    evaluation = SaliencyEvaluationCallback(
        methods=["grad_cam", {"name": "case", "kwargs": {"contrast": {"selector": "confusion"}}},
                 "input_x_gradient"],
        layers=["protocol:case"],
    )  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    sample = {"image": images[0], "label": 0, "index": 0}
    evaluation.prepare(model, sample, counts)
    layers = {c.spec.label: c.layer for c in evaluation.combinations}
    expected = CASE_LAYERS[source, name]
    assert layers == {"grad_cam": expected, "case": expected, "input_x_gradient": "input"}
    classes = torch.tensor([[0, 1], [2, 3]])
    for combination in evaluation.combinations:
        maps = combination.maps(images, classes)
        assert maps.shape == (2, 2, 32, 32) and torch.isfinite(maps).all()
