"""Every ``configs/experiment/*.yaml`` runs: a few training steps (``train.py`` configs) or a
two-sample evaluation with its analysis callbacks (``evaluate.py`` configs: those with an
``evaluation:`` key), on data fabricated in the dataset's real on-disk format.

The folder is enumerated, so a new config cannot skip this test. Each config is loaded and run
through the real CLI with only what a smoke run must change:

- data: ``root`` points at fabricated files (ImageNet with a 1000-class synset mapping and
  ImageNet-S masks, CIFAR-100 pickles, CUB, Stanford Cars ``.mat`` files, image folders with the
  config's own folder names); the shapes benchmark and quad grids shrink; batch size 2;
  ImageNet-size models see 64² inputs (timm ViTs / Swin are built for 64², with two blocks);
- model: pretrained weights off (nothing can be downloaded) — the architecture is the config's,
  randomly initialised (a linear-probe head file is random too); a checkpoint becomes a tiny
  model trained here (a small CNN, or a small
  ViT for a checkpoint path naming a ViT run); feature caches go to a temporary directory;
- cost: at most 2 optimiser steps; evaluations on 2 samples, with mask-based methods limited
  to a few masked copies (``max_channels`` 4, 8 RISE masks, 3 ClusCAM clusters),
  deletion/insertion curves in a few steps, and analysis sweeps over 2-3 values.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

import evaluate
import train
from callbacks.run_outputs import is_complete
from lightning_modules.evaluation import _pretrained_num_classes
from tests.conftest import tiny_train_args
from tests.test_datamodules_cub_cars import make_cars, make_cub
from tests.test_datamodules_folder_cifar import make_cifar, write
from tests.test_datamodules_imagenet import SIZE, SQUARE, encode_ids, val_name, write_image

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "configs" / "experiment").glob("*.yaml"))

SMOKE_METHOD_KWARGS = {
    "score_cam": {"max_channels": 4},
    "ablation_cam": {"max_channels": 4},
    "finer_score_cam": {"max_channels": 4},
    "rise": {"n_masks": 8, "batch_size": 8},
    "cluscam": {"num_clusters": 3},
    "integrated_gradients": {"steps": 4},
    "smoothgrad": {"n_samples": 4},
}
FEW_STEPS = {"pixels_per_step": 1 << 14}  # deletion / insertion: a handful of steps
CURVE_METRICS = ("deletion_auc", "insertion_auc", "insertion_minus_deletion")
SMOKE_IMAGE_SIZE = 64
# timm families built smaller for the smoke run: 64² inputs, two blocks (Swin: one per stage)
SMOKE_TIMM_KWARGS = {
    "vision_transformer": {"img_size": SMOKE_IMAGE_SIZE, "depth": 2},
    "deit": {"img_size": SMOKE_IMAGE_SIZE, "depth": 2},
    "eva": {"img_size": SMOKE_IMAGE_SIZE, "depth": 2},
    "swin_transformer": {"img_size": SMOKE_IMAGE_SIZE, "depths": [1, 1, 1, 1]},
}
IMAGENET_WNIDS = [f"n{index:08d}" for index in range(1000)]
IMAGENET_VAL_CLASSES = (3, 7, 11, 19)  # classes of the fabricated validation images 1..4


def test_the_folder_holds_both_kinds_of_experiment():
    kinds = {_kind(yaml.safe_load(path.read_text())) for path in EXPERIMENTS}
    assert kinds == {"train", "evaluate"}, kinds


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[path.stem for path in EXPERIMENTS])
def test_experiment_config_runs_on_fabricated_data(config, tmp_path, smoke_checkpoints):
    spec = yaml.safe_load(config.read_text())
    spec["data"] = _fabricated_data(spec["data"], tmp_path / "data")
    smoke_config = tmp_path / config.name
    run_name = f"smoke-{config.stem}"
    if _kind(spec) == "train":
        _make_trainable(spec, tmp_path)
        smoke_config.write_text(yaml.safe_dump(spec))
        arguments = tiny_train_args(tmp_path, run_name, 0, "--config", str(smoke_config))
        arguments = _without_tiny_shape_sizes(arguments)
        metrics = train.main([*arguments, "--trainer.limit_train_batches", "2"])
        run_dir = tmp_path / run_name
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert np.isfinite(metrics["val/loss"]), metrics
    else:
        _make_evaluable(spec, smoke_checkpoints, tmp_path)
        smoke_config.write_text(yaml.safe_dump(spec))
        evaluation = evaluate.main(
            [
                "--config", str(smoke_config),
                "--run_name", run_name,
                "--output_dir", str(tmp_path),
                "--wandb.mode", "disabled",
                "--trainer.accelerator", "cpu",
                "--trainer.enable_progress_bar", "false",
            ]
        )  # fmt: skip
        run_dir = tmp_path / run_name
        assert is_complete(run_dir)
        summary = pd.read_csv(run_dir / "summary.csv")
        assert set(summary["method"]) == {s.label for s in evaluation.method_specs}
        for callback in spec.get("trainer", {}).get("callbacks") or []:
            name = callback.get("init_args", {}).get("name") or _default_analysis_name(callback)
            outputs = sorted((run_dir / "analyses" / name).glob("*"))
            assert any(p.suffix == ".png" for p in outputs), (name, outputs)
            assert any(p.suffix == ".csv" for p in outputs), (name, outputs)


# ------------------------------------------------------------------------------------ kinds
def _kind(spec: dict[str, Any]) -> str:
    if "evaluation" in spec:
        return "evaluate"
    assert "class_path" in spec.get("model", {}), (
        "an experiment config is either a train.py config (model.class_path) or an evaluate.py "
        "config (an evaluation: key)"
    )
    return "train"


def _parameters(callback: dict[str, Any]) -> dict[str, inspect.Parameter]:
    module_name, class_name = callback["class_path"].rsplit(".", 1)
    return dict(
        inspect.signature(getattr(importlib.import_module(module_name), class_name)).parameters
    )


def _default_analysis_name(callback: dict[str, Any]) -> str:
    """An analysis callback's default ``name`` (its output folder under ``analyses/``)."""
    return _parameters(callback)["name"].default


# ------------------------------------------------------------------------------------- data
def _fabricated_data(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The config's datamodule with its files fabricated under ``folder`` and tiny sizes."""
    data = copy.deepcopy(data)
    name = data["class_path"].rsplit(".", 1)[-1]
    arguments = data.setdefault("init_args", {})
    if name != "QuadGridDataModule":
        arguments.update(batch_size=2, num_workers=0)
    if name == "ShapesDataModule":
        arguments.update(train_size=16, val_size=6, test_size=4)
    elif name == "QuadGridDataModule":
        arguments["base"] = _fabricated_data(arguments["base"], folder / "base")
        arguments.update(
            train_samples=0, val_samples=2, test_samples=2, batch_size=2, num_workers=0,
            filter_checkpoint=None, filter_trainer_model=False, cache_dir=str(folder / "cache"),
        )  # fmt: skip
    elif name == "ImageNetDataModule":
        arguments.update(_fabricated_imagenet(arguments, folder))
    elif name == "CIFAR100DataModule":
        arguments["root"] = str(make_cifar(folder))
        if arguments.get("val_fraction"):  # a hold-out of 4 images per class: keep 2
            arguments["val_fraction"] = 0.5
    elif name == "CUBDataModule":
        make_cub(folder, classes=[f"{c:03d}.Bird_{c}" for c in range(1, 7)])  # 6 classes
        arguments["root"] = str(folder)
    elif name == "StanfordCarsDataModule":
        arguments["root"] = str(make_cars(folder))
    elif name == "ImageFolderDataModule":
        arguments["root"] = str(_fabricated_folders(arguments, folder))
    else:
        pytest.fail(
            f"no fabricated data for {data['class_path']}: add a fabricator to "
            f"tests/test_experiment_configs.py::_fabricated_data"
        )
    return data


def _fabricated_folders(arguments: dict[str, Any], root: Path) -> Path:
    """``<root>/<train_dir|val_dir|test_dir>/<class>/*.png`` under the config's folder names."""
    for key, default in (("train_dir", "train"), ("val_dir", "val"), ("test_dir", None)):
        directory = arguments.get(key, default)
        if directory is None:
            continue
        for c, name in enumerate(("alpha", "beta", "gamma")):
            for k in range(2):
                write(root / directory / name / f"{name}_{k}.png", 40 * c + 10 * k)
    return root


def _fabricated_imagenet(arguments: dict[str, Any], root: Path) -> dict[str, Any]:
    """Class-folder train/val with the full 1000-wnid synset mapping (pretrained heads predict
    1000 classes), and ImageNet-S masks of the validation images when the config asks."""
    train_dir, val_dir = arguments.get("train_dir", "train"), arguments.get("val_dir", "val")
    for c in sorted(set(IMAGENET_VAL_CLASSES)):
        for k in range(2):
            write_image(root / train_dir / IMAGENET_WNIDS[c] / f"{IMAGENET_WNIDS[c]}_{k}.JPEG", c)
    for number, c in enumerate(IMAGENET_VAL_CLASSES, start=1):
        path = root / val_dir / IMAGENET_WNIDS[c] / f"{val_name(number)}.JPEG"
        write_image(path, 50 + number, square=True)
    mapping = [f"{wnid} class {index}" for index, wnid in enumerate(IMAGENET_WNIDS)]
    (root / "LOC_synset_mapping.txt").write_text("\n".join(mapping) + "\n")
    updates: dict[str, Any] = {"root": str(root), "synsets": None, "val_labels": None}
    if arguments.get("imagenet_s_root") is not None:
        updates.update(_fabricated_imagenet_s(root.parent / "imagenet-s", arguments))
    return updates


def _fabricated_imagenet_s(s_root: Path, arguments: dict[str, Any]) -> dict[str, Any]:
    split = int(arguments.get("imagenet_s_split", 50))
    categories = IMAGENET_WNIDS[:split]
    rank = {wnid: r for r, wnid in enumerate(categories, start=1)}
    segmentation = s_root / f"ImageNetS{split}" / "validation-segmentation"
    for number, c in enumerate(IMAGENET_VAL_CLASSES, start=1):
        wnid = IMAGENET_WNIDS[c]
        ids = np.zeros((SIZE[1], SIZE[0]), np.int64)
        x1, y1, x2, y2 = SQUARE
        ids[y1:y2, x1:x2] = rank[wnid]  # the object: the red square
        (segmentation / wnid).mkdir(parents=True, exist_ok=True)
        encode_ids(ids).save(segmentation / wnid / f"{val_name(number)}.png")
    categories_file = s_root / "categories.txt"
    categories_file.write_text("\n".join(categories) + "\n")
    return {"imagenet_s_root": str(s_root), "imagenet_s_categories": str(categories_file)}


# ------------------------------------------------------------------------------------ model
def _make_trainable(spec: dict[str, Any], tmp_path: Path) -> None:
    model = spec["model"].setdefault("init_args", {})
    if "pretrained" in model:
        model.update(pretrained=False, weights_path=None)
    if "cache_dir" in model:
        model["cache_dir"] = str(tmp_path / "feature-cache")
    _shrink_inputs(spec["data"], model, "backbone")
    trainer = spec.setdefault("trainer", {})
    trainer.update(max_epochs=1, limit_val_batches=2, accelerator="cpu", devices=1)


def _make_evaluable(spec: dict[str, Any], checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = spec.setdefault("model", {})
    if model.get("model_name") is not None:
        probe = model.get("head_path") is not None
        if model.get("pretrained") and model.get("num_classes") is None and not probe:
            # random init keeps the pretrained head's size (e.g. ImageNet's 1000 classes)
            model["num_classes"] = _pretrained_num_classes(model["model_name"])
        model.update(pretrained=False, weights_path=None)
        _shrink_inputs(spec["data"], model, "model_name")
        if probe:
            model["head_path"] = str(_random_probe_head(spec, tmp_path / "head.pt"))
    else:
        source = str(model.get("checkpoint") or "")
        model["checkpoint"] = str(checkpoints["vit" if "vit" in source else "cnn"])
    evaluation = spec["evaluation"]
    # random-init models classify (almost) nothing correctly: explain every sample
    evaluation.update(sample_size=2, gallery_size=1, correct_only=False)
    for callback in spec.get("trainer", {}).get("callbacks") or []:
        _cheap_analysis(callback)
    if evaluation.get("sanity_check"):
        evaluation["sanity_check"] = {**evaluation["sanity_check"], "samples": 1, "max_steps": 2}
    evaluation["methods"] = [_cheap_method(method) for method in evaluation["methods"]]
    evaluation["metrics"] = [_cheap_metric(metric) for metric in evaluation["metrics"]]


def _random_probe_head(spec: dict[str, Any], path: Path) -> Path:
    """A linear-probe head file (``weight`` ``[N, D]``, ``bias`` ``[N]``) for the config's
    backbone features and the fabricated data's classes."""
    import torch

    from lightning_modules.probe_classifier import build_feature_backbone

    model = spec["model"]
    _, feature_dim = build_feature_backbone(
        model["model_name"], False, None, model.get("pooling", "default"),
        model.get("backbone_kwargs"),
    )  # fmt: skip
    module_name, class_name = spec["data"]["class_path"].rsplit(".", 1)
    datamodule = getattr(importlib.import_module(module_name), class_name)(
        **spec["data"]["init_args"]
    )
    generator = torch.Generator().manual_seed(0)
    classes = datamodule.num_classes
    weight = torch.randn(classes, feature_dim, generator=generator) / feature_dim**0.5
    torch.save({"weight": weight, "bias": torch.zeros(classes)}, path)
    return path


def _shrink_inputs(data_spec: dict[str, Any], model: dict[str, Any], name_key: str) -> None:
    """ImageNet-size models on 64² inputs (timm transformers built for 64², two blocks).
    ``model[name_key]`` names the network; the embedded benchmark is left as it is."""
    if data_spec["class_path"].endswith("ShapesDataModule"):
        return
    data = data_spec["init_args"]
    if data_spec["class_path"].endswith("QuadGridDataModule"):
        data["cell_size"] = SMOKE_IMAGE_SIZE // 2
        data = data["base"].setdefault("init_args", {})
    transform = data.setdefault("transform", {})
    transform.update(from_model=None, image_size=SMOKE_IMAGE_SIZE, resize_size=None)
    source, _, name = model[name_key].partition(":")
    if source == "timm":
        import timm.models

        family = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
        if family in SMOKE_TIMM_KWARGS:
            kwargs = model.get("backbone_kwargs") or {}
            model["backbone_kwargs"] = {**kwargs, **SMOKE_TIMM_KWARGS[family]}


def _cheap_analysis(callback: dict[str, Any]) -> None:
    """An analysis callback on the smoke samples, with short sweeps and grids."""
    parameters = _parameters(callback)
    arguments = callback.setdefault("init_args", {})
    cheap = {
        "correct_only": False,  # random-init models classify (almost) nothing correctly
        "samples": 2,
        "cutoffs": [1, 2],  # CAAP sweeps: two layer cut-offs
        "operators": ["none", "box1"],
        "k_candidates": [2, 3, 4],  # ClusCAM selection: three cluster counts
    }
    arguments.update({key: value for key, value in cheap.items() if key in parameters})
    if arguments.get("metrics"):
        arguments["metrics"] = [_cheap_metric(metric) for metric in arguments["metrics"]]


def _cheap_method(method: str | dict[str, Any]) -> dict[str, Any]:
    method = {"name": method} if isinstance(method, str) else copy.deepcopy(method)
    kwargs = method.setdefault("kwargs", {})
    if method["name"] == "var":  # VAR wraps a base method: make the base cheap
        kwargs["base_kwargs"] = {
            **SMOKE_METHOD_KWARGS.get(kwargs.get("base", "grad_cam"), {}),
            **(kwargs.get("base_kwargs") or {}),
        }
    else:
        kwargs.update(SMOKE_METHOD_KWARGS.get(method["name"], {}))
    return method


def _cheap_metric(metric: str | dict[str, Any]) -> str | dict[str, Any]:
    name = metric if isinstance(metric, str) else metric["name"]
    if name not in CURVE_METRICS:
        return metric
    metric = {"name": metric} if isinstance(metric, str) else copy.deepcopy(metric)
    metric.setdefault("kwargs", {}).update(FEW_STEPS)
    return metric


@pytest.fixture(scope="module")
def smoke_checkpoints(tmp_path_factory, trained_run) -> dict[str, Path]:
    """The tiny small-CNN checkpoint of ``trained_run`` and the ViT of
    configs/model/vit_tiny_shapes.yaml trained here for one epoch on 96 images."""
    output_dir = tmp_path_factory.mktemp("vit")
    train.main(
        tiny_train_args(
            output_dir, "tiny-vit", 0,
            "--config", str(REPO / "configs" / "model" / "vit_tiny_shapes.yaml"),
            "--trainer.max_epochs", "1",
        )
    )  # fmt: skip
    return {
        "cnn": trained_run / "checkpoints" / "last.ckpt",
        "vit": output_dir / "tiny-vit" / "checkpoints" / "last.ckpt",
    }


def _without_tiny_shape_sizes(arguments: list[str]) -> list[str]:
    """``tiny_train_args`` sizes the shapes benchmark; the smoke config already sizes its data
    (and other datamodules have no such arguments)."""
    kept, skip = [], 0
    for argument in arguments:
        if skip:
            skip -= 1
            continue
        if argument.startswith("--data."):
            skip = 1
            continue
        kept.append(argument)
    return kept
