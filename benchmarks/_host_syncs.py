"""Counting host round trips (device → host waits) inside a call, on CPU and on CUDA.

A saliency method or metric should queue its whole computation on the device and return;
every point where Python needs a value of a device tensor (``.item()``, ``bool(t)``,
``.tolist()``, ``.cpu()``, a data-dependent output shape such as ``nonzero`` or a boolean
index) makes the host wait until the device has finished everything queued before it. A few
per call (input checks, a convergence test per k-means iteration) cost little; one per image
or per class on a hot path serialises the device behind Python.

:class:`HostRoundTrips` counts them in two ways:

- ``requests``: calls of the tensor operations that need a device value on the host, seen by
  a :class:`~torch.overrides.TorchFunctionMode`. Device-independent, so the CPU run of the
  suite sees the same count the GPU would, and a test can check it here.
- ``cuda_syncs`` (CUDA only): what the CUDA runtime actually did, from
  :func:`torch.cuda.set_sync_debug_mode` warnings (every synchronising call, including the
  synchronous host → device copies of ``torch.tensor(..., device="cuda")``).
"""

from __future__ import annotations

import collections
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Tensor operations whose result is a host value or whose output shape depends on the data.
_HOST_VALUE = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.allclose,
    torch.equal,
    torch.Tensor.equal,
}
_DATA_DEPENDENT_SHAPE = {
    torch.nonzero,
    torch.Tensor.nonzero,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.unique,
    torch.Tensor.unique,
    torch.unique_consecutive,
}


def _is_boolean_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts)


class HostRoundTrips(TorchFunctionMode):
    """Context manager: ``with HostRoundTrips() as counter: call()``; then ``counter.requests``
    (total), ``counter.by_operation`` and, on CUDA, ``counter.cuda_syncs``."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = torch.device(device) if device is not None else None
        self.by_operation: collections.Counter[str] = collections.Counter()
        self.cuda_syncs: int | None = None
        self._records: Any = None
        self._catcher: Any = None

    @property
    def requests(self) -> int:
        return sum(self.by_operation.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_VALUE or func in _DATA_DEPENDENT_SHAPE:
            self.by_operation[getattr(func, "__name__", str(func))] += 1
        elif func is torch.Tensor.__getitem__ and _is_boolean_index(args):
            self.by_operation["boolean index"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostRoundTrips:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._catcher = warnings.catch_warnings(record=True)
            self._records = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def __exit__(self, *exc_info) -> None:
        super().__exit__(*exc_info)
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(*exc_info)
            self.cuda_syncs = sum("synchroniz" in str(w.message) for w in self._records)
            self._catcher = None


def count_host_round_trips(function, device: torch.device | str) -> dict[str, Any]:
    """Run ``function()`` once and return ``{"requests", "by_operation", "cuda_syncs"}``."""
    with HostRoundTrips(device) as counter:
        function()
    return {
        "requests": counter.requests,
        "by_operation": dict(counter.by_operation),
        "cuda_syncs": counter.cuda_syncs,
    }
