"""A Lightning callback that times the loops of an ``evaluate.py`` run (for the GPU suite).

Added to a study through a config file (``trainer.callbacks``), it records for the
validation loop (CASE's confusion matrix, ``evaluation.confusion_matrix: validate``) and the
test loop (maps and metrics) the time from the loop's start to its last batch (``seconds``:
grows with the number of images), from the last batch to the loop's end (``end_seconds``:
gathering, summaries, tests, plots, report) and how many samples it saw, and writes them as
JSON at the end of the test loop. The device is synchronised at each boundary, so queued GPU
work is counted where it was queued. The suite subtracts the per-image part from the
process's wall time to get the fixed cost (start-up, building, reports).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch


class StudyTimer(L.Callback):
    def __init__(self, output: str) -> None:
        self.output = Path(output)
        self.loops: dict[str, dict[str, float]] = {}
        self._start: dict[str, float] = {}
        self._last_batch: dict[str, float] = {}
        self._samples: dict[str, int] = {}

    @staticmethod
    def _now(module: L.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def _begin(self, loop: str, module: L.LightningModule) -> None:
        self._samples[loop] = 0
        self._start[loop] = self._last_batch[loop] = self._now(module)

    def _batch_end(self, loop: str, module: L.LightningModule, batch: dict) -> None:
        self._samples[loop] += len(batch["index"])
        self._last_batch[loop] = self._now(module)

    def _end(self, loop: str, module: L.LightningModule) -> None:
        self.loops[loop] = {
            "seconds": self._last_batch[loop] - self._start[loop],
            "end_seconds": self._now(module) - self._last_batch[loop],
            "samples": self._samples[loop],
        }

    def on_validation_start(self, trainer, pl_module) -> None:
        self._begin("validate", pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        self._batch_end("validate", pl_module, batch)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._end("validate", pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._begin("test", pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        self._batch_end("test", pl_module, batch)

    def on_test_end(self, trainer, pl_module) -> None:
        self._end("test", pl_module)
        if trainer.is_global_zero:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text(json.dumps(self.loops, indent=2) + "\n")
