"""Quad grids: 2×2 mosaics of four images of distinct classes, for the grid pointing game.

Protocol (Rao et al. 2022, "Towards better understanding attribution methods"; VAR Sec. 4.1 and
App. B.1, "Quad-ImageNet"): four images of four *distinct* classes are placed in a 2×2 grid;
an attribution map for the class of one cell should put its positive mass in that cell
(chance = 1/4). Rao et al. build 448² grids from 224² cells and keep only images the model
classifies correctly with softmax confidence ≥ 0.99; the VAR code builds 224² grids from 112²
cells without that filter. Both are configurable here: ``cell_size`` sets the cell side and
the optional confidence filter (:func:`confident_indices`) restricts the candidate images;
without a filter model every image is a candidate (VAR code).

Sample ``i`` of a grid split is a pure function of ``(seed, i)`` and the candidate set: all
random draws come from a ``torch.Generator`` seeded by a stable hash (as the embedded shapes
benchmark does), so grids are identical across processes, workers, DDP ranks and machines.

Sample format (DESIGN.md "Sample format"):

* ``image`` ``[3, g·c, g·c]``: the normalised base images, each resized (bilinear, antialias)
  to ``c × c`` and placed row-major; the base datamodule's ``mean``/``std`` still apply.
* ``grid_labels`` ``[g²]`` long: the class of each cell, row-major (0 = top-left, 1 = top-right,
  2 = bottom-left, 3 = bottom-right), the order of
  :func:`saliency.metrics.functional.localisation.grid_cell_masks`.
* ``label``: ``grid_labels[0]`` (the top-left cell), only so that code expecting one label per
  image (accuracy, ground-truth target policies) runs; grid metrics use ``grid_labels``.
* ``index``: ``i``, the position in the grid split (exactly-once evaluation under DDP).
* ``cell_masks`` ``[g², g·c, g·c]`` bool: the region of each cell (equal to ``grid_cell_masks``).
* ``source_indices`` ``[g²]`` long: the base-split index of each cell's image.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from datamodules.base import collate_samples
from datamodules.split_source import split_source
from saliency.errors import ConfigurationError
from saliency.metrics.functional.localisation import grid_cell_masks

CACHE_FORMAT = 1
"""Version of the confidence-filter cache files; a file of another version is recomputed."""

STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}
"""Grid splits each Trainer stage reads."""

RAO_CONFIDENCE = 0.99
"""Rao et al. (2022): a grid image must be classified correctly with softmax ≥ 0.99."""


# --------------------------------------------------------------------------------------------
# Labels of a base dataset without rendering it
# --------------------------------------------------------------------------------------------


def dataset_labels(dataset: Dataset) -> list[int]:
    """The class label of every index of ``dataset``, without loading images when possible.

    Tried in order: a ``label_of(index)`` method (the embedded shapes benchmark); a ``labels``
    or ``targets`` sequence (torchvision style); ``records`` whose items have a ``label``
    (``RecordDataset``, CUB). A sequence is used only when its length equals ``len(dataset)``
    (a dataset that restricts a larger label array to a subset, e.g. a hold-out split, is not
    indexed by it). Otherwise every sample is loaded once and its ``label`` read — correct but
    as slow as one pass over the split; give the dataset a ``label_of`` method to avoid it.
    """
    n = len(dataset)  # type: ignore[arg-type]
    label_of = getattr(dataset, "label_of", None)
    if callable(label_of):
        return [int(label_of(i)) for i in range(n)]
    for name in ("labels", "targets"):
        values = getattr(dataset, name, None)
        if values is not None and not callable(values) and _sized(values) == n:
            return [int(v) for v in values]
    records = getattr(dataset, "records", None)
    if records is not None and _sized(records) == n and all(hasattr(r, "label") for r in records):
        return [int(r.label) for r in records]
    return [int(dataset[i]["label"]) for i in range(n)]


def _sized(values: Any) -> int | None:
    try:
        return len(values)
    except TypeError:
        return None


def _classes_of(labels: Sequence[int], candidates: Iterable[int]) -> dict[int, list[int]]:
    """Candidate indices per class, classes and indices in increasing order."""
    by_class: dict[int, list[int]] = {}
    for index in sorted(set(candidates)):
        by_class.setdefault(int(labels[index]), []).append(index)
    return dict(sorted(by_class.items()))


# --------------------------------------------------------------------------------------------
# The grid dataset
# --------------------------------------------------------------------------------------------


def grid_seed(seed: int, index: int) -> int:
    """Stable 63-bit seed of grid ``index`` (independent of Python's hash randomisation)."""
    digest = hashlib.blake2b(f"quad_grid/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _check_positive_int(value: Any, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {hint}")
    return value


class QuadGridDataset(Dataset):
    """``num_samples`` grids of ``grid × grid`` base images of distinct classes (Rao et al. 2022;
    VAR App. B.1). Sample format in the module docstring.

    Grid ``i`` draws, from a generator seeded by ``(seed, i)``, ``grid²`` distinct classes among
    the classes that have at least one candidate image (a random permutation, so the cell of
    each class is random too), then one candidate image of each class uniformly.

    Args:
        base_dataset: a map-style dataset yielding dicts with a normalised ``image`` ``[3, h, w]``.
        num_samples: number of grids (the length of this dataset).
        cell_size: side ``c`` of each cell; every base image is resized to ``c × c`` (bilinear,
            antialias; a non-square image is squashed). Rao et al.: 224, VAR code: 112.
        seed: grid seed; the same seed and candidates give identical grids.
        labels: the label of every base index (default: :func:`dataset_labels`).
        candidates: base indices allowed in grids, e.g. :func:`confident_indices`
            (default: all).
        grid: cells per side (2 for quad grids).
    """

    def __init__(
        self,
        base_dataset: Dataset,
        num_samples: int,
        cell_size: int,
        seed: int = 0,
        labels: Sequence[int] | None = None,
        candidates: Sequence[int] | None = None,
        grid: int = 2,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
        _check_positive_int(cell_size, "cell_size", "give the side of one grid cell in pixels")
        if _check_positive_int(grid, "grid", "use 2 for quad grids") < 2:
            raise ValueError(f"grid must be at least 2 cells per side, got {grid}")
        self.base = base_dataset
        self.num_samples = num_samples
        self.cell_size = cell_size
        self.seed = seed
        self.grid = grid
        n = len(base_dataset)  # type: ignore[arg-type]
        self.labels = list(labels) if labels is not None else dataset_labels(base_dataset)
        if len(self.labels) != n:
            raise ValueError(
                f"labels has {len(self.labels)} entries but the base dataset has {n} samples; "
                f"pass one label per base index (or labels=None to read them from the dataset)"
            )
        pool = range(n) if candidates is None else [int(i) for i in candidates]
        bad = [i for i in pool if not 0 <= i < n]
        if bad:
            raise ValueError(
                f"candidate indices {bad[:5]} lie outside the base dataset of {n} samples; "
                f"candidates must be base-split indices"
            )
        self.candidates_by_class = _classes_of(self.labels, pool)
        self.classes = list(self.candidates_by_class)
        cells = grid * grid
        if len(self.classes) < cells:
            raise ValueError(
                f"only {len(self.classes)} classes have candidate images "
                f"({sum(map(len, self.candidates_by_class.values()))} images); a {grid}×{grid} "
                f"grid needs {cells} distinct classes: allow more candidates or use a smaller grid"
            )
        side = grid * cell_size
        self._cell_masks = grid_cell_masks(torch.arange(cells), side, side, grid)

    def __len__(self) -> int:
        return self.num_samples

    def layout(self, index: int) -> tuple[list[int], list[int]]:
        """``(classes, source indices)`` of grid ``index``, row-major, without rendering."""
        g = torch.Generator().manual_seed(grid_seed(self.seed, index))
        cells = self.grid * self.grid
        order = torch.randperm(len(self.classes), generator=g)[:cells].tolist()
        classes = [self.classes[k] for k in order]
        sources = []
        for label in classes:
            pool = self.candidates_by_class[label]
            sources.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
        return classes, sources

    def resize_cell(self, image: torch.Tensor) -> torch.Tensor:
        """A base image ``[3, h, w]`` resized to the cell (bilinear, antialias)."""
        c = self.cell_size
        if tuple(image.shape[-2:]) == (c, c):
            return image
        return F.interpolate(
            image[None].float(), size=(c, c), mode="bilinear", align_corners=False, antialias=True
        )[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"grid index {index} out of range for {self.num_samples} grids")
        classes, sources = self.layout(index)
        c, g = self.cell_size, self.grid
        image: torch.Tensor | None = None
        for cell, (label, source) in enumerate(zip(classes, sources, strict=True)):
            sample = self.base[source]
            if int(sample["label"]) != label:
                raise ValueError(
                    f"base sample {source} has label {int(sample['label'])} but the label list "
                    f"says {label}; the base dataset's label_of/labels disagree with its samples"
                )
            tile = self.resize_cell(torch.as_tensor(sample["image"]))
            if image is None:
                image = tile.new_zeros(tile.shape[0], g * c, g * c)
            row, col = divmod(cell, g)
            image[:, row * c : (row + 1) * c, col * c : (col + 1) * c] = tile
        grid_labels = torch.tensor(classes, dtype=torch.long)
        return {
            "image": image,
            "grid_labels": grid_labels,
            "label": grid_labels[0].clone(),
            "index": torch.tensor(index),
            "cell_masks": self._cell_masks.clone(),
            "source_indices": torch.tensor(sources, dtype=torch.long),
        }


# --------------------------------------------------------------------------------------------
# Confidence filter (Rao et al.) with a file cache
# --------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the model's class and ``state_dict`` contents (names, dtypes, shapes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):  # e.g. a module's extra state
            digest.update(f"|{name}|{tensor!r}|".encode())
            continue
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_identity(
    dataset: Dataset, split: str | None = None, labels: Sequence[int] | None = None
) -> dict[str, Any]:
    """What identifies a base split in the cache key: class, split, length, a hash of the labels
    and a hash of the images of (up to) three probe samples (first, middle, last), which tells
    apart e.g. two shapes benchmarks with another ``data_seed`` or two roots of equal size.
    A dataset with random augmentation gives another probe hash on every call, so its filter
    is recomputed each time (never wrongly reused)."""
    n = len(dataset)  # type: ignore[arg-type]
    labels = dataset_labels(dataset) if labels is None else labels
    probes = hashlib.blake2b(digest_size=16)
    for index in sorted({0, n // 2, n - 1} if n else set()):
        image = torch.as_tensor(dataset[index]["image"]).detach().float().contiguous()
        probes.update(f"{index}|{tuple(image.shape)}|".encode())
        probes.update(image.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "split": split,
        "length": n,
        "labels": hashlib.blake2b(
            json.dumps(list(map(int, labels))).encode(), digest_size=16
        ).hexdigest(),
        "probes": probes.hexdigest(),
    }


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def _compute_confident(
    model: nn.Module,
    dataset: Dataset,
    threshold: float,
    batch_size: int,
    device: torch.device,
    num_workers: int,
) -> list[int]:
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_samples,
    )
    kept: list[int] = []
    position = 0
    for batch in loader:
        images = batch["image"].to(device)
        labels = torch.as_tensor(batch["label"]).to(device).long()
        probabilities = model(images).float().softmax(dim=1)
        p_label = probabilities.gather(1, labels[:, None])[:, 0]
        confident = (probabilities.argmax(dim=1) == labels) & (p_label >= threshold)
        kept.extend(position + int(k) for k in torch.nonzero(confident).flatten().tolist())
        position += images.shape[0]
    return kept


def confident_indices(
    model: nn.Module,
    dataset: Dataset,
    threshold: float = RAO_CONFIDENCE,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    split: str | None = None,
    num_workers: int = 0,
    labels: Sequence[int] | None = None,
) -> list[int]:
    """Indices of ``dataset`` that ``model`` classifies correctly with softmax probability of the
    true class ``≥ threshold`` (Rao et al. 2022: 0.99), in increasing order.

    The model sees the base images as the dataset yields them (normalised, at the base
    resolution), in batches of ``batch_size`` on ``device`` (default: the model's device); it
    is put in eval mode and moved to ``device`` only for the call (both restored after).

    With ``cache_dir`` the result is stored in ``<cache_dir>/confident-<key>.json``, the key a
    hash of the model's ``state_dict`` contents, the threshold and :func:`dataset_identity`
    (``split`` included). The file holds those fields and the index list, is written atomically
    (temporary file + ``os.replace``) and is trusted only when every field matches; a missing,
    unreadable or mismatched file is recomputed and rewritten. ``labels`` (default:
    :func:`dataset_labels`) only enter the key; the filter reads each batch's ``label``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"confidence threshold must be a softmax probability in [0, 1], got {threshold}; "
            f"Rao et al. use {RAO_CONFIDENCE}"
        )
    _check_positive_int(batch_size, "batch_size", "choose how many images to classify at once")
    record: dict[str, Any] | None = None
    path: Path | None = None
    if cache_dir is not None:
        record = {
            "format": CACHE_FORMAT,
            "model": model_fingerprint(model),
            "threshold": float(threshold),
            "dataset": dataset_identity(dataset, split, labels),
        }
        key = hashlib.blake2b(json.dumps(record, sort_keys=True).encode(), digest_size=12)
        path = Path(cache_dir).expanduser() / f"confident-{key.hexdigest()}.json"
        cached = _read_cache(path, record, len(dataset))  # type: ignore[arg-type]
        if cached is not None:
            return cached

    target = torch.device(device) if device is not None else _model_device(model)
    original_device, was_training = _model_device(model), model.training
    model.eval().to(target)
    try:
        kept = _compute_confident(model, dataset, threshold, batch_size, target, num_workers)
    finally:
        model.to(original_device).train(was_training)

    if path is not None and record is not None:
        _write_atomically(path, {**record, "indices": kept})
    return kept


def _read_cache(path: Path, record: dict[str, Any], length: int) -> list[int] | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or any(stored.get(k) != v for k, v in record.items()):
        return None
    indices = stored.get("indices")
    if not isinstance(indices, list) or not all(
        isinstance(i, int) and 0 <= i < length for i in indices
    ):
        return None
    return indices


def _write_atomically(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(content, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# The datamodule
# --------------------------------------------------------------------------------------------


def _base_image_size(base: Any, dataset: Dataset) -> int:
    """The base image side: from the datamodule's config when it has one, else sample 0."""
    for owner in ("config", "transform_config"):
        size = getattr(getattr(base, owner, None), "image_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the base split is empty; give cell_size explicitly")
    height, width = torch.as_tensor(dataset[0]["image"]).shape[-2:]
    if height != width:
        raise ValueError(
            f"base images are {height}×{width}, not square; give cell_size explicitly "
            f"(each image is resized to cell_size × cell_size)"
        )
    return int(height)


class QuadGridDataModule(L.LightningDataModule):
    """Quad grids (module docstring; Rao et al. 2022, VAR App. B.1) over any datamodule with
    ``dataset(split)``, ``num_classes``, ``class_names``, ``mean`` and ``std``; those four are
    the base's. Split ``s`` of the grids is built from split ``s`` of the base.

    Args:
        base: the datamodule whose images fill the cells (in YAML a nested
            ``class_path``/``init_args``; see ``configs/data/quad_shapes.yaml``).
        cell_size: side of each cell (default: the base image size); grids are twice as large.
            Rao et al.: 224 (448² grids), VAR code: 112 (224² grids).
        train_samples, val_samples, test_samples: grids per split (0: no loader for it).
            Train grids use the base's train transform, including its random augmentation.
        seed: grid seed (the same seed and filter give identical grids).
        filter_checkpoint: a ``train.py`` (``ClassifierModule``) checkpoint whose network filters
            the candidate images (Rao et al.); None and no other filter: all images (VAR code).
        filter_trainer_model: filter with the LightningModule the Trainer runs (in
            ``evaluate.py`` the model being explained, Rao et al.'s protocol). Do not use it
            when training: an untrained model keeps almost nothing.
        confidence_threshold: softmax probability of the true class an image needs (0.99).
        cache_dir: where filtered index lists are cached (None: no cache, every rank recomputes).
        filter_batch_size: batch size of the filter pass.
        filter_device: device of the filter pass (default: the Trainer's root device, else the
            model's).
        batch_size, num_workers: grid loading.

    A filter model can also be set in Python with :meth:`set_filter_model` (it takes precedence).
    With a cache, ``prepare_data`` (rank 0 of each node) computes the filter once and every
    rank's ``setup`` reads it; without one, every rank computes it.
    """

    def __init__(
        self,
        base: L.LightningDataModule,
        cell_size: int | None = None,
        train_samples: int = 0,
        val_samples: int = 1000,
        test_samples: int = 1000,
        seed: int = 0,
        filter_checkpoint: str | None = None,
        filter_trainer_model: bool = False,
        confidence_threshold: float = RAO_CONFIDENCE,
        cache_dir: str | None = "outputs/cache/quad_grids",
        filter_batch_size: int = 64,
        filter_device: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        # The base is an object; the run's config.yaml records its class_path and init_args.
        self.save_hyperparameters(ignore=["base"])
        if not callable(getattr(base, "dataset", None)):
            raise ConfigurationError(
                f"base {type(base).__name__} has no dataset(split) method; quad grids need a "
                f"datamodule such as datamodules.ShapesDataModule or a FileDataModule"
            )
        if cell_size is not None:
            _check_positive_int(cell_size, "cell_size", "or None for the base image size")
        for name, value in (("train", train_samples), ("val", val_samples), ("test", test_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{name}_samples must be a non-negative number of grids, got {value!r}"
                )
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(
                f"confidence_threshold must be a probability in [0, 1], got "
                f"{confidence_threshold}; Rao et al. use {RAO_CONFIDENCE}"
            )
        if filter_checkpoint is not None and filter_trainer_model:
            raise ConfigurationError(
                "give either filter_checkpoint or filter_trainer_model=true, not both"
            )
        self.base = base
        self.cell_size = cell_size
        self.samples = {"train": train_samples, "val": val_samples, "test": test_samples}
        self.seed = seed
        self.filter_checkpoint = filter_checkpoint
        self.filter_trainer_model = filter_trainer_model
        self.confidence_threshold = confidence_threshold
        self.cache_dir = cache_dir
        self.filter_batch_size = filter_batch_size
        self.filter_device = filter_device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._filter_model: nn.Module | None = None
        self._datasets: dict[str, QuadGridDataset] = {}

    # -- the base's description --------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self.base.num_classes  # type: ignore[attr-defined]

    @property
    def class_names(self) -> list[str]:
        return self.base.class_names  # type: ignore[attr-defined]

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.base.mean  # type: ignore[attr-defined]

    @property
    def std(self) -> tuple[float, float, float]:
        return self.base.std  # type: ignore[attr-defined]

    # -- the filter ---------------------------------------------------------------------------

    def set_filter_model(self, model: nn.Module | None) -> None:
        """Filter candidate images with ``model`` (images → logits); None removes the filter
        set here. Grids built before are rebuilt on next use."""
        self._filter_model = model
        self._datasets.clear()

    def filter_model(self) -> nn.Module | None:
        """The model that filters candidates: :meth:`set_filter_model`'s, else the network of
        ``filter_checkpoint`` (loaded once), else the Trainer's module if
        ``filter_trainer_model``, else None (no filter)."""
        if self._filter_model is not None:
            return self._filter_model
        if self.filter_checkpoint is not None:
            from lightning_modules.evaluation import load_classifier

            self._filter_model = load_classifier(Path(self.filter_checkpoint)).model
            return self._filter_model
        if self.filter_trainer_model:
            trainer = getattr(self, "trainer", None)
            module = trainer.lightning_module if trainer is not None else None
            if module is None:
                raise ConfigurationError(
                    "filter_trainer_model=true needs the datamodule to be used by a Trainer "
                    "with a model; outside a Trainer call set_filter_model(model)"
                )
            return module
        return None

    def _filter_device(self, model: nn.Module) -> torch.device:
        if self.filter_device is not None:
            return torch.device(self.filter_device)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return _model_device(model)

    def candidates(self, split: str, labels: Sequence[int] | None = None) -> list[int] | None:
        """Base indices of ``split`` allowed in grids: the confident ones when a filter model is
        set (computed once, cached under ``cache_dir``), else None (all)."""
        model = self.filter_model()
        if model is None:
            return None
        return confident_indices(
            model,
            self.base.dataset(split),  # type: ignore[attr-defined]
            labels=labels,
            threshold=self.confidence_threshold,
            batch_size=self.filter_batch_size,
            device=self._filter_device(model),
            cache_dir=self.cache_dir,
            split=split,
            num_workers=self.num_workers,
        )

    # -- grids --------------------------------------------------------------------------------

    def split_source(self, split: str) -> str | None:
        """The base's source of ``split``: grids of split s are built from the base's split s
        (:mod:`datamodules.split_source`); None when the base declares none."""
        return split_source(self.base, split)

    def dataset(self, split: str) -> QuadGridDataset:
        """The grids of ``split`` (built once; ``<split>_samples`` of them)."""
        if split not in self.samples:
            raise ValueError(f"unknown split {split!r}; expected one of {list(self.samples)}")
        if split not in self._datasets:
            base_dataset = self.base.dataset(split)  # type: ignore[attr-defined]
            labels = dataset_labels(base_dataset)
            candidates = self.candidates(split, labels)
            if candidates is not None:
                classes = len({labels[i] for i in candidates})
                if classes < 4:
                    raise ConfigurationError(
                        f"the confidence filter (threshold {self.confidence_threshold}) kept "
                        f"{len(candidates)} of {len(base_dataset)} {split} images from only "
                        f"{classes} classes; a 2×2 grid needs 4 distinct classes: lower "
                        f"confidence_threshold, filter with a better model, or drop the filter"
                    )
            cell_size = self.cell_size or _base_image_size(self.base, base_dataset)
            self._datasets[split] = QuadGridDataset(
                base_dataset, self.samples[split], cell_size, self.seed, labels, candidates
            )
        return self._datasets[split]

    def _splits_of(self, stage: str | None) -> list[str]:
        """Splits with grids that ``stage`` (``fit``, ``validate``, ``test``, ``predict``; None:
        all) reads."""
        splits = STAGE_SPLITS.get(stage, tuple(self.samples)) if stage else tuple(self.samples)
        return [split for split in splits if self.samples[split] > 0]

    def prepare_data(self) -> None:
        """With a filter and a cache: compute the filter of each split the Trainer's stage
        needs (all splits outside a Trainer), once, on rank 0 of each node."""
        if self.cache_dir is None or self.filter_model() is None:
            return
        trainer = getattr(self, "trainer", None)
        stage = trainer.state.fn.value if trainer is not None and trainer.state.fn else None
        for split in self._splits_of(stage):
            base_dataset = self.base.dataset(split)  # type: ignore[attr-defined]
            self.candidates(split, dataset_labels(base_dataset))

    def setup(self, stage: str) -> None:
        for split in self._splits_of(stage):
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.samples[split] == 0:
            raise ConfigurationError(
                f"QuadGridDataModule has no {split} grids: set {split}_samples > 0"
            )
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
