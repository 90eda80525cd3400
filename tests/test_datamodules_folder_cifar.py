"""ImageFolder and CIFAR-100 datamodules on miniature copies fabricated in the real on-disk
formats (class folders with mixed image files; the CIFAR python pickles)."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import DatasetLayoutError
from datamodules.cifar100 import CIFAR100_TRANSFORM, CIFAR100_URL, CIFAR100DataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.transforms import TransformConfig

CLASSES = ["MildDemented", "NonDemented", "VeryMildDemented"]  # sorted folder names


def write(path: Path, shade: int, mode: str = "RGB", fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((30, 40, 3), shade, np.uint8)
    pixels[:, :10] = (250, 0, 0)  # a red left band
    image = Image.fromarray(pixels)
    image = image.convert(mode) if mode != "RGB" else image
    image.save(path, format=fmt)


def make_folder(root: Path, val: bool = True) -> Path:
    """train: 4 images per class in mixed formats (one grayscale, one in a sub-folder, an
    upper-case extension), val/test: 2 per class; plus files that are not images."""
    for c, name in enumerate(CLASSES):
        write(root / "train" / name / "a.jpg", 10 + c)
        write(root / "train" / name / "b.PNG", 20 + c, mode="L", fmt="PNG")
        write(root / "train" / name / "nested" / "c.bmp", 30 + c)
        write(root / "train" / name / "d.webp", 40 + c)
        (root / "train" / name / "notes.txt").write_text("not an image")
        for split in ("val", "test") if val else ("test",):
            write(root / split / name / "x.jpeg", 50 + c)
            write(root / split / name / "y.tif", 60 + c, fmt="TIFF")
    return root


def folder_module(root: Path, **kwargs) -> ImageFolderDataModule:
    settings = {"transform": TransformConfig(24, 30), "num_workers": 0, "batch_size": 4}
    settings.update(kwargs)
    return ImageFolderDataModule(root=str(root), **settings)


def test_image_folder_counts_labels_names_indices(tmp_path):
    dm = folder_module(make_folder(tmp_path))
    assert dm.class_names == CLASSES and dm.num_classes == 3
    train, val, test = dm.dataset("train"), dm.dataset("val"), dm.dataset("test")
    assert (len(train), len(val), len(test)) == (12, 6, 6)
    assert [r.label for r in train.records] == [0] * 4 + [1] * 4 + [2] * 4
    assert {r.path.name for r in train.records} == {"a.jpg", "b.PNG", "c.bmp", "d.webp"}
    for position in range(len(train)):
        sample = train[position]
        assert sample["index"] == position and sample["label"] == train.records[position].label
        assert sample["image"].shape == (3, 24, 24) and sample["image"].dtype == torch.float32


def test_image_folder_grayscale_becomes_three_equal_channels(tmp_path):
    unnormalised = TransformConfig(24, 30, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    dm = folder_module(make_folder(tmp_path), transform=unnormalised)
    train = dm.dataset("train")
    image = train[[r.path.name for r in train.records].index("b.PNG")]["image"]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    val = dm.dataset("val")
    assert val.records[1].path.name == "y.tif"  # lossless RGB: the red band stays red
    colour = val[1]["image"]  # crop 24 of 40 at x = 8: columns 0, 1 are band columns 8, 9
    assert colour[0, :, :2].min() > 0.95 and colour[1:, :, :2].max() < 0.05


def test_image_folder_val_fraction_is_seeded_and_stratified(tmp_path):
    root = make_folder(tmp_path, val=False)
    dm = folder_module(root, val_dir=None, val_fraction=0.5, split_seed=3)
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(train) == 6 and len(val) == 6
    assert sorted(r.label for r in val.records) == [0, 0, 1, 1, 2, 2]
    train_paths = {r.path for r in train.records}
    val_paths = {r.path for r in val.records}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 12
    again = folder_module(root, val_dir=None, val_fraction=0.5, split_seed=3).dataset("val")
    assert [r.path for r in again.records] == [r.path for r in val.records]
    seeds = {
        tuple(
            r.path
            for r in folder_module(root, val_fraction=0.5, split_seed=s).dataset("val").records
        )
        for s in range(6)
    }
    assert len(seeds) > 1
    assert [val[i]["index"] for i in range(len(val))] == list(range(6))


def test_image_folder_alzheimer_style_val_dir_test(tmp_path):
    root = make_folder(tmp_path, val=False)
    dm = folder_module(root, val_dir="test")
    assert len(dm.dataset("val")) == 6 and len(dm.dataset("test")) == 6


def test_image_folder_dataloader_with_two_workers_yields_every_index_once(tmp_path):
    dm = folder_module(make_folder(tmp_path), num_workers=2, batch_size=5)
    seen = []
    for batch in dm.train_dataloader():
        assert batch["image"].shape[1:] == (3, 24, 24)
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(12))


def layout_error(call) -> str:
    with pytest.raises(DatasetLayoutError) as error:
        call()
    return str(error.value)


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "missing"
    message = layout_error(lambda: folder_module(missing).dataset("train"))
    assert str(missing) in message and "<class name>" in message

    root = make_folder(tmp_path / "data", val=False)
    message = layout_error(lambda: folder_module(root).dataset("val"))
    assert str(root / "val") in message and "val_fraction" in message

    write(root / "test" / "Unknown" / "z.png", 1)
    message = layout_error(lambda: folder_module(root).dataset("test"))
    assert str(root / "test" / "Unknown") in message and "<class name>" in message

    stray_root = make_folder(tmp_path / "stray")
    write(stray_root / "val" / "loose.jpg", 3)
    message = layout_error(lambda: folder_module(stray_root).dataset("val"))
    assert str(stray_root / "val") in message and "outside class folders" in message

    corrupt = stray_root / "train" / CLASSES[0] / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    train = folder_module(stray_root).dataset("train")
    position = [r.path for r in train.records].index(corrupt)
    message = layout_error(lambda: train[position])
    assert str(corrupt) in message and "cannot be read as an image" in message


# ----------------------------------------------------------------------------- CIFAR-100
FINE_NAMES = [f"class_{i:03d}" for i in range(100)]


def cifar_images(n: int, offset: int) -> np.ndarray:
    """``[n, 3072]`` uint8 rows (channel-major); image k: R plane = offset + k, G plane = 100,
    B plane = 200, plus a bright pixel at (row 2, column 5) of the R plane."""
    images = np.zeros((n, 3, 32, 32), np.uint8)
    for k in range(n):
        images[k, 0], images[k, 1], images[k, 2] = offset + k, 100, 200
        images[k, 0, 2, 5] = 255
    return images.reshape(n, 3072)


def make_cifar(root: Path, bytes_keys: bool = True) -> Path:
    """train: 4 images of each of fine classes 0..3 (16); test: 2 each of classes 5, 7 (4)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)

    def key(name: str):
        return name.encode() if bytes_keys else name

    def dump(name: str, content: dict) -> None:
        with (folder / name).open("wb") as handle:
            pickle.dump({key(k): v for k, v in content.items()}, handle)

    for name, labels, offset in (("train", [0, 1, 2, 3] * 4, 0), ("test", [5, 7] * 2, 50)):
        dump(
            name,
            {
                "data": cifar_images(len(labels), offset),
                "fine_labels": labels,
                "coarse_labels": [label // 5 for label in labels],
                "filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
                "batch_label": f"{name} batch".encode(),
            },
        )
    names = [n.encode() for n in FINE_NAMES] if bytes_keys else FINE_NAMES
    dump("meta", {"fine_label_names": names, "coarse_label_names": [b"c"] * 20})
    return root


def cifar_module(root: Path, transform: dict | None = None, **kwargs) -> CIFAR100DataModule:
    """CIFAR-100 with its default transform but unnormalised and unaugmented, ``transform``
    changing further fields."""
    fields = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "train_augment": False}
    config = replace(CIFAR100_TRANSFORM, **{**fields, **(transform or {})})
    return CIFAR100DataModule(root=str(root), num_workers=0, transform=config, **kwargs)


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar_splits_labels_names_and_pixels(tmp_path, bytes_keys):
    root = make_cifar(tmp_path, bytes_keys)
    assert cifar_module(root).split_source("val") == "CIFAR-100/train"  # default: a hold-out
    dm = cifar_module(root, val_fraction=0.0)
    assert dm.num_classes == 100 and dm.class_names == FINE_NAMES
    train, val, test = dm.dataset("train"), dm.dataset("val"), dm.dataset("test")
    assert (len(train), len(val), len(test)) == (16, 4, 4)  # val = test with val_fraction 0
    assert dm.split_source("val") == dm.split_source("test") == "CIFAR-100/test"
    assert [test[i]["label"] for i in range(4)] == [5, 7, 5, 7]
    sample = train[6]
    assert sample["index"] == 6 and sample["label"] == 2
    expected = torch.empty(3, 32, 32)
    expected[0], expected[1], expected[2] = 6 / 255, 100 / 255, 200 / 255
    expected[0, 2, 5] = 1.0
    torch.testing.assert_close(sample["image"], expected)


def test_cifar_root_may_be_the_pickle_folder(tmp_path):
    dm = cifar_module(make_cifar(tmp_path) / "cifar-100-python")
    assert len(dm.dataset("train")) == 16


def test_cifar_upsampling_resizes_without_crop(tmp_path):
    root = make_cifar(tmp_path)
    data = np.zeros((16, 3, 32, 32), np.uint8)
    data[:, 0, :, :16] = 255  # left half red, right half blue
    data[:, 2, :, 16:] = 255
    with (root / "cifar-100-python" / "train").open("wb") as handle:
        pickle.dump({b"data": data.reshape(16, 3072), b"fine_labels": [0] * 16}, handle)
    image = cifar_module(root, transform={"image_size": 64}).dataset("train")[0]["image"]
    assert image.shape == (3, 64, 64)
    assert image[0, :, :31].min() > 0.99 and image[2, :, :31].max() < 0.01
    assert image[2, :, 33:].min() > 0.99 and image[0, :, 33:].max() < 0.01


def test_cifar_val_fraction_holds_out_part_of_train(tmp_path):
    dm = cifar_module(make_cifar(tmp_path), val_fraction=0.25, split_seed=1)
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(train) == 12 and len(val) == 4
    assert sorted(val[i]["label"] for i in range(4)) == [0, 1, 2, 3]
    assert not set(train.positions.tolist()) & set(val.positions.tolist())
    assert [val[i]["index"] for i in range(4)] == [0, 1, 2, 3]
    assert len(dm.dataset("test")) == 4


def test_cifar_missing_files_name_the_path_and_layout(tmp_path):
    message = layout_error(lambda: cifar_module(tmp_path / "none").dataset("train"))
    assert str(tmp_path / "none" / "cifar-100-python") in message
    assert "{train,test,meta}" in message and "download" in message


def test_cifar_download_without_network_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    dm = cifar_module(tmp_path / "cifar", download=True)
    message = layout_error(dm.prepare_data)
    assert "network is unreachable" in message and CIFAR100_URL in message
    assert str(tmp_path / "cifar" / "cifar-100-python") in message


def test_cifar_corrupt_or_wrong_pickles(tmp_path):
    root = make_cifar(tmp_path)
    (root / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    message = layout_error(lambda: cifar_module(root).dataset("test"))
    assert str(root / "cifar-100-python" / "test") in message and "pickle" in message
    with (root / "cifar-100-python" / "train").open("wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, handle)
    message = layout_error(lambda: cifar_module(root).dataset("train"))
    assert str(root / "cifar-100-python" / "train") in message and "[N, 3072]" in message
