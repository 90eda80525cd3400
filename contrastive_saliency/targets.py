"""Contrast / reference-class selectors: ``selector(logits [B, N], targets [B]) -> [B, k]``.

CASE takes its contrast set from a validation confusion matrix (:class:`ConfusionContrast`);
Finer-CAM compares with the classes whose logits are nearest the target's
(:class:`LogitNeighbours`) or, in its first code version, the other top predictions
(:class:`TopPredictions`); :class:`ExplicitReferences` passes references chosen by hand
(per sample) wherever these selectors are accepted. Reference selectors never return the
target itself. Only :class:`ConfusionContrast` with ``fallback="none"`` may return fewer than k
classes for a row: its empty slots hold :data:`PADDING` (``-1``), after the valid ones.

VAR's class set C′ (:class:`ClassSet`) is the exception: it returns the target FIRST
(column 0) followed by the classes it competes with, ``class_set(logits, targets) -> [B, K′]``.

Call convention shared by all of them: with K targets per image, the methods call the selector
once with the logits repeated per target (``logits.repeat_interleave(K, dim=0)``, ``[B·K, N]``)
and the flattened targets (``targets.reshape(-1)``, ``[B·K]``), so row ``b·K + j`` belongs to
image ``b``, target ``j``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from contrastive_saliency.checks import check_positive_int
from contrastive_saliency.errors import ConfigurationError

__all__ = [
    "PADDING",
    "ClassSet",
    "ConfusionContrast",
    "ExplicitReferences",
    "LogitNeighbours",
    "TopPredictions",
    "load_confusion_matrix",
]


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
    check_positive_int(k, "k")
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


ConfusionFallback = Literal["top_predictions", "none"]
PADDING = -1  # marks an empty contrast slot (ConfusionContrast with fallback="none")


class ConfusionContrast:
    """CASE contrast set (Eq. 2, Alg. 1 line 4): the k classes the model most often predicts
    for images of the target class, ``V = argmax^k_{v ≠ u} M[u, v]``, computed on held-out data
    (Sec. III-C: "a held-out validation set"; see :mod:`callbacks.confusion_matrix`).

    ``matrix``: ``[N, N]`` counts (rows = true class) as array/tensor, or the path of the
    ``.npy``/``.csv`` that ``train.py`` writes. As the reference code, rows are normalised per
    true class and the diagonal is zeroed. ``k = 3`` (default): the paper, "small values (e.g.
    k = 3) suffice" (Sec. VIII); the authors' code uses k = 5 in its CASE class and k = 1 in its
    evaluation scripts (``docs/deviations.md``).

    Only classes the model actually confused with the target (a positive off-diagonal entry of
    its row) are taken from the matrix — never a zero-confusion class. A row with fewer than
    ``k`` confusions (common with an accurate model and few validation images per class) is
    completed by ``fallback``:

    - ``"top_predictions"`` (default): the image's highest-logit other classes not already in
      the set, i.e. what this image is most likely confused with (needs the logits);
    - ``"none"``: no completion; the row holds fewer contrasts and its empty slots are
      :data:`PADDING` (``-1``) at the end. CASE then averages γ̄ (Eq. 4) over the valid
      contrasts only; a target with no confusion at all gets γ̄ = 0, so CASE's map for it is
      plain Grad-CAM (nothing is projected out).

    Ties among equal confusion values (frequent with small counts: 1, 2, ... images) go to the
    class with the higher logit for this image, then to the lower class index; the paper states
    no rule, and a rule by class index alone would favour low indices. Without logits
    (``selector(None, targets)``) ties go to the lower class index and ``"top_predictions"``
    cannot complete a short row (an error says so).

    :meth:`contrasts_from_matrix` gives, per target, how many contrasts came from the matrix
    (``min(k, confusions of the target)``): the evaluation records it per sample.
    """

    def __init__(
        self,
        matrix: np.ndarray | torch.Tensor | str | Path,
        k: int = 3,
        fallback: ConfusionFallback = "top_predictions",
    ) -> None:
        if isinstance(matrix, (str, Path)):
            matrix = load_confusion_matrix(matrix)
        matrix = torch.as_tensor(np.asarray(matrix) if not torch.is_tensor(matrix) else matrix)
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
            raise ConfigurationError(
                f"confusion matrix must be square [N, N] with N >= 2 (rows = true class), got "
                f"shape {tuple(matrix.shape)}"
            )
        _check_k(k, matrix.shape[0])
        if fallback not in ("top_predictions", "none"):
            raise ConfigurationError(
                f"confusion selector fallback must be 'top_predictions' (complete a short "
                f"contrast set with the image's highest-logit other classes) or 'none' (fewer "
                f"contrasts), got {fallback!r}"
            )
        matrix = matrix.double()
        if not torch.isfinite(matrix).all() or (matrix < 0).any():
            raise ConfigurationError("confusion matrix entries must be finite and non-negative")
        rows = matrix.sum(dim=1, keepdim=True)
        normalised = matrix / rows.clamp_min(torch.finfo(torch.float64).tiny)
        normalised.fill_diagonal_(0.0)
        self.matrix = normalised
        self.k = k
        self.fallback = fallback
        self.confusions = (normalised > 0).sum(dim=1)  # [N]: confused classes per true class

    @property
    def num_classes(self) -> int:
        return self.matrix.shape[0]

    def contrasts_from_matrix(self, targets: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B]``: how many of each target's contrasts are confusions from the
        matrix (the rest, ``k`` minus this, come from the fallback or are empty)."""
        targets = _check_targets(targets, self.num_classes)
        return self.confusions.to(targets.device)[targets].clamp_max(self.k)

    def __call__(self, logits: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        if logits is not None and logits.shape[-1] != self.num_classes:
            raise ConfigurationError(
                f"the confusion matrix has {self.num_classes} classes but the model outputs "
                f"{logits.shape[-1]} logits; use the matrix of this model's training run"
            )
        targets = _check_targets(targets, self.num_classes)
        if logits is not None:
            _check_rows(logits, targets, "ConfusionContrast")
        device = targets.device
        confusion = self.matrix.to(device)[targets]  # [B, N], target column 0
        # The target sorts last: below every zero-confusion class.
        confusion = confusion.scatter(1, targets[:, None], -1.0)
        order = torch.arange(self.num_classes, device=device).expand_as(confusion)
        if logits is not None:
            # Secondary key first (stable sorts): the image's logits, descending.
            order = torch.sort(logits.to(device), dim=1, descending=True, stable=True).indices
        primary = confusion.gather(1, order)
        ranked = order.gather(1, torch.sort(primary, dim=1, descending=True, stable=True).indices)
        contrasts = ranked[:, : self.k]
        from_matrix = self.confusions.to(device)[targets].clamp_max(self.k)  # [B]
        short = torch.arange(self.k, device=device)[None, :] >= from_matrix[:, None]
        if self.fallback == "none":
            return contrasts.masked_fill(short, PADDING)
        if logits is None and bool(short.any()):
            row = int(short.any(dim=1).nonzero()[0, 0])
            raise ConfigurationError(
                f"target class {int(targets[row])} has only {int(from_matrix[row])} confused "
                f"classes in the matrix (k={self.k}); fallback='top_predictions' completes the "
                f"set from the image's logits, but the selector was called without logits: "
                f"pass them, or use fallback='none'"
            )
        return contrasts  # after the confusions: highest-logit other classes

    def __repr__(self) -> str:
        return (
            f"ConfusionContrast(num_classes={self.num_classes}, k={self.k}, "
            f"fallback={self.fallback!r})"
        )


NeighbourMode = Literal["below", "nearest"]


class LogitNeighbours:
    """Finer-CAM references (Sec. 3.2, Table 2): the k classes most similar to the target by
    the logits. Both modes give the 2nd, 3rd, 4th predictions for a top-1 target (Table 2's
    "2nd / 3rd / 4th Pred"); they differ when the target is not the top-1.

    ``mode="below"`` (default, the paper's ranking): the k classes ranked just below the target
    in descending logit order (target ranked r: ranks r+1, …, r+k), so no reference is more
    probable than the target. Only when fewer than k classes rank below it is the shortfall
    filled with the classes just above it, nearest first (a target ranked last gets ranks
    r−1, r−2, …). ``mode="nearest"`` (the authors' code, ``finer_cam.py`` with
    ``target_idx``): the k other classes with the smallest ``|y_j − y_c|``, above or below.
    Equal logits rank the lower class index first in both modes.
    """

    def __init__(self, k: int = 3, mode: NeighbourMode = "below") -> None:
        _check_k(k)
        if mode not in ("below", "nearest"):
            raise ConfigurationError(
                f"LogitNeighbours mode must be 'below' (the classes ranked just below the "
                f"target, the paper) or 'nearest' (smallest |logit difference|, the authors' "
                f"code), got {mode!r}"
            )
        self.k = k
        self.mode = mode

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_k(self.k, logits.shape[1])
        targets = _check_targets(targets, logits.shape[1]).to(logits.device)
        if self.mode == "nearest":
            key = (logits - logits.gather(1, targets[:, None])).abs()
        else:
            order = torch.sort(logits, dim=1, descending=True, stable=True).indices
            positions = torch.arange(logits.shape[1], device=logits.device).expand_as(order)
            rank = torch.empty_like(order).scatter_(1, order, positions)  # rank of each class
            offset = (rank - rank.gather(1, targets[:, None])).double()  # > 0: below target
            key = torch.where(offset > 0, offset, logits.shape[1] - offset)  # then above it
        key = key.scatter(1, targets[:, None], float("inf"))
        return torch.sort(key, dim=1, stable=True).indices[:, : self.k]

    def __repr__(self) -> str:
        return f"LogitNeighbours(k={self.k}, mode={self.mode!r})"


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


ClassSetMode = Literal["top_k_least", "fixed"]


def _check_count(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigurationError(
            f"ClassSet k (the number of most probable other classes) must be an integer >= 0, "
            f"got {k!r}; k=0 gives the target plus the least probable class"
        )


def _as_class_table(values: object, what: str, dims: tuple[int, ...]) -> torch.Tensor:
    """An integer tensor of non-negative class indices with one of the ``dims``."""
    if isinstance(values, torch.Tensor):
        table = values
    else:
        try:
            table = torch.as_tensor(np.asarray(values))
        except (TypeError, ValueError) as error:
            raise ConfigurationError(
                f"{what} must be an integer tensor or nested lists of class indices of equal "
                f"length per sample; got {type(values).__name__} ({error})"
            ) from error
    if table.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ConfigurationError(
            f"{what} must hold integer class indices, got dtype {table.dtype}; pass a LongTensor"
        )
    if table.dim() not in dims:
        shapes = " or ".join(f"{d}-D" for d in dims)
        raise ConfigurationError(f"{what} must be {shapes}, got shape {tuple(table.shape)}")
    table = table.long()
    if table.numel() and int(table.min()) < 0:
        raise ConfigurationError(f"{what} hold a negative class index {int(table.min())}")
    return table


def _first_duplicate_row(table: torch.Tensor) -> int | None:
    """The first row (over all leading dims, flattened) holding a class twice, else None."""
    rows = table.reshape(-1, table.shape[-1])
    ordered = rows.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
    return int(repeated.nonzero()[0, 0]) if bool(repeated.any()) else None


def _check_class_range(table: torch.Tensor, num_classes: int, what: str) -> None:
    if table.numel() and int(table.max()) >= num_classes:
        raise ConfigurationError(
            f"{what} hold class {int(table.max())} but the model outputs {num_classes} logits "
            f"(classes 0..{num_classes - 1}); build them for this model"
        )


class ClassSet:
    """VAR's class set C′ (``var.md`` Sec. 3.3 and App. A.1): which classes compete with the
    target in the per-pixel softmax (Eq. 2). ``class_set(logits [B, N] | None, targets [B])``
    returns ``LongTensor[B, K′]`` with the TARGET FIRST (column 0) and no class twice.

    ``mode="top_k_least"`` (App. A.1, "Top-k Most Probable Classes"; used by the paper for the
    insertion and randomisation tests): the target, then the ``k`` most probable OTHER classes
    (descending probability, ties to the lower class index), then the least probable class.
    Probabilities are ranked by the logits (softmax is monotone). The paper states no value of
    k; the default ``k=3`` (K′ = 5) is this library's choice. The paper counts the target among
    its "k highest" when it is the prediction, so its k equals this ``k + 1`` there. ``k=0``
    gives App. A.1's Best-vs-Worst set ``{c_max, c_min}`` when the target is the prediction.
    Deterministic edge cases: the least-probable slot takes the least probable class NOT
    already in the set (so if the target itself is the least probable class, the next least
    probable one is used; ties to the lower class index), and when no class is left
    (``k = N − 1``) the slot is dropped, so K′ = min(k + 2, N) for every row.
    ``k > N − 1`` raises.

    ``mode="fixed"`` (App. A.1, "Predefined Class Sets"; the paper's choice for localisation,
    e.g. the four classes of a 2×2 grid): ``sets`` is ``LongTensor[B, M]`` (one set per
    image of the batch) or ``[M]`` (one set shared by every image). Each target must be a
    member of its image's set; the output is the set reordered so the target comes first, the
    others in the given order. Per-sample sets belong to one batch: build one per batch (or
    pass the tensor to ``var(images, classes, class_set=sets)``). With K targets per image the
    caller passes ``B·K`` rows (logits repeated per target, module docstring) and each image's
    set is repeated for its K targets.
    """

    def __init__(
        self,
        mode: ClassSetMode = "top_k_least",
        k: int = 3,
        sets: torch.Tensor | Sequence[Sequence[int]] | Sequence[int] | None = None,
    ) -> None:
        if mode not in ("top_k_least", "fixed"):
            raise ConfigurationError(
                f"ClassSet mode must be 'top_k_least' (target + k most probable + least "
                f"probable) or 'fixed' (explicit sets per sample), got {mode!r}"
            )
        self.mode = mode
        self.k = k
        self.sets: torch.Tensor | None = None
        if mode == "top_k_least":
            if sets is not None:
                raise ConfigurationError(
                    "ClassSet sets= is only used with mode='fixed'; use ClassSet.fixed(sets)"
                )
            _check_count(k)
            return
        if sets is None:
            raise ConfigurationError(
                "ClassSet mode='fixed' needs sets=LongTensor[B, M] (one class set per image, "
                "e.g. a 2x2 grid's four classes) or [M] (one set for every image)"
            )
        table = _as_class_table(sets, "fixed class sets", (1, 2))
        if table.shape[-1] < 2:
            raise ConfigurationError(
                f"fixed class sets need at least 2 classes (the target and a rival), got sets "
                f"of {table.shape[-1]}; VAR's map of a lone class is zero everywhere"
            )
        duplicate = _first_duplicate_row(table)
        if duplicate is not None:
            row = table.reshape(-1, table.shape[-1])[duplicate].tolist()
            raise ConfigurationError(
                f"fixed class set {duplicate} holds a class twice: {row}; list each class once"
            )
        self.sets = table

    @classmethod
    def top_k_least(cls, k: int = 3) -> ClassSet:
        """The target + the k most probable other classes + the least probable class."""
        return cls("top_k_least", k=k)

    @classmethod
    def fixed(cls, sets: torch.Tensor | Sequence[Sequence[int]] | Sequence[int]) -> ClassSet:
        """Explicit sets: ``[B, M]`` per image of the batch, or ``[M]`` shared by all."""
        return cls("fixed", sets=sets)

    @property
    def needs_logits(self) -> bool:
        """Whether the selector reads the logits (fixed sets do not: no forward is needed)."""
        return self.mode == "top_k_least"

    @property
    def batch_size(self) -> int | None:
        """The batch the per-sample fixed sets belong to; None when they fit any batch."""
        if self.sets is None or self.sets.dim() == 1:
            return None
        return self.sets.shape[0]

    def __call__(self, logits: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        if self.mode == "top_k_least":
            return self._top_k_least(logits, targets)
        return self._fixed(logits, targets)

    def _top_k_least(self, logits: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ConfigurationError(
                f"ClassSet('top_k_least') ranks classes by the logits [B, N]; got "
                f"{getattr(logits, 'shape', logits)!r}"
            )
        num_classes = logits.shape[1]
        if self.k > num_classes - 1:
            raise ConfigurationError(
                f"ClassSet k={self.k} most probable other classes requested but the model has "
                f"{num_classes} classes, so at most {num_classes - 1} other classes exist; "
                f"choose k <= {num_classes - 1}"
            )
        targets = _check_targets(targets, num_classes).to(logits.device)
        _check_rows(logits, targets, "ClassSet")
        rows = targets.shape[0]
        # Stable descending order of all classes, then drop the target (exactly once per row).
        order = torch.sort(logits, dim=1, descending=True, stable=True).indices
        others = order[order != targets[:, None]].reshape(rows, num_classes - 1)
        chosen = [targets[:, None], others[:, : self.k]]
        remaining = others[:, self.k :]
        if remaining.shape[1] > 0:
            # The first minimum in a stable descending list is the lowest index among ties.
            values = logits.gather(1, remaining)
            chosen.append(remaining.gather(1, values.argmin(dim=1, keepdim=True)))
        return torch.cat(chosen, dim=1)

    def _fixed(self, logits: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        assert self.sets is not None
        if targets.dim() != 1:
            raise ConfigurationError(
                f"targets must be LongTensor[B], got shape {tuple(targets.shape)}"
            )
        targets = targets.long()
        rows = targets.shape[0]
        sets = self.sets.to(targets.device)
        if sets.dim() == 1:
            table = sets.expand(rows, -1)
        else:
            if rows % sets.shape[0]:
                raise ConfigurationError(
                    f"fixed class sets were given for {sets.shape[0]} images but the method "
                    f"asked for {rows} rows (images x targets per image); build "
                    f"ClassSet.fixed(sets) from the sets of this batch"
                )
            table = sets.repeat_interleave(rows // sets.shape[0], dim=0)
        if logits is not None:
            _check_rows(logits, targets, "ClassSet")
            _check_class_range(table, logits.shape[1], "fixed class sets")
        is_target = table == targets[:, None]
        missing = ~is_target.any(dim=1)
        if bool(missing.any()):
            row = int(missing.nonzero()[0, 0])
            raise ConfigurationError(
                f"target class {int(targets[row])} (row {row}) is not in its fixed class set "
                f"{table[row].tolist()}; VAR refines the target's own map against the other "
                f"members, so every target must belong to its set: add it, or explain one of "
                f"the set's classes"
            )
        positions = torch.arange(table.shape[1], device=table.device).expand_as(table)
        order = torch.where(is_target, -1, positions).argsort(dim=1, stable=True)
        return table.gather(1, order)

    def __repr__(self) -> str:
        if self.mode == "top_k_least":
            return f"ClassSet(mode='top_k_least', k={self.k})"
        assert self.sets is not None
        return f"ClassSet(mode='fixed', sets shape={tuple(self.sets.shape)})"


def _check_rows(logits: torch.Tensor, targets: torch.Tensor, who: str) -> None:
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise ConfigurationError(
            f"{who} got logits of shape {tuple(logits.shape)} for {targets.shape[0]} targets; "
            f"expected [{targets.shape[0]}, N] (logits repeated per target)"
        )


class ExplicitReferences:
    """Reference / contrast classes chosen by hand, per sample, for CASE (``contrast=``) or
    Finer-CAM (``references=``) in place of a selector computed from the model.

    ``references``: ``LongTensor[B, k]`` (the same k references for every target of image b),
    ``LongTensor[B, K, k]`` (per image and target), or a mapping ``{sample: [classes]}``. A
    mapping is keyed by the dataset ``index`` of the samples when ``indices`` (the batch's
    ``index`` values, in batch order) is given, else by the position in the batch
    (keys exactly ``0..B-1``); every row must have the same length k.

    The methods call a selector with one row per (image, target): ``B·K`` rows, the logits
    repeated per target (module docstring). ``[B, k]`` references are repeated for the K
    targets of each image; declare ``targets_per_image=K`` when explaining K > 1 classes per
    image (default 1), so that references built for another batch size are an error, never
    silently repeated. ``[B, K, k]`` references fix K themselves.

    Checked at each call: the row count matches ``B·K``; no reference equals its target; class
    indices are below the model's number of logits. Logits are otherwise ignored. Build one per
    batch (``method.contrast = ...`` / ``method.references = ...``).
    """

    def __init__(
        self,
        references: torch.Tensor | Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
        targets_per_image: int | None = None,
        indices: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        if isinstance(references, Mapping):
            references = _rows_from_mapping(references, indices)
        elif indices is not None:
            raise ConfigurationError(
                "ExplicitReferences indices= is only used with a mapping {sample index: "
                "references}; a tensor is already in batch order"
            )
        table = _as_class_table(references, "explicit references", (2, 3))
        if table.shape[-1] < 1 or table.shape[0] < 1:
            raise ConfigurationError(
                f"explicit references must hold at least one image and one reference class, "
                f"got shape {tuple(table.shape)}"
            )
        if table.dim() == 3:
            if targets_per_image is not None and targets_per_image != table.shape[1]:
                raise ConfigurationError(
                    f"explicit references of shape {tuple(table.shape)} are [B, K, k] with "
                    f"K={table.shape[1]} targets per image, but targets_per_image="
                    f"{targets_per_image}; drop targets_per_image or make them agree"
                )
            targets_per_image = table.shape[1]
        elif targets_per_image is None:
            targets_per_image = 1
        check_positive_int(targets_per_image, "targets_per_image (the K of classes [B, K])")
        duplicate = _first_duplicate_row(table)
        if duplicate is not None:
            row = table.reshape(-1, table.shape[-1])[duplicate].tolist()
            raise ConfigurationError(
                f"explicit reference row {duplicate} holds a class twice: {row}; list each "
                f"reference once"
            )
        self.references = table
        self.targets_per_image = targets_per_image

    @property
    def batch_size(self) -> int:
        return self.references.shape[0]

    @property
    def k(self) -> int:
        return self.references.shape[-1]

    def __call__(self, logits: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() != 1:
            raise ConfigurationError(
                f"targets must be LongTensor[B], got shape {tuple(targets.shape)}"
            )
        targets = targets.long()
        expected = self.batch_size * self.targets_per_image
        if targets.shape[0] != expected:
            raise ConfigurationError(
                f"ExplicitReferences hold references for {self.batch_size} images x "
                f"{self.targets_per_image} targets per image = {expected} rows, but the method "
                f"asked for {targets.shape[0]} (images x targets per image); build one per "
                f"batch, and pass targets_per_image=K when explaining K classes per image"
            )
        table = self.references.to(targets.device)
        if table.dim() == 3:
            table = table.reshape(expected, -1)
        else:
            table = table.repeat_interleave(self.targets_per_image, dim=0)
        if logits is not None:
            _check_rows(logits, targets, "ExplicitReferences")
            _check_targets(targets, logits.shape[1])
            _check_class_range(table, logits.shape[1], "explicit references")
        clash = (table == targets[:, None]).any(dim=1)
        if bool(clash.any()):
            row = int(clash.nonzero()[0, 0])
            image, target = divmod(row, self.targets_per_image)
            raise ConfigurationError(
                f"explicit references {table[row].tolist()} of image {image} (target {target}) "
                f"contain the target class {int(targets[row])} itself; a reference must differ "
                f"from the class it is contrasted with: remove it from that row"
            )
        return table

    def __repr__(self) -> str:
        return (
            f"ExplicitReferences(shape={tuple(self.references.shape)}, "
            f"targets_per_image={self.targets_per_image})"
        )


def _rows_from_mapping(
    mapping: Mapping[int, Sequence[int]], indices: torch.Tensor | Sequence[int] | None
) -> list[list[int]]:
    if indices is None:
        keys = list(range(len(mapping)))
        if set(mapping) != set(keys):
            raise ConfigurationError(
                f"a references mapping without indices= is keyed by batch position and needs "
                f"exactly the keys 0..{len(mapping) - 1}, got {sorted(mapping)}; pass "
                f"indices=<the batch's sample index values> to key it by dataset index"
            )
    else:
        keys = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        absent = [key for key in keys if key not in mapping]
        if absent:
            raise ConfigurationError(
                f"references mapping has no entry for sample index {absent[0]} of this batch "
                f"({len(absent)} missing); add references for every sample in indices="
            )
    rows = [list(mapping[key]) for key in keys]
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise ConfigurationError(
            f"every sample needs the same number of references; got lengths {lengths}"
        )
    return rows
