"""The GPU suite's documented CPU form runs as written and writes its JSON (README,
"Checking a GPU machine"): ``bash benchmarks/gpu_suite.sh --device cpu --quick --output DIR``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cpu_quick_suite_passes_and_writes_its_json(tmp_path):
    completed = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--device", "cpu", "--quick", "--output", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
        env=os.environ | {"GPU_SUITE_WORK": str(tmp_path / "work")},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["ok"] and list(suite["steps"]) == ["tests", "cams", "study"]
    tests = suite["steps"]["tests"]
    assert tests["passed"] >= 20 and tests["failed"] == 0
    cams = json.loads((tmp_path / "cams.json").read_text())
    measured = {row["method"]: row for row in cams["methods"]}
    assert {"grad_cam", "case", "finer_cam", "var"} <= measured.keys()
    assert measured["grad_cam"]["library_seconds_k_classes"] > 0  # pytorch-grad-cam, same run
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["images"] == suite["profile"]["study_images"]
    assert study["loops"]["validate"]["samples"] == study["images"]  # CASE's confusion matrix
    assert 0 < study["images_per_s_whole_study"] < study["images_per_s_loops"]
    assert study["projected_seconds_imagenet_val"] > study["wall_seconds"]
    summary = (tmp_path / "study" / "summary.csv").read_text()
    assert "feature_agreement" in summary and "object_energy" in summary
    assert "PASS  wrote" in completed.stdout
