"""ConfusionMatrixCallback equals a direct computation over the validation split."""

from __future__ import annotations

import hashlib
import json

import lightning as L
import numpy as np
import pandas as pd
import torch

from callbacks.confusion_matrix import ConfusionMatrixCallback, confusion_matrix
from datamodules import ShapesDataModule
from datamodules.train_holdout import train_holdout
from lightning_modules import ClassifierModule
from tests.test_datamodules_folder_cifar import cifar_module, make_cifar


def _direct_matrix(module: ClassifierModule, data: ShapesDataModule) -> np.ndarray:
    """Counts from predicting every validation image once, by hand."""
    module.eval()
    dataset = data.dataset("val")
    with torch.no_grad():
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        preds = module(images).argmax(1).numpy()
    labels = np.array([int(dataset[i]["label"]) for i in range(len(dataset))])
    expected = np.zeros((data.num_classes, data.num_classes), dtype=np.int64)
    np.add.at(expected, (labels, preds), 1)
    return expected


def test_confusion_matrix_counts():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    expected = np.zeros((3, 3), dtype=np.int64)
    for t, p in zip(labels.tolist(), preds.tolist(), strict=True):
        expected[t, p] += 1
    assert (confusion_matrix(labels, preds, 3).numpy() == expected).all()


def test_callback_matrix_equals_direct_computation(tmp_path):
    L.seed_everything(0)
    data = ShapesDataModule(train_size=0, val_size=37, test_size=0, batch_size=8)
    module = ClassifierModule(num_classes=10)
    callback = ConfusionMatrixCallback(output_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.validate(module, datamodule=data)
    expected = _direct_matrix(module, data)

    assert callback.matrix.sum() == 37
    assert (callback.matrix == expected).all()
    assert (np.load(tmp_path / "confusion_matrix.npy") == expected).all()
    table = pd.read_csv(tmp_path / "confusion_matrix.csv", index_col=0)
    assert list(table.columns) == data.class_names and (table.to_numpy() == expected).all()


def test_callback_counts_each_sample_once_under_ddp(tmp_path):
    """Two gloo processes over 37 validation samples: the sampler pads one duplicate."""
    L.seed_everything(0)
    data = ShapesDataModule(train_size=0, val_size=37, test_size=0, batch_size=8)
    module = ClassifierModule(num_classes=10)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
        callbacks=[ConfusionMatrixCallback(output_dir=str(tmp_path))],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.validate(module, datamodule=data)
    expected = _direct_matrix(module, data)
    saved = np.load(tmp_path / "confusion_matrix.npy")
    assert saved.sum() == 37
    assert (saved == expected).all()
    provenance = json.loads((tmp_path / "confusion_matrix.json").read_text())
    digest = hashlib.sha256(np.arange(37, dtype=np.int64).tobytes()).hexdigest()
    assert provenance == {
        "source": data.split_source("val"), "split": "val", "samples": 37,
        "indices_sha256": digest,
    }  # fmt: skip


def test_train_holdout_is_a_seeded_per_class_sample_of_train_only(tmp_path):
    """``confusion_matrix: holdout``: train images only (none of the validation hold-out or the
    test file), ``per_class`` of each class (all of a smaller one), seeded, not augmented."""
    data = cifar_module(
        make_cifar(tmp_path), val_fraction=0.25, split_seed=1, transform={"train_augment": True}
    )
    train, val = data.dataset("train"), data.dataset("val")  # 12 + 4 of the 16 train images
    holdout = train_holdout(data, per_class=2, seed=0)
    positions = holdout.dataset.positions[holdout.indices]  # rows of the train file
    assert set(positions) <= set(train.positions) and set(positions).isdisjoint(val.positions)
    labels = [holdout[i]["label"] for i in range(len(holdout))]
    assert sorted(labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [holdout[i]["index"] for i in range(len(holdout))] == holdout.indices
    assert train_holdout(data, per_class=2, seed=0).indices == holdout.indices
    others = {tuple(train_holdout(data, per_class=2, seed=s).indices) for s in range(1, 6)}
    assert others - {tuple(holdout.indices)}, "the seed draws other images"
    assert len(train_holdout(data, per_class=5, seed=0)) == len(train)  # 3 per class: all
    torch.testing.assert_close(holdout[0]["image"], holdout[0]["image"])  # no augmentation
    assert data.split_source("train") == "CIFAR-100/train" != data.split_source("test")
