"""Hugging Face ``transformers`` image classifiers (``hf:<directory or repo id>``), offline.

Random-init ViT, Swin, ConvNeXt and ResNet built from tiny configs and saved with
``save_pretrained`` (plus an image processor config) stand in for downloaded models: the
loading code is the real one. Checked: logits out of the ``ModelOutput``, each family's
default layer and its layout, Grad-CAM parity with pytorch-grad-cam on the ViT with a
reshape transform, CASE and Finer-CAM maps, CAAP on the ViT through the timm view of its
modules (parallel = loop, and the closed form "everything patched = the model's logit"),
the processor's transform, offline errors, and ``evaluate.py`` end to end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    DeiTConfig,
    DeiTForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

import evaluate
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.feature_layout import detect_layout
from contrastive_saliency.huggingface import HuggingFaceClassifier
from contrastive_saliency.layers import capture_layer, default_layer
from contrastive_saliency.methods import create_method
from contrastive_saliency.targets import ConfusionContrast
from datamodules.transforms import config_from_model
from lightning_modules.backbones import build_backbone
from tests.fabricated_data import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
CLASSES = 4
SIZE = 32
MEAN, STD = [0.45, 0.45, 0.45], [0.25, 0.25, 0.25]


def _vit() -> ViTForImageClassification:
    config = ViTConfig(
        image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=64, num_labels=CLASSES,
    )  # fmt: skip
    return ViTForImageClassification(config)


def _swin() -> SwinForImageClassification:
    config = SwinConfig(
        image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
        window_size=4, num_labels=CLASSES,
    )  # fmt: skip
    return SwinForImageClassification(config)


def _convnext() -> ConvNextForImageClassification:
    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=CLASSES)
    return ConvNextForImageClassification(config)


def _resnet() -> ResNetForImageClassification:
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
        num_labels=CLASSES,
    )  # fmt: skip
    return ResNetForImageClassification(config)


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    processor: str  # "vit" (fixed height × width) or "convnext" (shortest edge + crop_pct)
    layer: str  # the expected default layer
    layout: str
    prefix_tokens: int
    grid: tuple[int, int]


FAMILIES = {
    "vit": Family(_vit, "vit", "hf.vit.layers.2.layernorm_before", "tokens", 1, (4, 4)),
    "swin": Family(_swin, "vit", "hf.swin.layernorm", "tokens", 0, (4, 4)),
    "convnext": Family(_convnext, "convnext", "hf.convnext.encoder.stages.1", "nchw", 0, (4, 4)),
    "resnet": Family(_resnet, "convnext", "hf.resnet.encoder.stages.1", "nchw", 0, (4, 4)),
}


def _processor(kind: str):
    if kind == "vit":
        return ViTImageProcessor(
            size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD
        )
    return ConvNextImageProcessor(
        size={"shortest_edge": SIZE}, crop_pct=0.8, image_mean=MEAN, image_std=STD
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Each family saved as a user's model directory (weights + config + processor)."""
    folders = {}
    for name, family in FAMILIES.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(f"hf-{name}")
        family.build().save_pretrained(folder)
        _processor(family.processor).save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _load(folder: Path) -> HuggingFaceClassifier:
    return build_backbone(f"hf:{folder}", CLASSES, pretrained=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_loads_with_its_default_layer_layout_and_maps(family, saved, images):
    expected = FAMILIES[family]
    layer = expected.layer
    model = _load(saved[family])
    assert isinstance(model, HuggingFaceClassifier) and not model.training
    reference = model.hf(pixel_values=images).logits  # the ModelOutput, unwrapped
    logits = model(images)
    assert logits.shape == (2, CLASSES) and torch.equal(logits, reference)
    assert default_layer(model) == layer
    with capture_layer(model, layer, track_gradient=False) as capture:
        model(images)
    layout = detect_layout(model, layer, capture.output(), images.shape[-2:])
    assert (layout.kind, layout.num_prefix_tokens) == (expected.layout, expected.prefix_tokens)
    assert tuple(layout.to_grid(capture.output()).shape[-2:]) == expected.grid

    classes = logits.topk(2, dim=1).indices
    matrix = torch.ones(CLASSES, CLASSES)
    for name, kwargs in [
        ("grad_cam", {}),
        ("case", {"contrast": ConfusionContrast(matrix, k=2)}),
        ("finer_cam", {}),
    ]:
        maps = create_method(name, model, **kwargs)(images, classes)
        assert maps.shape == (2, 2, SIZE, SIZE), name
        assert torch.isfinite(maps).all() and maps.amax() > 0, name


def test_grad_cam_on_the_hf_vit_matches_pytorch_grad_cam_with_a_reshape(saved, images):
    model = _load(saved["vit"])
    layer = FAMILIES["vit"].layer
    classes = model(images).topk(2, dim=1).indices
    ours = create_method("grad_cam", model).compute(images, classes)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:  # pytorch-grad-cam's ViT recipe
        patches = tokens[:, 1:, :]
        return patches.reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)

    with GradCAM(
        model=model, target_layers=[model.get_submodule(layer)], reshape_transform=reshape
    ) as reference:
        for k in range(classes.shape[1]):
            targets = [ClassifierOutputTarget(int(c)) for c in classes[:, k]]
            expected = reference(input_tensor=images, targets=targets)
            low = np.maximum(ours[:, k].numpy(), 0)
            got = scale_cam_image(scale_cam_image(low, (SIZE, SIZE)))
            assert got.max() > 0.5, "a degenerate all-zero comparison proves nothing"
            np.testing.assert_allclose(got, expected, atol=1e-4)
    model.zero_grad(set_to_none=True)


def test_caap_runs_on_the_hf_vit_through_the_timm_view_of_its_modules(saved, images):
    model = _load(saved["vit"])
    view = model.as_vision_transformer()
    # the same modules, not copies: and so the same logits
    assert view.blocks[0].norm1 is model.hf.vit.layers[0].layernorm_before
    assert view.head is model.hf.classifier
    torch.testing.assert_close(view(images), model(images), rtol=0, atol=1e-6)
    classes = model(images).topk(2, dim=1).indices
    # CAAP's white blank needs the images' normalisation (evaluate.py passes the data's; the
    # HF ViT image processor's default is mean = std = 0.5)
    white = {"normalisation": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
    parallel = create_method("caap", model, mode="parallel", **white)(images, classes)
    loop = create_method("caap", model, mode="loop", **white)(images, classes)
    assert parallel.shape == (2, 2, SIZE, SIZE)
    torch.testing.assert_close(parallel, loop, rtol=0, atol=1e-4)
    # caap.md Alg. 1: every patch patched at every layer gives the model's own logit
    everything = torch.ones(16, 16, dtype=torch.bool)
    full = create_method("caap", model, selection=everything, layers=(0, 3), **white).compute(
        images, classes
    )
    expected = model(images).gather(1, classes)
    torch.testing.assert_close(full.amin(dim=(-2, -1)), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(full.amax(dim=(-2, -1)), expected, rtol=0, atol=1e-4)


def test_prefix_tokens_of_deit_are_class_and_distillation(images):
    config = DeiTConfig(
        image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=CLASSES,
    )  # fmt: skip
    model = HuggingFaceClassifier(DeiTForImageClassification(config).eval())
    assert model.num_prefix_tokens == 2
    maps = create_method("grad_cam", model)(images, torch.tensor([0, 1]))
    assert maps.shape == (2, 1, SIZE, SIZE) and maps.amax() > 0


def test_caap_on_a_non_vit_hf_model_says_what_it_needs(saved):
    with pytest.raises(ConfigurationError, match="ViTForImageClassification"):
        create_method("caap", _load(saved["convnext"]))


def test_the_transform_comes_from_the_image_processor(saved):
    vit = config_from_model(f"hf:{saved['vit']}")
    assert (vit.image_size, vit.resize_size, vit.mean, vit.std) == (
        SIZE, None, tuple(MEAN), tuple(STD),
    )  # fmt: skip
    convnext = config_from_model(f"hf:{saved['convnext']}")
    assert (convnext.image_size, convnext.resize_size, convnext.interpolation) == (
        SIZE, 40, "bicubic",
    )  # fmt: skip


def test_missing_models_and_files_are_clear_offline_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigurationError) as error:
        build_backbone("hf:someone/not-downloaded", CLASSES, pretrained=True)
    message = str(error.value)
    assert "not in the local Hugging Face cache" in message
    assert "uv run hf download someone/not-downloaded" in message
    with pytest.raises(ConfigurationError, match="no such directory"):
        build_backbone(f"hf:{tmp_path / 'nowhere'}", CLASSES, pretrained=True)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps(_vit().config.to_dict()))
    with pytest.raises(ConfigurationError, match=r"preprocessor_config\.json not found"):
        config_from_model(f"hf:{tmp_path / 'bare'}")


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    per_class = {"train": 1, "val": 1, "test": 2}
    return make_image_folder(
        tmp_path_factory.mktemp("hf-data"), classes=("a", "b", "c", "d"), per_class=per_class
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_evaluate_py_explains_an_hf_model_from_a_directory(
    family, saved, user_folder, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    model = f"hf:{saved[family]}"
    evaluation = evaluate.main([
        "--model.model_name", model, "--model.pretrained", "true",
        "--data", "configs/data/image_folder.yaml", "--data.root", str(user_folder),
        "--data.transform.from_model", model, "--data.batch_size", "8",
        "--data.num_workers", "0",
        "--evaluation.methods", "[grad_cam, finer_cam]", "--evaluation.targets", "[top1]",
        "--evaluation.metrics", "[deletion_auc]", "--evaluation.gallery_size", "2",
        "--output_dir", str(tmp_path), "--run_name", family, "--wandb.mode", "disabled",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    assert (tmp_path / family / "manifest.json").is_file()
    summary = evaluation.summary.set_index(["method", "metric"])
    assert set(summary["layer"]) == {FAMILIES[family].layer}
    assert (summary["n"] == 8).all() and np.isfinite(summary["mean"]).all()


def test_a_data_transform_that_differs_from_the_processor_is_named(saved):
    from types import SimpleNamespace

    from datamodules.transforms import TransformConfig
    from lightning_modules.evaluation import _processor_mismatch

    model = f"hf:{saved['vit']}"
    data = SimpleNamespace(transform_config=TransformConfig(64, None))  # ImageNet mean/std
    message = _processor_mismatch(model, data)
    assert "image_size 64 (processor: 32)" in message and "mean" in message
    assert f"--data.transform.from_model {model}" in message
    matching = SimpleNamespace(transform_config=config_from_model(model))
    assert _processor_mismatch(model, matching) is None


def test_train_py_backbone_hf_fine_tunes_with_a_new_head(saved, images):
    """``--model.backbone hf:<dir>`` in train.py: a head of the new size, gradients reach the
    HF model's own parameters."""
    from lightning_modules.classifier import ClassifierModule

    module = ClassifierModule(backbone=f"hf:{saved['resnet']}", num_classes=2, pretrained=True)
    logits = module(images)
    assert logits.shape == (2, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    stem = module.model.hf.resnet.embedder.embedder.convolution.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
