"""The class label of every sample of a map-style dataset, without rendering its images when
the dataset says them (the quad grids' class draw, the confidence filter's cache key, the
train hold-out's per-class sample)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


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
