"""The evaluation prepares itself in the trainer's ``setup``; the sampled test split reaches
``trainer.test`` as a datamodule; target columns are typed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from callbacks.evaluation import SaliencyEvaluationCallback
from callbacks.evaluation.target_policies import POLICIES, TOP1, TargetColumn, column_classes
from callbacks.evaluation.test_subset import SampledTestData, explained_data
from contrastive_saliency.errors import ConfigurationError
from datamodules import ShapesDataModule
from tests.tiny_models import TinyCAMNet


def test_target_columns_keep_their_names_and_parse_back():
    batch = {"grid_labels": torch.tensor([[3, 1, 0, 2]]), "label": torch.tensor([1])}
    names = {name: [c.name for c in p.columns(batch)] for name, p in POLICIES.items()}
    assert names == {
        "top1": ["top1"],
        "top2": ["top2"],
        "top1_vs_top2": ["top1", "top2"],
        "ground_truth": ["ground_truth"],
        "grid_cells": ["cell0", "cell1", "cell2", "cell3"],
        "top1_vs_random_other": ["top1", "random_other"],
    }
    for policy in POLICIES.values():
        for column in policy.columns(batch):
            assert TargetColumn.parse(str(column)) == column
    assert TargetColumn.parse("cell12") == TargetColumn("cell", 12)
    for bad in ("top", "cell-1", "label", "Top1"):
        with pytest.raises(ValueError, match="unknown target column"):
            TargetColumn.parse(bad)
    logits = torch.tensor([[0.1, 0.7, 0.2, 0.0]])
    assert column_classes(TOP1, logits, batch).tolist() == [1]
    assert column_classes(TargetColumn("top", 2), logits, batch).tolist() == [2]
    assert column_classes(TargetColumn("cell", 2), logits, batch).tolist() == [0]


def test_sampled_test_data_serves_the_seeded_subset_and_is_otherwise_the_datamodule():
    data = ShapesDataModule(image_size=16, test_size=20, batch_size=4, num_workers=0)
    sampled = SampledTestData(data, 5, seed=3)
    expected = sorted(torch.randperm(20, generator=torch.Generator().manual_seed(3))[:5].tolist())
    sampled.setup("test")
    loader = sampled.test_dataloader()
    assert list(loader.dataset.indices) == expected
    seen = torch.cat([batch["index"] for batch in loader]).tolist()
    assert seen == expected  # each sample keeps its own index, in order
    assert loader.batch_size == 4
    assert sampled.num_classes == data.num_classes and sampled.mean == data.mean
    assert explained_data(sampled) is data and explained_data(data) is data
    assert dict(sampled.hparams_initial) == dict(data.hparams_initial)
    whole = SampledTestData(data, 20).test_dataloader()
    assert len(whole.dataset) == 20 and not hasattr(whole.dataset, "indices")
    with pytest.raises(ConfigurationError, match="at least 1, got 0"):
        SampledTestData(data, 0)


def _trainer(datamodule, root):
    device = SimpleNamespace(root_device=torch.device("cpu"))
    return SimpleNamespace(datamodule=datamodule, default_root_dir=str(root), strategy=device)


def test_the_callback_prepares_itself_in_setup(tmp_path):
    data = ShapesDataModule(image_size=16, test_size=4, num_shapes=2, num_workers=0)
    module = SimpleNamespace(network=TinyCAMNet(), confusion_matrix_path=None)
    case = {"name": "case", "kwargs": {"contrast": {"selector": "confusion", "k": 1}}}
    evaluation = SaliencyEvaluationCallback(methods=["grad_cam", case], layers=["features"])
    evaluation.setup(_trainer(data, tmp_path), module, "validate")  # nothing to prepare
    assert evaluation.combinations is None
    with pytest.raises(ConfigurationError, match=r"confusion_matrix\.npy next to checkpoints"):
        evaluation.setup(_trainer(data, tmp_path), module, "test")  # CASE without a matrix
    np.save(tmp_path / "counts.npy", np.eye(4) + 1)
    module.confusion_matrix_path = tmp_path / "counts.npy"
    evaluation.setup(_trainer(data, tmp_path), module, "test")
    assert [c.spec.label for c in evaluation.combinations] == ["grad_cam", "case"]
    assert evaluation._normalisation == (data.mean, data.std)
    with pytest.raises(ConfigurationError, match=r"datamodule=\.\.\."):
        evaluation.setup(_trainer(None, tmp_path), module, "test")
    # validate / holdout: the matrix evaluate.py computes into the run directory first
    computed = SaliencyEvaluationCallback(
        methods=["grad_cam", case], layers=["features"], confusion_matrix="holdout"
    )
    with pytest.raises(ConfigurationError, match=r"holdout.*missing"):
        computed.setup(_trainer(data, tmp_path), module, "test")
    np.save(tmp_path / "confusion_matrix.npy", np.eye(4) + 1)
    computed.setup(_trainer(data, tmp_path), module, "test")
    assert computed._matrix == tmp_path / "confusion_matrix.npy"
