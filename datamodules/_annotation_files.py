"""Small readers shared by the CUB, Stanford Cars and COCO datamodules.

* :func:`read_rows` parses the whitespace-separated text tables of CUB-200-2011, naming the
  file, the line and the expected format when a line does not parse.
* :func:`holdout_split` draws a seeded, per-class validation subset from a training split
  (for datasets whose official release has only train and test).
* :func:`load_mat` / :func:`mat_value` / :func:`mat_records` read MATLAB ``.mat`` files with
  :func:`scipy.io.loadmat` whatever the nesting ``loadmat`` returns for them (1×N or N×1
  struct arrays, fields wrapped in 1×1 arrays or already squeezed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.base import DatasetLayoutError, require_path


def read_rows(
    path: Path,
    columns: Sequence[Callable[[str], Any]],
    expected: str,
    last_column_takes_rest: bool = False,
) -> list[tuple[Any, ...]]:
    """The non-empty lines of a whitespace-separated table, each converted column by column.

    Args:
        path: the text file (must exist).
        columns: one converter per column (``int``, ``float``, ``str``).
        expected: the line format for error messages, e.g. ``"<image_id> <relative path>"``.
        last_column_takes_rest: the last column keeps the rest of the line (paths or names
            that may contain spaces).

    Raises:
        DatasetLayoutError: a line has the wrong number of columns or a value does not convert.
    """
    rows: list[tuple[Any, ...]] = []
    maxsplit = len(columns) - 1 if last_column_takes_rest else -1
    with open(require_path(path, "annotation file", f"a text file of lines '{expected}'")) as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            fields = text.split(None, maxsplit)
            try:
                if len(fields) != len(columns):
                    raise ValueError(f"{len(fields)} columns instead of {len(columns)}")
                rows.append(
                    tuple(convert(value) for convert, value in zip(columns, fields, strict=True))
                )
            except ValueError as error:
                raise DatasetLayoutError(
                    f"line {number} of {str(path)!r} reads {text[:80]!r} ({error}); "
                    f"expected lines of the form '{expected}'"
                ) from error
    return rows


def holdout_split(labels: Sequence[int], fraction: float, seed: int) -> list[bool]:
    """Per-class seeded holdout: ``True`` marks the positions that go to validation.

    From each class, ``round(fraction * n_class)`` images (drawn with ``torch.Generator``
    seeded by ``seed``) are held out, so the validation set keeps the class balance and is
    identical on every run, worker and rank.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    held_out = [False] * len(labels)
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(position)
    generator = torch.Generator().manual_seed(seed)
    for label in sorted(by_class):
        positions = by_class[label]
        order = torch.randperm(len(positions), generator=generator).tolist()
        for k in order[: round(fraction * len(positions))]:
            held_out[positions[k]] = True
    return held_out


def load_mat(path: Path, expected: str) -> dict[str, Any]:
    """``scipy.io.loadmat(path)`` (default options: no squeezing, structs as records); an
    unreadable file raises a :class:`DatasetLayoutError` naming it and ``expected``."""
    import scipy.io
    from scipy.io.matlab import MatReadError

    require_path(path, "MATLAB annotation file", expected)
    try:
        return scipy.io.loadmat(path)
    except (MatReadError, ValueError, OSError, TypeError, NotImplementedError) as error:
        raise DatasetLayoutError(
            f"{str(path)!r} cannot be read as a MATLAB .mat file ({error}); expected {expected}"
        ) from error


def mat_value(value: Any) -> Any:
    """A MATLAB scalar or string as a Python ``int``/``float``/``str``.

    Unwraps any number of size-1 array layers (``array([[39]], dtype=uint8)`` from
    ``loadmat(...)``, ``array(39)`` or ``39`` from ``loadmat(..., squeeze_me=True)``, char
    arrays ``array(['00001.jpg'])``, 1×1 cells holding either)."""
    while isinstance(value, np.ndarray):
        if value.dtype.kind == "U":
            return "".join(str(part) for part in value.ravel())
        if value.size != 1:
            raise ValueError(f"expected a scalar, got an array of shape {value.shape}")
        value = value.ravel()[0]
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def mat_records(struct: Any, fields: Sequence[str]) -> list[dict[str, Any]]:
    """The elements of a MATLAB struct array as dicts of :func:`mat_value` of ``fields``.

    Accepts what ``loadmat`` returns for a 1×N (or N×1) struct array with either option set:
    a structured ``ndarray`` of any shape (also 0-d when squeezed to one element), or
    ``mat_struct`` objects (``struct_as_record=False``). A missing field raises ``KeyError``
    naming it; the caller turns that into a :class:`DatasetLayoutError`."""
    if isinstance(struct, np.ndarray) and struct.dtype.names is None and struct.dtype == object:
        elements = [element for element in struct.ravel()]  # a cell array of structs
    elif isinstance(struct, np.ndarray):
        elements = list(np.atleast_1d(struct).ravel())
    else:
        elements = [struct]
    records = []
    for element in elements:
        if isinstance(element, np.ndarray) and element.dtype.names is not None:
            element = element.ravel()[0] if element.size == 1 else element
        names = getattr(getattr(element, "dtype", None), "names", None)
        record = {}
        for field in fields:
            if names is not None:
                if field not in names:
                    raise KeyError(field)
                record[field] = mat_value(element[field])
            else:
                if not hasattr(element, field):
                    raise KeyError(field)
                record[field] = mat_value(getattr(element, field))
        records.append(record)
    return records
