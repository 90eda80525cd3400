"""Run command-line jobs (``train.py`` / ``evaluate.py`` per seed) one after another, or several
at once with one GPU each (``CUDA_VISIBLE_DEVICES``), each job's output going to its log file.

A failed job stops the sweep: sequentially nothing after it starts; on GPUs the running jobs
finish and no new one starts. :class:`JobsFailed` then names every failed job, its exit status,
its log and the log's last lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TAIL_LINES = 25
# A run-name variable inherited from a parent run would rename every child's run directory.
_PRIVATE_VARIABLES = ("CONTRASTIVE_SALIENCY_RUN_NAME",)


@dataclass(frozen=True)
class Job:
    """One command: ``label`` (e.g. ``seed 3``) for messages, ``log`` receives its output."""

    label: str
    command: Sequence[str]
    log: Path


@dataclass(frozen=True)
class JobResult:
    job: Job
    returncode: int
    wall_s: float
    gpu: str | None


class JobsFailed(RuntimeError):
    """Raised after the jobs stopped because at least one failed."""

    def __init__(self, failures: Sequence[JobResult]) -> None:
        self.failures = list(failures)
        parts = []
        for result in failures:
            parts.append(
                f"{result.job.label} failed with exit status {result.returncode} after "
                f"{result.wall_s:.0f} s; log: {result.job.log}\n--- last lines of the log ---\n"
                f"{log_tail(result.job.log)}"
            )
        super().__init__("\n\n".join(parts))


def split_extra_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The command's own arguments and those after ``--`` (passed on to every run)."""
    argv = list(argv)
    if "--" in argv:
        position = argv.index("--")
        return argv[:position], argv[position + 1 :]
    return argv, []


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file (empty if it does not exist)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def python_command(script: str, *arguments: str) -> list[str]:
    """``[<this interpreter>, <repo>/<script>, *arguments]``: the child uses the same
    environment (virtualenv) as this process, and paths in ``arguments`` stay relative to the
    current directory."""
    return [sys.executable, str(REPO / script), *arguments]


def _environment(gpu: str | None) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in _PRIVATE_VARIABLES}
    if gpu is not None:
        environment["CUDA_VISIBLE_DEVICES"] = gpu
    return environment


def _start(job: Job, gpu: str | None) -> tuple[subprocess.Popen, object]:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    handle = job.log.open("w")
    process = subprocess.Popen(
        list(job.command),
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=_environment(gpu),
        cwd=os.getcwd(),
    )
    where = f" on GPU {gpu}" if gpu is not None else ""
    print(f"[{job.label}] started{where}; log: {job.log}", flush=True)
    return process, handle


def run_jobs(
    jobs: Sequence[Job],
    gpus: Sequence[str] | None = None,
    on_finished: Callable[[JobResult], None] | None = None,
    poll_s: float = 0.5,
) -> list[JobResult]:
    """Run ``jobs`` (one at a time without ``gpus``; else at most one per GPU at a time) and
    return their results in completion order. ``on_finished`` is called after each success.
    Raises :class:`JobsFailed` if a job exits with a non-zero status."""
    slots: list[str | None] = list(gpus) if gpus else [None]
    if len(set(slots)) != len(slots):
        raise ValueError(f"--gpus lists a GPU twice: {list(slots)}")
    waiting = list(jobs)
    running: dict[str | None, tuple[Job, subprocess.Popen, object, float]] = {}
    results: list[JobResult] = []
    failures: list[JobResult] = []
    while waiting or running:
        for slot in slots:
            if not waiting or failures or slot in running:
                continue
            job = waiting.pop(0)
            process, handle = _start(job, slot)
            running[slot] = (job, process, handle, time.perf_counter())
        if not running:
            break
        time.sleep(poll_s)
        for slot, (job, process, handle, started) in list(running.items()):
            if process.poll() is None:
                continue
            handle.close()
            del running[slot]
            result = JobResult(job, process.returncode, time.perf_counter() - started, slot)
            if result.returncode != 0:
                print(f"[{job.label}] FAILED (exit status {result.returncode})", flush=True)
                failures.append(result)
                continue
            print(f"[{job.label}] finished in {result.wall_s:.1f} s", flush=True)
            results.append(result)
            if on_finished is not None:
                on_finished(result)
    if failures:
        raise JobsFailed(failures)
    return results
