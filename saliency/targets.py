"""Contrast / reference-class selectors: ``selector(logits [B, N], targets [B]) -> [B, k]``.

CASE takes its contrast set from a validation confusion matrix (:class:`ConfusionContrast`);
Finer-CAM compares with the classes whose logits are nearest the target's
(:class:`LogitNeighbours`) or, in its first code version, the other top predictions
(:class:`TopPredictions`). Selectors never return the target itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saliency.errors import ConfigurationError

__all__ = ["ConfusionContrast", "LogitNeighbours", "TopPredictions", "load_confusion_matrix"]


def load_confusion_matrix(path: str | Path) -> torch.Tensor:
    """Read the ``confusion_matrix.npy`` or ``.csv`` (class names as header and index) that
    ``train.py`` writes to ``outputs/<run>/``; rows = true class, columns = predicted class."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"confusion matrix file {str(path)!r} does not exist; train.py writes "
            f"outputs/<run>/confusion_matrix.npy (and .csv) after each validation epoch"
        )
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return torch.as_tensor(np.load(path, allow_pickle=False), dtype=torch.float64)
    if suffix == ".csv":
        import pandas as pd

        return torch.as_tensor(pd.read_csv(path, index_col=0).to_numpy(), dtype=torch.float64)
    raise ConfigurationError(
        f"confusion matrix file {str(path)!r} has suffix {suffix!r}; pass a .npy or .csv file "
        f"as written by train.py, or the matrix itself"
    )


def _check_k(k: int, num_classes: int | None = None) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigurationError(f"k must be a positive integer, got {k!r}")
    if num_classes is not None and k >= num_classes:
        raise ConfigurationError(
            f"k={k} contrast classes requested but the model has {num_classes} classes, so at "
            f"most {num_classes - 1} other classes exist; choose k <= {num_classes - 1}"
        )


def _check_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    if targets.dim() != 1:
        raise ConfigurationError(f"targets must be LongTensor[B], got shape {tuple(targets.shape)}")
    targets = targets.long()
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ConfigurationError(
            f"target classes must lie in [0, {num_classes - 1}]; got min {int(targets.min())}, "
            f"max {int(targets.max())}"
        )
    return targets


class ConfusionContrast:
    """CASE contrast set (Eq. 2, Alg. 1 line 4): the k classes the model most often predicts
    for images of the target class, ``V = argmax^k_{v ≠ u} M[u, v]``.

    ``matrix``: ``[N, N]`` counts (rows = true class) as array/tensor, or the path of the
    ``.npy``/``.csv`` that ``train.py`` writes. As the reference code, rows are normalised per
    true class and the diagonal is zeroed; ties are broken by the lower class index. Logits are
    ignored. CASE's paper uses k = 3–5, its evaluation scripts k = 1.
    """

    def __init__(self, matrix: np.ndarray | torch.Tensor | str | Path, k: int = 5) -> None:
        if isinstance(matrix, (str, Path)):
            matrix = load_confusion_matrix(matrix)
        matrix = torch.as_tensor(np.asarray(matrix) if not torch.is_tensor(matrix) else matrix)
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
            raise ConfigurationError(
                f"confusion matrix must be square [N, N] with N >= 2 (rows = true class), got "
                f"shape {tuple(matrix.shape)}"
            )
        _check_k(k, matrix.shape[0])
        matrix = matrix.double()
        if not torch.isfinite(matrix).all() or (matrix < 0).any():
            raise ConfigurationError("confusion matrix entries must be finite and non-negative")
        rows = matrix.sum(dim=1, keepdim=True)
        normalised = matrix / rows.clamp_min(torch.finfo(torch.float64).tiny)
        normalised.fill_diagonal_(0.0)
        self.matrix = normalised
        self.k = k
        # Stable descending sort: ties go to the lower class index; the target sorts last.
        ranking = normalised.clone().fill_diagonal_(-1.0)
        order = torch.sort(ranking, dim=1, descending=True, stable=True).indices
        self.contrasts = order[:, :k].contiguous()  # [N, k]

    @property
    def num_classes(self) -> int:
        return self.matrix.shape[0]

    def __call__(self, logits: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        if logits is not None and logits.shape[-1] != self.num_classes:
            raise ConfigurationError(
                f"the confusion matrix has {self.num_classes} classes but the model outputs "
                f"{logits.shape[-1]} logits; use the matrix of this model's training run"
            )
        targets = _check_targets(targets, self.num_classes)
        return self.contrasts.to(targets.device)[targets]

    def __repr__(self) -> str:
        return f"ConfusionContrast(num_classes={self.num_classes}, k={self.k})"


class LogitNeighbours:
    """Finer-CAM references (Sec. 3.2; PROTOCOLS): the k other classes whose logits are nearest
    the target's, ranked by ``|y_j − y_c|`` (ties to the lower class index)."""

    def __init__(self, k: int = 3) -> None:
        _check_k(k)
        self.k = k

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_k(self.k, logits.shape[1])
        targets = _check_targets(targets, logits.shape[1])
        distance = (logits - logits.gather(1, targets[:, None])).abs()
        distance = distance.scatter(1, targets[:, None], float("inf"))
        return torch.sort(distance, dim=1, stable=True).indices[:, : self.k]

    def __repr__(self) -> str:
        return f"LogitNeighbours(k={self.k})"


class TopPredictions:
    """The k highest-scoring classes other than the target (Finer-CAM's first code version)."""

    def __init__(self, k: int = 3) -> None:
        _check_k(k)
        self.k = k

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_k(self.k, logits.shape[1])
        targets = _check_targets(targets, logits.shape[1])
        scores = logits.scatter(1, targets[:, None], float("-inf"))
        return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : self.k]

    def __repr__(self) -> str:
        return f"TopPredictions(k={self.k})"
