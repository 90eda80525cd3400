"""Classifier-weight similarity (Finer-CAM Fig. 1, App. A.1, Eqs. 11–12): the sorted cosine
similarity curve against direct computations, head detection across model families, and the
callback's tables and plot through a real evaluate.py run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import evaluate
from contrastive_saliency.classifier_similarity import (
    find_classifier_head,
    nearest_classes,
    similarity_curve,
)
from contrastive_saliency.errors import ConfigurationError, UnknownLayerError
from tests.conftest import TINY_SIZES

pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_curve(weight: np.ndarray) -> np.ndarray:
    """Eq. 11 by hand, every row sorted over the other classes (descending), ``[N, N − 1]``."""
    norms = np.sqrt((weight**2).sum(axis=1))
    similarity = (weight @ weight.T) / np.outer(norms, norms)
    return np.stack([np.sort(np.delete(row, p))[::-1] for p, row in enumerate(similarity)])


def test_orthogonal_rows_give_zero_and_a_duplicated_row_gives_one_at_rank_one():
    weight = torch.eye(5, 8) * torch.arange(1.0, 6.0)[:, None]  # orthogonal, different norms
    curve = similarity_curve(weight)
    assert torch.allclose(curve.mean, torch.zeros(4, dtype=torch.float64))
    duplicated = torch.cat([weight, 3 * weight[:1]])  # class 5 = 3 × class 0: cosine 1
    curve = similarity_curve(duplicated)
    # rank 1: classes 0 and 5 see each other (1), the four others see only zeros.
    assert curve.max[0] == pytest.approx(1.0) and curve.min[0] == pytest.approx(0.0)
    assert curve.mean[0] == pytest.approx(2 / 6)
    assert torch.allclose(curve.mean[1:], torch.zeros(4, dtype=torch.float64))
    classes, similarities = nearest_classes(duplicated, k=1)
    assert classes[0, 0] == 5 and classes[5, 0] == 0
    assert similarities[0, 0] == pytest.approx(1.0)


def test_curve_equals_a_direct_numpy_computation():
    weight = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    rows = numpy_curve(weight.double().numpy())
    curve = similarity_curve(weight)
    np.testing.assert_allclose(curve.mean.numpy(), rows.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(curve.sd.numpy(), rows.std(axis=0), atol=1e-12)
    np.testing.assert_allclose(curve.min.numpy(), rows.min(axis=0), atol=1e-12)
    np.testing.assert_allclose(curve.max.numpy(), rows.max(axis=0), atol=1e-12)
    assert torch.all(curve.mean[:-1] >= curve.mean[1:])  # sorted rows → a non-increasing mean
    short = similarity_curve(weight, max_rank=3)
    np.testing.assert_allclose(short.mean.numpy(), rows.mean(axis=0)[:3], atol=1e-12)
    # the paper's literal diagonal (S_pp − 1 = 0) adds one rank per row holding a 0
    zero = similarity_curve(weight, self_similarity="zero")
    unit = weight.double().numpy() / np.linalg.norm(weight.double().numpy(), axis=1)[:, None]
    literal = np.sort(unit @ unit.T - np.eye(12), axis=1)[:, ::-1]
    assert zero.sorted.shape == (12, 12)
    np.testing.assert_allclose(zero.mean.numpy(), literal.mean(axis=0), atol=1e-12)
    with pytest.raises(ConfigurationError, match="max_rank"):
        similarity_curve(weight, max_rank=0)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.classifier = nn.Linear(4, 3)


class Unnamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)


def test_head_detection_on_timm_torchvision_probe_and_small_cnn_models():
    import timm
    import torchvision

    from lightning_modules.probe_classifier import ProbeClassifier
    from lightning_modules.small_cnn import SmallCNN

    cases = {
        "timm resnet": (timm.create_model("resnet18", num_classes=7), "fc"),
        "timm convnext": (timm.create_model("convnext_atto", num_classes=7), "head.fc"),
        "timm vit": (
            timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=7),
            "head",
        ),
        "torchvision resnet": (torchvision.models.resnet18(num_classes=7), "fc"),
        "torchvision densenet": (torchvision.models.densenet121(num_classes=7), "classifier"),
        "torchvision mobilenet": (
            torchvision.models.mobilenet_v3_small(num_classes=7),
            "classifier.3",
        ),
        "small_cnn": (SmallCNN(num_classes=7), "classifier"),
        "probe": (ProbeClassifier(nn.Flatten(), nn.Linear(12, 7), 12), "head"),
    }
    for name, (model, path) in cases.items():
        head = find_classifier_head(model, num_classes=7)
        assert head.path == path, name
        assert head.linear is model.get_submodule(path)
        assert head.weight.shape[0] == 7
    headless = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(ConfigurationError, match="num_classes=0"):
        find_classifier_head(headless)


def test_ambiguous_missing_and_wrong_heads_are_specific_errors():
    with pytest.raises(ConfigurationError, match=r"ambiguous.*'fc', 'classifier'"):
        find_classifier_head(TwoHeads())
    assert find_classifier_head(TwoHeads(), head="classifier").path == "classifier"
    with pytest.raises(ConfigurationError, match=r"which of the 2 nn\.Linear"):
        find_classifier_head(Unnamed())
    assert find_classifier_head(Unnamed(), head="out").path == "out"
    with pytest.raises(ConfigurationError, match=r"no nn\.Linear"):
        find_classifier_head(nn.Sequential(nn.Conv2d(3, 4, 1)))
    with pytest.raises(UnknownLayerError, match="nearest valid names"):
        find_classifier_head(Unnamed(), head="outt")
    with pytest.raises(ConfigurationError, match="3 outputs but the model predicts 5"):
        find_classifier_head(Unnamed(), head="out", num_classes=5)


def test_evaluate_run_publishes_the_similarity_of_the_checkpoint_classifier(trained_run, tmp_path):
    from datamodules import ShapesDataModule
    from lightning_modules.checkpoints import load_classifier

    config = tmp_path / "similarity.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: callbacks.analyses.classifier_similarity.ClassifierSimilarityCallback\n"
        "      init_args: {max_rank: 5}\n"
        "evaluation:\n"
        "  methods: [grad_cam]\n"
        "  targets: [top1_vs_top2]\n"
        "  metrics: [feature_agreement]\n"
        "  gallery_size: 0\n"
    )
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    evaluate.main(
        [
            "--config", str(config),
            "--model.checkpoint", str(checkpoint),
            "--output_dir", str(tmp_path), "--run_name", "similarity",
            "--wandb.mode", "disabled", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false",
            "--data.batch_size", "4", "--data.num_workers", "0", *TINY_SIZES,
        ]
    )  # fmt: skip
    folder = tmp_path / "similarity" / "analyses" / "classifier_similarity"
    weight = load_classifier(checkpoint).model.classifier.weight.detach().double().numpy()
    rows = numpy_curve(weight)[:, :5]
    curve = pd.read_csv(folder / "curve.csv")
    assert curve["rank"].tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(curve["mean"], rows.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(curve["sd"], rows.std(axis=0), atol=1e-9)
    assert set(curve["classes"]) == {10}
    nearest = pd.read_csv(folder / "nearest.csv")
    assert len(nearest) == 10 * 3
    names = ShapesDataModule().class_names
    first = nearest[(nearest["class"] == 0) & (nearest["rank"] == 1)].iloc[0]
    norms = np.linalg.norm(weight, axis=1)
    similarity = weight @ weight.T / np.outer(norms, norms)
    np.fill_diagonal(similarity, -np.inf)
    assert first["other_class"] == similarity[0].argmax()
    assert first["similarity"] == pytest.approx(similarity[0].max())
    assert first["class_name"] == names[0]
    assert first["other_name"] == names[int(first["other_class"])]
    assert (folder / "classifier_similarity.png").stat().st_size > 10_000


def test_fig1_command_overlays_the_curves_of_several_runs(tmp_path):
    from experiments import classifier_similarity_curves

    runs = []
    for name, classes in (("cub", 200), ("cars", 196)):
        run = tmp_path / name
        folder = run / "analyses" / "classifier_similarity"
        folder.mkdir(parents=True)
        (run / "config.yaml").write_text(
            "model:\n  model_name: timm:vit_base_patch16_clip_224.openai\n  head_path: h.pt\n"
            f"data:\n  class_path: datamodules.{name.upper()}DataModule\n"
        )
        ranks = np.arange(1, classes)
        pd.DataFrame(
            {"rank": ranks, "mean": 0.5 / ranks, "sd": 0.05, "min": 0.0, "max": 0.9,
             "classes": classes}
        ).to_csv(folder / "curve.csv", index=False)  # fmt: skip
        runs.append(str(run))
    output = classifier_similarity_curves.main(
        [*runs, "--output", str(tmp_path / "fig1.png"), "--max_rank", "50"]
    )
    assert output.stat().st_size > 10_000
    table = pd.read_csv(tmp_path / "fig1.csv")
    assert table.groupby("model")["rank"].max().tolist() == [50, 50]
    assert set(table["model"]) == {
        "timm:vit_base_patch16_clip_224.openai + probe on CUB",
        "timm:vit_base_patch16_clip_224.openai + probe on CARS",
    }
