"""Quad grids: 2×2 mosaics of four images of distinct classes, for the grid pointing game.

Protocol (Rao et al. 2022, "Towards better understanding attribution methods"; VAR Sec. 4.1 and
App. B.1, "Quad-ImageNet"): four images of four *distinct* classes are placed in a 2×2 grid;
an attribution map for the class of one cell should put its positive mass in that cell
(chance = 1/4). Rao et al. build 448² grids from 224² cells and keep only images the model
classifies correctly with softmax confidence ≥ 0.99; the VAR code builds 224² grids from 112²
cells without that filter. Both are configurable: ``cell_size`` sets the cell side and the
candidate images can be restricted (:func:`datamodules.confidence_filter.confident_indices`);
without a filter every image is a candidate (VAR code). The datamodule over a base datamodule
is :class:`datamodules.quad_grid.QuadGridDataModule`.

Sample ``i`` of a grid split is a pure function of ``(seed, i)`` and the candidate set: all
random draws come from a ``torch.Generator`` seeded by a stable hash (as the embedded shapes
benchmark does), so grids are identical across processes, workers, DDP ranks and machines.

Sample format (DESIGN.md "Sample format"):

* ``image`` ``[3, g·c, g·c]``: the normalised base images, each resized (bilinear, antialias)
  to ``c × c`` and placed row-major; the base datamodule's ``mean``/``std`` still apply.
* ``grid_labels`` ``[g²]`` long: the class of each cell, row-major (0 = top-left, 1 = top-right,
  2 = bottom-left, 3 = bottom-right), the order of
  :func:`contrastive_saliency.metrics.functional.localisation.grid_cell_masks`.
* ``label``: ``grid_labels[0]`` (the top-left cell), only so that code expecting one label per
  image (accuracy, ground-truth target policies) runs; grid metrics use ``grid_labels``.
* ``index``: ``i``, the position in the grid split (exactly-once evaluation under DDP).
* ``cell_masks`` ``[g², g·c, g·c]`` bool: the region of each cell (equal to ``grid_cell_masks``).
* ``source_indices`` ``[g²]`` long: the base-split index of each cell's image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from contrastive_saliency.checks import check_positive_int
from contrastive_saliency.metrics.functional.localisation import grid_cell_masks
from datamodules.dataset_labels import dataset_labels


def _classes_of(labels: Sequence[int], candidates: Iterable[int]) -> dict[int, list[int]]:
    """Candidate indices per class, classes and indices in increasing order."""
    by_class: dict[int, list[int]] = {}
    for index in sorted(set(candidates)):
        by_class.setdefault(int(labels[index]), []).append(index)
    return dict(sorted(by_class.items()))


def grid_seed(seed: int, index: int) -> int:
    """Stable 63-bit seed of grid ``index`` (independent of Python's hash randomisation)."""
    digest = hashlib.blake2b(f"quad_grid/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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
        check_positive_int(cell_size, "cell_size", "give the side of one grid cell in pixels")
        if check_positive_int(grid, "grid", "use 2 for quad grids") < 2:
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
