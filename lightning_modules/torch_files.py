"""Reading a user's ``torch.save`` file (checkpoint, weights, linear head) safely.

Files are loaded with ``weights_only=True`` (tensors and plain containers only: loading a
pickle may run arbitrary code). Whatever is wrong with the file — missing, empty, truncated,
not a PyTorch file, or holding pickled Python objects — becomes one
:class:`~contrastive_saliency.errors.ConfigurationError` naming the file and what was expected. The
message never passes on PyTorch's suggestion to retry with ``weights_only=False``.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from contrastive_saliency.errors import ConfigurationError


def load_torch_file(path: str | Path, expected: str, *, mmap: bool = False) -> Any:
    """The object ``torch.save`` wrote to ``path`` (on the CPU), or a
    :class:`ConfigurationError` ``"<path>: <what is wrong>; expected <expected>"``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"{path}: no such file; expected {expected}")
    if path.stat().st_size == 0:
        raise ConfigurationError(f"{path}: the file is empty (0 bytes); expected {expected}")
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except RuntimeError as error:
            if not (mmap and "mmap" in str(error)):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as error:
        reason = (
            "it holds pickled Python objects, not only tensors and plain values (loading those "
            "could run arbitrary code, so it is refused)"
            if "Unsupported global" in str(error)
            else "it is not a readable PyTorch file (corrupt, or another format)"
        )
        raise ConfigurationError(f"{path}: {reason}; expected {expected}") from error
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        zipfile.BadZipFile,
    ) as error:
        first = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:160]
        if "weights_only" in first:
            first = "unreadable"
        raise ConfigurationError(
            f"{path}: not a readable PyTorch file, truncated or corrupt "
            f"({type(error).__name__}: {first}); expected {expected}"
        ) from error
