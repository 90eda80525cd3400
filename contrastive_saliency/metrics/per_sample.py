"""Per-sample metric state keyed by sample index, counted exactly once under DDP.

Every metric in :mod:`contrastive_saliency.metrics` keeps, per evaluated sample, a fixed-width row of
scalars and the sample's ``index`` (its position in the split, DESIGN.md "Sample format").
Both states are lists reduced with ``dist_reduce_fx="cat"``, so a distributed ``compute()``
sees every process's samples; rows whose index was already seen — the duplicates a
``DistributedSampler`` pads uneven splits with — are dropped before anything is summarised,
so results with ``devices=2`` equal those with ``devices=1``. Whole maps never enter the state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

_STATISTICS = ("mean", "median", "std", "count")


def unique_by_index(
    indices: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first value (row) of every index, sorted by index.

    ``values`` is ``[N]`` or ``[N, ...]`` aligned with ``indices`` ``[N]``; the sort is stable,
    so "first" is the order of arrival (the order processes are gathered in under DDP).
    """
    order = torch.argsort(indices, stable=True)
    indices, values = indices[order], values[order]
    first = torch.ones_like(indices, dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    return indices[first], values[first]


def summary_statistics(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mean``, ``median``, ``std`` and ``count`` of ``[N]`` per-sample values, in float64.

    ``median`` interpolates between the two middle values of an even count (NumPy's
    ``np.median``, not ``torch.median``'s lower middle value); ``std`` is the sample standard
    deviation (``ddof=1``, as the evaluation summary's ``sd``). With no values every statistic
    but ``count`` is NaN; with one value ``std`` is NaN.
    """
    values = values.detach().to(torch.float64).reshape(-1)
    count = values.numel()
    nan = torch.tensor(math.nan, dtype=torch.float64, device=values.device)
    return {
        "mean": values.mean() if count else nan,
        "median": torch.quantile(values, 0.5) if count else nan,
        "std": values.std(correction=1) if count > 1 else nan,
        "count": torch.tensor(count, dtype=torch.int64, device=values.device),
    }


class _IndexedRows(Metric):
    """States ``indices`` (int64) and ``values`` (row-major flattened rows of ``width``
    scalars), both ``dist_reduce_fx="cat"``.

    Rows are stored flattened so that a process that saw no sample contributes an empty 1-D
    tensor, which gathers with the others whatever the row width.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def _append(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        _check_index(index)
        if rows.shape[0] != index.shape[0]:
            raise ValueError(
                f"{rows.shape[0]} per-sample values for index of shape {tuple(index.shape)}: "
                "index must be [B], one sample index per value"
            )
        self.values.append(rows.detach().to(self.dtype).reshape(-1))
        self.indices.append(index.detach().to(device=rows.device, dtype=torch.int64))

    def _unique_rows(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """De-duplicated ``(indices [N], rows [N, width])`` sorted by index, from the current
        (local, or gathered inside ``compute``) state."""
        indices = cat_state(self.indices, torch.int64, self.device).long()
        values = cat_state(self.values, self.dtype, self.device)
        if values.numel() != indices.numel() * width:
            raise RuntimeError(
                f"metric state holds {values.numel()} values for {indices.numel()} indices, "
                f"not {width} per index: rows of another width were gathered from another "
                "process or the states were modified outside update()"
            )
        return unique_by_index(indices, values.reshape(-1, width).to(indices.device))

    def _sync_dist(
        self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any = None
    ) -> None:
        # torchmetrics stands in for an empty list state with an empty tensor of the metric's
        # float dtype; gathering it with other processes' int64 indices would mix dtypes. Put
        # correctly typed empty tensors in place first (``sync`` has cached the real states,
        # ``unsync`` restores them).
        if isinstance(self.indices, list) and not self.indices:
            self.indices = [torch.empty(0, dtype=torch.int64, device=self.device)]
        if isinstance(self.values, list) and not self.values:
            self.values = [torch.empty(0, dtype=self.dtype, device=self.device)]
        super()._sync_dist(dist_sync_fn, process_group=process_group)


def _check_index(index: torch.Tensor) -> None:
    if not isinstance(index, torch.Tensor):
        raise TypeError(
            f"index must be a tensor of sample indices (the batch's 'index'), got "
            f"{type(index).__name__}"
        )
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"index must hold integer sample indices, got dtype {index.dtype}")
    if index.dim() != 1:
        raise ValueError(
            f"index must be [B], one sample index per sample, got {tuple(index.shape)}"
        )


def cat_state(
    state: list[torch.Tensor] | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A ``dist_reduce_fx="cat"`` list state as one flat tensor (empty: of ``dtype``)."""
    if isinstance(state, torch.Tensor):  # already concatenated by the distributed sync
        return state.reshape(-1)
    if not state:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([part.reshape(-1) for part in state])


class PerSampleValues(_IndexedRows):
    """Collects one value (or one fixed-shape row) per sample with the sample's ``index``.

    The generic collector (the evaluation callback keeps predictions in it); the metric
    classes build on :class:`SampleMetric`. :meth:`compute` gathers across processes, drops
    repeated indices and returns ``(indices, values)`` sorted by index.

    Args:
        row_shape: shape of one sample's row (``()`` for scalars); ``None`` takes it from the
            first update. Give it for rows under DDP when a process may see no sample.
        kwargs: torchmetrics ``Metric`` options.
    """

    def __init__(self, row_shape: tuple[int, ...] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.row_shape = None if row_shape is None else tuple(row_shape)
        self._row_shape = self.row_shape

    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Append ``values`` ``[B, ...]`` for the samples ``indices`` ``[B]``."""
        _check_index(indices)
        if values.dim() == 0 or values.shape[0] != indices.shape[0]:
            raise ValueError(
                f"{tuple(values.shape)} values for {indices.shape[0]} indices: one value per sample"
            )
        row_shape = tuple(values.shape[1:])
        if self._row_shape is None:
            self._row_shape = row_shape
        elif row_shape != self._row_shape:
            raise ValueError(
                f"rows of shape {row_shape} after rows of shape {self._row_shape}: every "
                "update must give rows of one shape"
            )
        self._append(values.float().reshape(values.shape[0], -1), indices)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [N], values [N, *row_shape])``, one per distinct index, sorted by index."""
        row_shape = self._row_shape or ()
        indices, rows = self._unique_rows(math.prod(row_shape))
        return indices, rows.reshape(-1, *row_shape)

    def _wrap_compute(self, compute: Callable) -> Callable:
        # torchmetrics squeezes one-element results to 0-d tensors; a split with a single
        # evaluated sample must still give ``[1]`` indices and ``[1, *row_shape]`` values.
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(wrapped)
        def keep_shapes(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            indices, values = wrapped(*args, **kwargs)
            return indices.reshape(-1), values.reshape(-1, *(self._row_shape or ()))

        return keep_shapes

    def reset(self) -> None:
        super().reset()
        self._row_shape = self.row_shape


class SampleMetric(_IndexedRows):
    """Base of the metric classes: per-sample rows of named scalars + sample index.

    A subclass names its columns in ``value_names`` (one per per-sample output of its
    functional, e.g. ``("deletion_auc", "insertion_auc", "insertion_minus_deletion")``) and
    its ``update(..., index)`` computes them with the functional and calls :meth:`_add`.
    Metrics that query a model receive it as an ``update`` argument and never keep it, so it
    is neither a child module, nor in ``state_dict``, nor moved or synced by torchmetrics.

    :meth:`compute` (a collective call under DDP: every process must call it) returns a flat
    dict ``"<column>/<statistic>"`` → scalar tensor with the statistics of
    :func:`summary_statistics` over the de-duplicated samples, plus what
    :meth:`_extra_statistics` adds (the papers' aggregates where they are not the plain mean).
    :meth:`per_sample` / :meth:`per_sample_table` give the de-duplicated per-sample values
    for tests between methods (also collective).
    """

    value_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.value_names:
            raise TypeError(f"{type(self).__name__} must name its columns in value_names")

    def _add(self, index: torch.Tensor, **columns: torch.Tensor) -> None:
        """Append one row per sample from ``[B]`` tensors named as ``value_names``."""
        if set(columns) != set(self.value_names):
            raise ValueError(
                f"{type(self).__name__} stores columns {self.value_names}, got {tuple(columns)}"
            )
        _check_index(index)
        parts = [columns[name] for name in self.value_names]
        batch = index.shape[0]
        for name, part in zip(self.value_names, parts, strict=True):
            if part.dim() != 1 or part.shape[0] != batch:
                raise ValueError(
                    f"per-sample {name!r} must be [B] like index {tuple(index.shape)}, got "
                    f"{tuple(part.shape)}"
                )
        self._append(torch.stack(parts, dim=1), index)

    def compute(self) -> dict[str, torch.Tensor]:
        """Summary statistics of every column over the de-duplicated samples."""
        _, rows = self._unique_rows(len(self.value_names))
        result: dict[str, torch.Tensor] = {}
        for column, name in enumerate(self.value_names):
            values = rows[:, column]
            for statistic, value in summary_statistics(values).items():
                result[f"{name}/{statistic}"] = value
            for statistic, value in self._extra_statistics(name, values).items():
                result[f"{name}/{statistic}"] = value
        return result

    def _extra_statistics(self, name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Statistics beyond :func:`summary_statistics` for column ``name`` (none by default)."""
        return {}

    def per_sample_table(self, sync: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(indices [N], {column: values [N]})``, de-duplicated and sorted by index; of every
        process (collective under DDP), or with ``sync=False`` of this process only."""
        if not sync:
            indices, rows = self._unique_rows(len(self.value_names))
            return indices, {name: rows[:, i] for i, name in enumerate(self.value_names)}
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        ):
            indices, rows = self._unique_rows(len(self.value_names))
        return indices, {name: rows[:, i] for i, name in enumerate(self.value_names)}

    def per_sample(self, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [N], values [N])`` of column ``name`` (optional for one-column metrics),
        de-duplicated and sorted by index."""
        if name is None:
            if len(self.value_names) != 1:
                raise ValueError(
                    f"{type(self).__name__} has columns {self.value_names}; pass one as name"
                )
            name = self.value_names[0]
        elif name not in self.value_names:
            raise KeyError(
                f"{type(self).__name__} has no column {name!r}; columns: {self.value_names}"
            )
        indices, table = self.per_sample_table()
        return indices, table[name]


__all__ = [
    "PerSampleValues",
    "SampleMetric",
    "summary_statistics",
    "unique_by_index",
]
