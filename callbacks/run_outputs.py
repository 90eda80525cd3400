"""Results that appear all at once: an evaluation writes into a hidden staging directory next
to the run's files and publishes at the end.

Publishing moves every staged file into the run directory with ``os.replace`` (atomic on one
file system), swaps whole directories (``plots/``, ``gallery/``), and moves ``report.md`` and
``manifest.json`` last. A process killed before publishing leaves only ``.staging-*``
(removed by the next run); one killed while publishing leaves no ``manifest.json``, the file
that marks a complete result (it lists every published file with its size). A rerun into the
same run directory first removes the previous results, then publishes its own.

Staging directories of failed runs never outlive them: an evaluation that fails removes its
own (:meth:`StagedResults.discard`, called from the callback's ``on_exception``), and each new
evaluation sweeps those of killed runs — in its own run directory and in the sibling run
directories under the same parent (default run names are timestamped, so a killed run's
directory is never reused). A staging directory records its owner (host and process id) in
``owner.json``; it is stale when that process no longer runs on this host. One on another
host is left alone (it may be running there), and one without ``owner.json`` (written by an
older version) is stale once it is an hour old.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from datamodules.cache_files import write_atomically

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
OWNER = "owner.json"
_UNOWNED_STALE_AFTER_S = 3600
LAST = ("report.md", MANIFEST)  # published after everything else, in this order
RESULTS = (
    "per_sample.parquet", "summary.csv", "stats.csv", "curves.csv", "sanity_checks.csv",
    "plots", "gallery", *LAST,
)  # fmt: skip


class StagedResults:
    """A staging directory ``<run_dir>/.staging-<id>/`` that :meth:`publish` moves into place."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)  # this run directory is ours now
        sweep_stale_staging(self.run_dir.parent)
        self.path = self.run_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        owner = {"host": socket.gethostname(), "pid": os.getpid()}
        (self.path / OWNER).write_text(json.dumps(owner))

    def discard(self) -> None:
        """Remove the staging directory and everything in it (the run failed)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def remove_previous_results(self) -> None:
        """Delete the results of an earlier run in this directory, manifest first, so no
        mixture of old and new files can look complete."""
        for name in reversed(RESULTS):
            target = self.run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def publish(self, facts: dict | None = None) -> list[Path]:
        """Move the staged results into the run directory; returns the published paths.
        ``facts`` (JSON-serialisable) are recorded in the manifest beside the file list."""
        self.remove_previous_results()
        order = {name: position + 1 for position, name in enumerate(LAST)}
        staged = sorted(self.path.iterdir(), key=lambda p: (order.get(p.name, 0), p.name))
        published = []
        for item in staged:
            if item.name in (MANIFEST, OWNER):
                continue
            target = self.run_dir / item.name
            os.replace(item, target)
            published.append(target)
        manifest = {
            "complete": True,
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": {
                str(p.relative_to(self.run_dir)): p.stat().st_size
                for target in published
                for p in ([target] if target.is_file() else sorted(target.rglob("*")))
                if p.is_file()
            },
            **(facts or {}),
        }
        text = json.dumps(manifest, indent=2)
        write_atomically(self.run_dir / MANIFEST, lambda file: file.write(text.encode()))
        shutil.rmtree(self.path, ignore_errors=True)
        return [*published, self.run_dir / MANIFEST]


def sweep_stale_staging(parent: Path) -> list[Path]:
    """Remove the stale staging directories (see the module docstring) of the run directories
    directly under ``parent``; returns those removed."""
    removed = []
    for staging in parent.glob(f"*/{STAGING_PREFIX}*"):
        if staging.is_dir() and _is_stale(staging):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _is_stale(staging: Path) -> bool:
    try:
        owner = json.loads((staging / OWNER).read_text())
    except (OSError, ValueError):
        try:
            return time.time() - staging.stat().st_mtime > _UNOWNED_STALE_AFTER_S
        except OSError:
            return False  # removed meanwhile
    if owner.get("host") != socket.gethostname():
        return False
    return not _process_runs(int(owner.get("pid", -1)))


def _process_runs(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


def is_complete(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a fully published evaluation result."""
    manifest = Path(run_dir) / MANIFEST
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text())["files"]
    return all((Path(run_dir) / name).is_file() for name in files)
