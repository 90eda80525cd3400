"""The papers' values are the defaults (docs/deviations.md): CASE's k and layer, RQ1 on correctly
classified images, CAAP's white blank in the data's normalisation, coherent ClusCAM sets."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader

from callbacks.analyses.caap_sweeps import CAAPSweepCallback
from callbacks.evaluation import SaliencyEvaluationCallback
from callbacks.evaluation.spec import resolve_selectors
from callbacks.explained_model import data_normalisation
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.targets import ConfusionContrast, LogitNeighbours
from datamodules import ShapesDataModule

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
STUDIES = sorted((REPO / "configs" / "evaluate").glob("*.yaml")) + sorted(
    (REPO / "configs" / "experiment").glob("*.yaml")
)


def _evaluation(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}).get("evaluation") or {}


def _method_names(evaluation: dict) -> list[str]:
    return [m if isinstance(m, str) else m["name"] for m in evaluation.get("methods") or []]


def test_every_case_study_runs_a_named_layer_and_rq1_explains_correct_predictions():
    """CASE Table II: the layer changes RQ1, so no CASE study falls back to the generic
    default layers; RQ1 keeps only correctly classified images (CASE Sec. IV-D)."""
    case_studies = [p for p in STUDIES if "case" in _method_names(_evaluation(p))]
    assert len(case_studies) >= 6
    for path in case_studies:
        layers = _evaluation(path)["layers"]
        assert layers and None not in layers, path.name  # protocol:case or explicit paths
    for name in ("class_sensitivity", "fidelity", "seed_robustness"):
        evaluation = _evaluation(REPO / "configs" / "evaluate" / f"{name}.yaml")
        assert evaluation["layers"] == ["protocol:case"], name
        assert evaluation["correct_only"] is True, name


def test_case_contrast_set_defaults_to_k_3():
    """CASE Sec. VIII: "small values (e.g., k = 3) suffice"; the code's 5 / 1 are options."""
    counts = np.eye(6) * 10 + np.arange(36).reshape(6, 6) % 5
    assert ConfusionContrast(counts).k == 3
    assert resolve_selectors({"selector": "confusion"}, counts).k == 3


def test_finer_cam_references_default_to_the_classes_ranked_below_the_target():
    method = create_method("finer_cam", torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)), "0")
    assert (method.references.k, method.references.mode) == (3, "below")
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.9, 3.8, 4.1]])  # ranks: 1 > 5 > 2 > 3 > 4 > 0
    assert LogitNeighbours(3)(logits, torch.tensor([5])).tolist() == [[2, 3, 4]]


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4
    )
    return model.eval()  # built directly: no pretrained_cfg, so no normalisation of its own


def test_the_evaluation_gives_caap_the_datas_normalisation_for_its_white_blank():
    datamodule = ShapesDataModule(image_size=32)
    normalisation = data_normalisation(datamodule)
    assert normalisation == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert data_normalisation(SimpleNamespace()) is None
    sample = {"image": torch.zeros(3, 32, 32), "label": 0, "index": 0}
    evaluation = SaliencyEvaluationCallback(
        methods=["caap", "grad_cam",
                 {"name": "caap", "label": "caap_own", "kwargs": {"normalisation": [[0.0] * 3, [1.0] * 3]}}],
        metrics=["deletion_auc"], targets=["top1"],
    )  # fmt: skip
    evaluation.prepare(_tiny_vit(), sample, normalisation=normalisation)
    methods = {c.spec.label: c.method for c in evaluation.combinations}
    assert methods["caap"].blank == "white" and methods["caap"].normalisation == normalisation
    assert methods["caap_own"].normalisation == ((0.0,) * 3, (1.0,) * 3)  # the config wins
    images = torch.randn(2, 3, 32, 32)
    white = methods["caap"](images, torch.tensor([0, 1]))
    explicit = create_method("caap", _tiny_vit(), blank=torch.full((3,), 2.0))  # (1 − .5)/.25
    torch.testing.assert_close(white, explicit(images, torch.tensor([0, 1])))
    # Without any normalisation the white blank cannot be placed: a clear error, no fallback.
    with pytest.raises(ConfigurationError, match=r"normalisation=\(mean, std\)"):
        SaliencyEvaluationCallback(methods=["caap"], metrics=["deletion_auc"], targets=["top1"]
                                   ).prepare(_tiny_vit(), sample)  # fmt: skip


def test_the_caap_sweeps_take_the_datas_normalisation():
    samples = [{"image": torch.zeros(3, 32, 32), "label": 0, "index": i} for i in range(2)]
    trainer = SimpleNamespace(
        test_dataloaders=DataLoader(samples, batch_size=2),
        datamodule=SimpleNamespace(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)),
    )
    module = SimpleNamespace(network=_tiny_vit(), device=torch.device("cpu"), model_name="vit")
    callback = CAAPSweepCallback(cutoffs=[1], operators=["box1"], metrics=["deletion_auc"])
    callback.on_test_start(trainer, module)
    assert {m.normalisation for m in callback._methods.values()} == {
        ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    }
