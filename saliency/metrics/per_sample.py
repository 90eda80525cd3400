"""A torchmetrics state of per-sample values keyed by sample index, exactly once under DDP."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class PerSampleValues(Metric):
    """Collects one value (or one fixed-shape row) per sample with the sample's ``index``.

    States are concatenated across processes (``dist_reduce_fx="cat"``); :meth:`compute`
    drops repeated indices — the duplicates a ``DistributedSampler`` pads uneven splits with —
    and returns ``(indices, values)`` sorted by index.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        if values.shape[0] != indices.shape[0]:
            raise ValueError(
                f"{values.shape[0]} values for {indices.shape[0]} indices: one value per sample"
            )
        self.values.append(values.detach().float())
        self.indices.append(indices.detach().long())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices = _cat(self.indices).long()
        values = _cat(self.values)
        return unique_by_index(indices, values)


def _cat(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(state, torch.Tensor):  # already concatenated by the distributed sync
        return state
    if not state:
        return torch.empty(0)
    return torch.cat(state)


def unique_by_index(
    indices: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first value of every index, sorted by index."""
    order = torch.argsort(indices, stable=True)
    indices, values = indices[order], values[order]
    first = torch.ones_like(indices, dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    return indices[first], values[first]
