"""LinearProbeModule and its feature cache: features computed once and reused, keys that follow
backbone / pooling / split / data / transform, the same head updates from cached features as
through the frozen backbone, checkpoints that load for evaluation, the shipped configs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import contrastive_saliency.methods.gradient_cams  # noqa: F401  (registers grad_cam)
import train
from callbacks.confusion_matrix import confusion_matrix
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods.registry import create_method
from datamodules import ImageFolderDataModule, ShapesDataModule
from datamodules.transforms import TransformConfig
from lightning_modules.checkpoints import load_classifier
from lightning_modules.feature_cache import FeatureDataset, cache_path, image_batch
from lightning_modules.linear_probe import LinearProbeModule
from lightning_modules.probe_classifier import ProbeClassifier, build_feature_backbone
from tests.conftest import tiny_train_args

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "configs" / "experiment").glob("linear_probe_*.yaml"))
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}  # a 4x4 token grid, two blocks


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _probe(cache_dir: Path, seed: int = 0, **overrides) -> LinearProbeModule:
    torch.manual_seed(seed)
    arguments = {
        "backbone": "timm:vit_tiny_patch16_224",
        "num_classes": 10,
        "pretrained": False,
        "backbone_kwargs": TINY_VIT,
        "pooling": "mean_patch",
        "cache_dir": str(cache_dir),
        **overrides,
    }
    return LinearProbeModule(**arguments)


def _shapes(**overrides) -> ShapesDataModule:
    arguments = {"image_size": 32, "train_size": 40, "val_size": 12, "test_size": 4}
    return ShapesDataModule(**{**arguments, "batch_size": 16, **overrides})


def _count_calls(module: torch.nn.Module) -> list[bool]:
    """One entry per forward call of ``module``: whether it was in training mode."""
    calls: list[bool] = []
    module.register_forward_hook(lambda *_: calls.append(module.training))
    return calls


def _fit(module: LinearProbeModule, datamodule: ShapesDataModule) -> L.Trainer:
    L.seed_everything(7, verbose=False)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=module.fit_data(datamodule))
    return trainer


def test_feature_cache_fits_through_fit_data_not_the_image_datamodule(tmp_path):
    """The cached features reach fit as a datamodule of their own (Lightning takes the loaders
    of trainer.fit(module, datamodule=...) from the datamodule): fitting a caching probe on the
    image datamodule directly is refused before any feature is computed."""
    datamodule = _shapes()
    module = _probe(tmp_path)
    fit_data = module.fit_data(datamodule)
    assert (fit_data.num_classes, fit_data.class_names) == (10, datamodule.class_names)
    assert fit_data.split_source("val") == datamodule.split_source("val")
    assert fit_data.hparams == datamodule.hparams  # logged as the image datamodule's
    assert _probe(tmp_path / "unused", feature_cache=False).fit_data(datamodule) is datamodule
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ConfigurationError, match=r"probe\.fit_data\(datamodule\)"):
        trainer.fit(module, datamodule=datamodule)
    assert not any(tmp_path.iterdir())


def test_fit_caches_once_reuses_and_equals_training_through_the_backbone(tmp_path):
    datamodule = _shapes()
    first = _probe(tmp_path)
    initial = copy.deepcopy(first.model.state_dict())
    calls = _count_calls(first.model.backbone)
    trainer = _fit(first, datamodule)
    # Extraction only: ceil(40/16) train + ceil(12/16) val batches, none during 2 epochs.
    assert len(calls) == 3 + 1
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json", ".pt", ".pt"]
    assert {"train/loss", "val/acc_top1", "val/acc_top5"} <= set(trainer.callback_metrics)

    # The backbone is frozen: no gradient, eval mode under module.train(), weights unchanged.
    backbone = first.model.backbone
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())
    first.train()
    assert not backbone.training and first.model.head.training
    state = first.model.state_dict()
    for name, value in initial.items():
        changed = not torch.equal(state[name], value)
        assert changed == name.startswith("head."), name

    second = _probe(tmp_path)  # same seed: the same random backbone, so the same cache keys
    second_calls = _count_calls(second.model.backbone)
    _fit(second, datamodule)
    assert second_calls == []
    assert len(list(tmp_path.iterdir())) == 4
    torch.testing.assert_close(second.model.head.weight, first.model.head.weight, rtol=0, atol=0)

    # The same run on images through the backbone (same seed, so the same batches): same head.
    uncached = _probe(tmp_path / "unused", feature_cache=False)
    image_calls = _count_calls(uncached.model.backbone)
    _fit(uncached, datamodule)
    assert len(image_calls) == 2 * 3 + 1 + 2  # every train batch, the sanity check, 2 val epochs
    assert not any(image_calls)  # the backbone ran in eval mode while the head trained
    assert not (tmp_path / "unused").exists()
    torch.testing.assert_close(uncached.model.head.weight, first.model.head.weight)
    torch.testing.assert_close(uncached.model.head.bias, first.model.head.bias)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_cached_features_equal_the_backbone_and_give_the_same_head_step(tmp_path):
    datamodule = _shapes()
    module = _probe(tmp_path)
    cached = module.cached_features(datamodule, "train")
    dataset = datamodule.dataset("train")
    images = image_batch([dataset[i] for i in range(len(dataset))])
    module.eval()
    with torch.no_grad():
        expected = module.model.backbone(images["image"])
    torch.testing.assert_close(cached.features, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.labels, images["label"]) and torch.equal(
        cached.indices, images["index"]
    )

    # Reused without the backbone; an edited file is an error naming it.
    calls = _count_calls(module.model.backbone)
    again = module.cached_features(datamodule, "train")
    assert calls == [] and torch.equal(again.features, cached.features)
    path = next(tmp_path.glob("*-train-*.pt"))
    payload = torch.load(path, weights_only=True)
    payload["key"]["format"] = -1
    torch.save(payload, path)
    with pytest.raises(ConfigurationError, match=path.name):
        module.cached_features(datamodule, "train")

    # One Adam step on a batch of cached features vs on the same images through the backbone.
    rows = [3, 17, 8, 30, 21]
    by_features = module
    by_images = copy.deepcopy(module)
    feature_batch = FeatureDataset(cached).__getitems__(rows)
    image_rows = {key: value[rows] for key, value in images.items()}
    before = by_features.model.head.weight.detach().clone()
    for probe, batch in ((by_features, feature_batch), (by_images, image_rows)):
        probe.train()
        optimizer = probe.configure_optimizers()
        probe.training_step(batch, 0).backward()
        optimizer.step()
        assert all(p.grad is None for p in probe.model.backbone.parameters())
    assert not torch.allclose(by_features.model.head.weight, before)
    torch.testing.assert_close(by_features.model.head.weight, by_images.model.head.weight)
    torch.testing.assert_close(by_features.model.head.bias, by_images.model.head.bias)


def _digest(module: LinearProbeModule, datamodule, split: str = "train") -> str:
    return cache_path("", module.cache_key(datamodule, split), "key").stem


def test_cache_key_follows_backbone_pooling_split_data_and_transform(tmp_path):
    base_module, base_data = _probe(tmp_path), _shapes()
    reference = _digest(base_module, base_data)
    assert _digest(_probe(tmp_path), _shapes()) == reference  # stable across instances

    shifted = _shapes()
    shifted.mean = (0.4, 0.5, 0.6)  # another normalisation: another transform
    variants = {
        "weights": _digest(_probe(tmp_path, seed=1), base_data),
        "architecture": _digest(
            _probe(tmp_path, backbone_kwargs={**TINY_VIT, "depth": 1}), base_data
        ),
        "backbone": _digest(
            _probe(tmp_path, backbone="timm:resnet10t", backbone_kwargs=None, pooling="default"),
            base_data,
        ),
        "pooling": _digest(_probe(tmp_path, pooling="cls"), base_data),
        "split": _digest(base_module, base_data, "val"),
        "size": _digest(base_module, _shapes(train_size=41)),
        "data seed": _digest(base_module, _shapes(data_seed=1)),
        "transform": _digest(base_module, shifted),
    }
    assert reference not in variants.values()
    assert len(set(variants.values())) == len(variants), variants


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    generator = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(4):
            folder = tmp_path / "images" / split / ("cat", "dog")[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = generator.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path / "images"


def test_file_datamodules_key_on_transform_and_refuse_augmentation(image_folder, tmp_path):
    module = _probe(tmp_path / "cache", num_classes=2)

    def folders(**overrides) -> ImageFolderDataModule:
        transform = TransformConfig(
            **{"image_size": 32, "resize_size": 36, "train_augment": False, **overrides}
        )
        return ImageFolderDataModule(
            image_folder, test_dir=None, num_workers=0, transform=transform
        )

    plain = folders()
    assert _digest(module, plain) == _digest(module, folders())
    assert _digest(module, plain) != _digest(module, folders(resize_size=40))
    assert _digest(module, plain) != _digest(module, folders(interpolation="nearest"))
    cached = module.cached_features(plain, "val")
    assert cached.features.shape == (4, 192) and cached.labels.tolist() == [0, 0, 1, 1]

    with pytest.raises(ConfigurationError, match="train_augment"):
        module.cached_features(folders(train_augment=True), "train")

    # A datamodule without the flag whose transform is random is caught by loading twice.
    class RandomImages(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int) -> dict:
            return {"image": torch.randn(3, 32, 32), "label": 0, "index": index}

    class Unflagged:
        batch_size = 2

        def dataset(self, split: str):
            return RandomImages()

    with pytest.raises(ConfigurationError, match="differs between two loads"):
        module.cached_features(Unflagged(), "val")


def test_train_py_probe_run_checkpoint_evaluates_like_the_cached_validation(tmp_path):
    cache_dir = tmp_path / "cache"
    train.main(
        [
            "--config", str(REPO / "configs/experiment/linear_probe_shapes.yaml"),
            *tiny_train_args(tmp_path, "probe", 3),
            "--model.init_args.cache_dir", str(cache_dir),
            "--model.init_args.backbone_kwargs", '{"img_size": 64, "patch_size": 8, "depth": 2}',
        ]
    )  # fmt: skip
    run = tmp_path / "probe"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list(cache_dir.glob("*.pt"))) == 2  # train and val features

    classifier = load_classifier(run / "checkpoints" / "last.ckpt")
    assert isinstance(classifier, LinearProbeModule) and classifier.num_classes == 10
    probe = classifier.model
    assert isinstance(probe, ProbeClassifier) and not probe.training

    # The confusion matrix of the last (cached-feature) validation = the checkpoint on images.
    data = ShapesDataModule(image_size=64, train_size=96, val_size=30, batch_size=16)
    samples = [data.dataset("val")[i] for i in range(30)]
    batches = [image_batch(samples[start : start + 16]) for start in (0, 16)]
    with torch.no_grad():
        predictions = torch.cat([probe(b["image"]).argmax(1) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    saved = np.load(run / "confusion_matrix.npy")
    assert saved.sum() == 30
    np.testing.assert_array_equal(confusion_matrix(labels, predictions, 10).numpy(), saved)

    images = batches[0]["image"][:2]
    maps = create_method("grad_cam", probe)(images, predictions[:2])
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all() and maps.amax() > 0


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_config_parses_and_builds_its_backbone(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "lightning_modules.LinearProbeModule" in printed and "max_epochs: 100" in printed
    assert "train_augment: false" in printed or "ShapesDataModule" in printed

    arguments = yaml.safe_load(config.read_text())["model"]["init_args"]
    with torch.device("meta"):  # the architecture, kwargs and pooling, without weights
        _, feature_dim = build_feature_backbone(
            arguments["backbone"], False, None, arguments["pooling"], arguments["backbone_kwargs"]
        )
    assert feature_dim == (192 if "shapes" in config.name else 768)


@pytest.mark.slow
def test_ddp_rank_zero_computes_the_cache_and_both_ranks_train(tmp_path):
    arguments = [
        "--config", "configs/experiment/linear_probe_shapes.yaml",
        "--config", "configs/trainer/ddp_cpu.yaml",
        *tiny_train_args(tmp_path, "ddp", 3),
        "--model.init_args.cache_dir", str(tmp_path / "cache"),
        "--model.init_args.backbone_kwargs", '{"img_size": 64, "patch_size": 8, "depth": 2}',
    ]  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CONTRASTIVE_SALIENCY")}
    completed = subprocess.run(
        [sys.executable, "train.py", *arguments], cwd=REPO, env=environment,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert np.load(tmp_path / "ddp" / "confusion_matrix.npy").sum() == 30  # each sample once


def test_probe_backbone_loads_a_train_py_classifier_checkpoint_without_its_head(tmp_path):
    """The shapes probe's encoder: a train.py checkpoint of a 5-class (coarse, label_mode shape)
    classifier; its network is loaded into the headless backbone, its head dropped, and a
    checkpoint of another architecture is refused with the reason."""
    from lightning_modules import ClassifierModule

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1}
    coarse = ClassifierModule(
        backbone="timm:vit_convstem_shapes", num_classes=5, backbone_kwargs=kwargs
    )
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": coarse.state_dict(), "hyper_parameters": {}}, path)
    backbone, dim = build_feature_backbone(
        "timm:vit_convstem_shapes", False, str(path), "cls", kwargs
    )
    assert dim == 192
    loaded = backbone.state_dict()
    assert not any(key.startswith("head.") for key in loaded)
    for key, value in loaded.items():
        torch.testing.assert_close(value, coarse.model.state_dict()[key], rtol=0, atol=0)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone.eval()(images), coarse.model.eval().forward_head(
        coarse.model.forward_features(images), pre_logits=True))  # fmt: skip
    with pytest.raises(ConfigurationError, match="does not fit the probe's backbone"):
        build_feature_backbone(
            "timm:vit_convstem_shapes", False, str(path), "cls", {**kwargs, "depth": 2}
        )
