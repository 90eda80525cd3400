"""Timing and reporting helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    function: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1
) -> float:
    """Median wall time of ``function()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        function()
    synchronise(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(
    functions: list[Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> list[float]:
    """Median wall time of each function, the functions called in turn ``repeats`` times (after
    ``warmup`` rounds), so a change of load on a shared machine affects them alike and their
    ratios stay meaningful."""
    for _ in range(warmup):
        for function in functions:
            function()
    synchronise(device)
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, measured in zip(functions, times, strict=True):
            start = time.perf_counter()
            function()
            synchronise(device)
            measured.append(time.perf_counter() - start)
    return [statistics.median(measured) for measured in times]


class PeakMemory:
    """Peak CUDA memory while the ``with`` block runs (``None`` on other devices): ``peak_mib``
    = most memory allocated at once; ``extra_mib`` = that minus what was allocated on entry
    (the model and the inputs), i.e. what the measured calls themselves needed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib: float | None = None
        self.extra_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_mib = peak / 2**20
            self.extra_mib = (peak - self._start) / 2**20


def load_average() -> float | None:
    """1-minute load average (other processes on a shared machine slow every number)."""
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return None


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        # TF32 changes fp32 results and speed: record what the numbers were measured with
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def _cpu_model() -> str | None:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else the platform's processor string)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain fixed-width table of ``rows`` (dicts) restricted to ``columns``."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(cell(row.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))


def random_batch(
    model: torch.nn.Module,
    batch_size: int,
    image_size: int,
    num_targets: int,
    seed: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random images ``[B, 3, S, S]``, ``num_targets`` distinct random classes per image
    ``[B, K]`` (seeded on the CPU) and the model's number of classes."""
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    with torch.no_grad():
        num_classes = model(images[:1]).shape[1]
    generator = torch.Generator().manual_seed(seed)
    classes = torch.stack(
        [torch.randperm(num_classes, generator=generator)[:num_targets] for _ in images]
    ).to(device)
    return images, classes, num_classes


def print_checks(checks: dict[str, bool], output: str | Path) -> None:
    """One PASS/FAIL line per target of the issue, then where the JSON went."""
    for check, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {check}")
    print(f"wrote {output}")
