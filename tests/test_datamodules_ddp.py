"""Datamodules under a DistributedSampler: each sample's ``index`` travels with it, so the
padded duplicates of an uneven split are removed and every sample counts exactly once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from contrastive_saliency.metrics import unique_by_index
from datamodules import ImageFolderDataModule, QuadGridDataModule, ShapesDataModule
from datamodules.base import collate_samples
from datamodules.transforms import TransformConfig


def _ranks_see(dataset, world_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and labels each rank of a ``world_size`` run would evaluate, concatenated."""
    indices, labels = [], []
    for rank in range(world_size):
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        for batch in DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate_samples):
            indices.append(batch["index"].reshape(-1))
            labels.append(batch["label"].reshape(-1))
    return torch.cat(indices), torch.cat(labels)


def _check_exactly_once(dataset) -> None:
    indices, labels = _ranks_see(dataset)
    assert len(indices) > len(dataset)  # the sampler padded the odd split with a duplicate
    unique, unique_labels = unique_by_index(indices, labels)
    assert unique.tolist() == list(range(len(dataset)))
    expected = torch.tensor([int(dataset[i]["label"]) for i in range(len(dataset))])
    assert torch.equal(unique_labels, expected)


@pytest.fixture()
def image_folder(tmp_path):
    generator = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 5)):  # 5 val images: an odd split
        for i in range(count):
            name = ("cat", "dog")[i % 2]
            folder = tmp_path / split / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = generator.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path


def test_image_folder_samples_once_under_distributed_sampler(image_folder):
    data = ImageFolderDataModule(
        image_folder, transform=TransformConfig(16, 16), num_workers=0, test_dir="val"
    )
    _check_exactly_once(data.dataset("val"))


def test_quad_grids_samples_once_under_distributed_sampler():
    base = ShapesDataModule(image_size=16, train_size=8, val_size=12, test_size=12)
    grids = QuadGridDataModule(base, val_samples=7, test_samples=7, seed=3)
    _check_exactly_once(grids.dataset("test"))
