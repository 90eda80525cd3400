"""Results that appear all at once: an evaluation writes into a hidden staging directory next
to the run's files and publishes at the end.

Publishing moves every staged file into the run directory with ``os.replace`` (atomic on one
file system), swaps whole directories (``plots/``, ``gallery/``), and moves ``report.md`` and
``manifest.json`` last. A process killed before publishing leaves only ``.staging-*``
(removed by the next run); one killed while publishing leaves no ``manifest.json``, the file
that marks a complete result (it lists every published file with its size). A rerun into the
same run directory first removes the previous results, then publishes its own.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

MANIFEST = "manifest.json"
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
        for stale in self.run_dir.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.path = self.run_dir / f".staging-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()

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
            if item.name == MANIFEST:
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
        write_atomically(self.run_dir / MANIFEST, json.dumps(manifest, indent=2))
        shutil.rmtree(self.path, ignore_errors=True)
        return [*published, self.run_dir / MANIFEST]


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it into place."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def is_complete(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a fully published evaluation result."""
    manifest = Path(run_dir) / MANIFEST
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text())["files"]
    return all((Path(run_dir) / name).is_file() for name in files)
