"""CIFAR-100 from the python pickle release.

On-disk format (``root`` may also be the ``cifar-100-python`` folder itself)::

    <root>/cifar-100-python/train   pickle: {b'data': uint8 [50000, 3072], b'fine_labels',
                                             b'coarse_labels', b'filenames', b'batch_label'}
    <root>/cifar-100-python/test    same, 10000 images
    <root>/cifar-100-python/meta    pickle: {b'fine_label_names': [100], b'coarse_label_names'}

Each ``data`` row is a 32×32 RGB image stored channel-major (1024 R, 1024 G, 1024 B values,
rows top to bottom). Pickles written by Python 2 (the official files, str keys) and by
Python 3 (bytes keys) are both read.

``download=True`` fetches and extracts the archive with torchvision's downloader when the
files are missing; without network that fails with a :class:`DatasetLayoutError` saying
where to put the files. Splits: ``train`` = the train file; ``val`` = a seeded stratified
hold-out of ``val_fraction`` (default 0.1, 50 images per class) of the train file (``train``
then holds the rest), so that a confusion matrix of ``val`` (CASE's contrast classes) never
comes from the test images it explains; ``val_fraction: 0`` makes ``val`` the test file (the
usual CIFAR protocol, val = test); ``test`` = the test file. Images are upsampled to
``transform.image_size²`` with a plain resize (no crop: ``transform.resize_size`` None), e.g.
224 for ImageNet-sized models.
"""

from __future__ import annotations

import pickle
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datamodules.base import DatasetLayoutError, FileDataModule
from datamodules.file_lists import stratified_holdout, transform_sample
from datamodules.transforms import SampleTransform, TransformConfig

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR100_TRANSFORM = TransformConfig(
    image_size=32, resize_size=None, mean=CIFAR100_MEAN, std=CIFAR100_STD
)
"""The default transform: the native 32² images, CIFAR-100 statistics."""
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
NUM_CLASSES = 100


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with ``str`` keys (bytes keys and bytes strings decoded)."""
    try:
        with path.open("rb") as handle:
            raw = pickle.load(handle, encoding="latin1")
    except FileNotFoundError as error:
        raise DatasetLayoutError(
            f"CIFAR-100 file {str(path)!r} is missing; expected the python release "
            f"(train, test, meta in {FOLDER}/)"
        ) from error
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DatasetLayoutError(
            f"CIFAR-100 file {str(path)!r} is not a readable pickle ({error}); expected the "
            f"python release from {CIFAR100_URL}"
        ) from error
    if not isinstance(raw, dict):
        raise DatasetLayoutError(f"CIFAR-100 file {str(path)!r} does not hold a dict")

    def text(value: Any) -> Any:
        return value.decode("latin1") if isinstance(value, bytes) else value

    return {
        text(key): [text(v) for v in value] if isinstance(value, list) else value
        for key, value in raw.items()
    }


class CIFAR100Dataset(Dataset):
    """``images`` uint8 ``[N, 32, 32, 3]`` and ``labels`` ``[N]``, restricted to ``positions``;
    items are dicts with ``image``, ``label``, ``index`` (position in this split)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: SampleTransform,
        positions: np.ndarray | None = None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.positions = np.arange(len(labels)) if positions is None else np.asarray(positions)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.positions)

    def label_of(self, index: int) -> int:
        """The label of item ``index`` without decoding its image."""
        return int(self.labels[self.positions[index]])

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = int(self.positions[index])
        image, _, _ = transform_sample(self.transform, Image.fromarray(self.images[position]))
        return {"image": image, "label": int(self.labels[position]), "index": index}


class CIFAR100DataModule(FileDataModule):
    """CIFAR-100 (100 fine classes) from the python pickles; format in the module docstring.

    Args:
        root: directory holding ``cifar-100-python/`` (or that folder itself).
        download: fetch the archive with torchvision when the files are missing.
        val_fraction: in (0, 1) (default 0.1) → ``val`` is a seeded stratified hold-out of
            the train set; 0 → ``val`` is the test set.
        split_seed: seed of that hold-out.
        transform: as :class:`~datamodules.base.FileDataModule`, with CIFAR's defaults
            (:data:`CIFAR100_TRANSFORM`): ``image_size`` 32 keeps the native size, e.g. 224
            upsamples; ``resize_size`` ``None`` resizes straight to ``image_size²`` (a value
            resizes the shorter side, then centre-crops); CIFAR-100 mean and std (use the
            ImageNet ones for ImageNet-pretrained models).
        Remaining arguments: see :class:`~datamodules.base.FileDataModule`.
    """

    def __init__(
        self,
        root: str | Path = "data/cifar100",
        download: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 4,
        transform: TransformConfig = CIFAR100_TRANSFORM,
    ) -> None:
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, transform=transform)
        self.save_hyperparameters()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        self.download = download
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self._array_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def folder(self) -> Path:
        """The ``cifar-100-python`` folder (``root`` itself if it already is one)."""
        if not (self.root / FOLDER).is_dir() and (self.root / "meta").is_file():
            return self.root
        return self.root / FOLDER

    @property
    def layout(self) -> str:
        return (
            f"{self.root / FOLDER}/{{train,test,meta}} (the python pickles of {CIFAR100_URL}, "
            f"extracted into {self.root})"
        )

    def _files_present(self) -> bool:
        return all((self.folder / name).is_file() for name in ("train", "test", "meta"))

    def prepare_data(self) -> None:
        if self.download:
            self._ensure_files()

    def _ensure_files(self) -> Path:
        if self._files_present():
            return self.folder
        if not self.download:
            missing = [n for n in ("train", "test", "meta") if not (self.folder / n).is_file()]
            raise DatasetLayoutError(
                f"CIFAR-100 files {missing} not found in {str(self.folder)!r}; expected "
                f"{self.layout}, or set download: true"
            )
        from torchvision.datasets import CIFAR100

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            CIFAR100(str(self.root), train=True, download=True)
        except (OSError, RuntimeError) as error:  # URLError and socket errors are OSErrors
            raise DatasetLayoutError(
                f"could not download CIFAR-100 into {str(self.root)!r} ({error}); without "
                f"network, fetch {CIFAR100_URL} elsewhere and extract it so that {self.layout}"
            ) from error
        return self.folder

    @cached_property
    def class_names(self) -> list[str]:
        meta = read_cifar_pickle(self._ensure_files() / "meta")
        names = meta.get("fine_label_names")
        if not isinstance(names, list) or len(names) != NUM_CLASSES:
            raise DatasetLayoutError(
                f"{str(self.folder / 'meta')!r} has no list of {NUM_CLASSES} 'fine_label_names'; "
                f"expected {self.layout}"
            )
        return [str(n) for n in names]

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    def _arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images [N, 32, 32, 3] uint8, fine labels [N])`` of the ``train``/``test`` file,
        read once."""
        if name not in self._array_cache:
            self._array_cache[name] = self._read_arrays(name)
        return self._array_cache[name]

    def _read_arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        path = self._ensure_files() / name
        content = read_cifar_pickle(path)
        expected = f"a dict with 'data' (uint8 [N, 3072]) and 'fine_labels' (N ints); {self.layout}"
        if "data" not in content or "fine_labels" not in content:
            raise DatasetLayoutError(
                f"{str(path)!r} has keys {sorted(content)}; expected {expected}"
            )
        data = np.asarray(content["data"])
        labels = np.asarray(content["fine_labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetLayoutError(
                f"{str(path)!r} holds data {data.dtype} {data.shape}; expected {expected}"
            )
        if len(labels) != len(data) or (
            labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES
        ):
            raise DatasetLayoutError(
                f"{str(path)!r} has {len(labels)} fine labels for {len(data)} images (range "
                f"{labels.min() if labels.size else None}..{labels.max() if labels.size else None}); "
                f"expected {expected}"
            )
        images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        return images, labels

    @cached_property
    def _train_positions(self) -> tuple[np.ndarray, np.ndarray]:
        labels = self._arrays("train")[1]
        kept, held = stratified_holdout(labels.tolist(), self.val_fraction, self.split_seed)
        return np.asarray(kept, dtype=np.int64), np.asarray(held, dtype=np.int64)

    def split_source(self, split: str) -> str:
        """``CIFAR-100/test`` or ``CIFAR-100/train`` (:mod:`datamodules.split_source`)."""
        held_out = split == "val" and self.val_fraction > 0
        return f"CIFAR-100/{'train' if split == 'train' or held_out else 'test'}"

    def build_dataset(self, split: str) -> Dataset:
        transform = self.transform(split)
        if split == "test" or (split == "val" and self.val_fraction == 0):
            return CIFAR100Dataset(*self._arrays("test"), transform)
        images, labels = self._arrays("train")
        if self.val_fraction == 0:
            return CIFAR100Dataset(images, labels, transform)
        kept, held = self._train_positions
        return CIFAR100Dataset(images, labels, transform, kept if split == "train" else held)
