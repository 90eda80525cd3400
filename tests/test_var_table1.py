"""configs/evaluate/var_table1.yaml (VAR Table 1 on benchmark grids) runs as documented, shrunk
to two grids: the ViT rows on a random-init two-block ViT, the CNN rows (the overlay
configs/evaluate/var_table1_cnn.yaml) on the tiny trained small CNN; every method of the study
gets VAR's region scores and the grid pointing game, each in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

import evaluate
from callbacks.run_outputs import is_complete

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "configs" / "evaluate" / "var_table1.yaml"
CNN_ROWS = REPO / "configs" / "evaluate" / "var_table1_cnn.yaml"
REGION_VALUES = [f"grid_region_scores_{s}" for s in ("ra", "iou", "precision", "recall", "f1")]
CHEAP = {  # the methods' costs shrunk for two grids; the definitions are the config's
    "transition_attention": {"steps": 2},
    "bidirectional_attention": {"steps": 2},
    "integrated_gradients": {"steps": 2},
}


def _cheap_methods(methods: list) -> list:
    cheap = []
    for method in methods:
        method = {"name": method} if isinstance(method, str) else dict(method)
        kwargs = dict(method.get("kwargs") or {})
        if method["name"] == "var":
            kwargs["base_kwargs"] = {
                **(kwargs.get("base_kwargs") or {}),
                **CHEAP.get(kwargs["base"], {}),
            }
        else:
            kwargs.update(CHEAP.get(method["name"], {}))
        cheap.append({**method, "kwargs": kwargs})
    return cheap


def _shrunk(path: Path, tmp_path: Path, model: dict | None) -> Path:
    spec = yaml.safe_load(path.read_text())
    if "data" in spec:
        spec["data"]["init_args"].update(
            test_samples=2, batch_size=2, num_workers=0, cache_dir=str(tmp_path / "cache")
        )
    if model is not None:
        spec["model"] = model
    spec["evaluation"].update(methods=_cheap_methods(spec["evaluation"]["methods"]), gallery_size=1)
    shrunk = tmp_path / path.name
    shrunk.write_text(yaml.safe_dump(spec))
    return shrunk


def _run(configs: list[Path], tmp_path: Path, name: str) -> pd.DataFrame:
    arguments = [a for config in configs for a in ("--config", str(config))]
    evaluation = evaluate.main(
        [
            *arguments, "--run_name", name, "--output_dir", str(tmp_path),
            "--wandb.mode", "disabled", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    assert is_complete(tmp_path / name)
    summary = pd.read_csv(tmp_path / name / "summary.csv")
    labels = {spec.label for spec in evaluation.method_specs}
    assert set(summary["method"]) == labels
    for label in labels:
        rows = summary[summary["method"] == label]
        assert set(rows["metric"]) == {*REGION_VALUES, "grid_pointing_game"}, label
        assert rows["mean"].between(0.0, 1.0).all(), rows
        assert (rows["n"] == 2).all()
    return summary


def test_the_vit_rows_run_on_two_grids(tmp_path):
    vit = {
        "checkpoint": None, "model_name": "timm:vit_convstem_shapes", "num_classes": 10,
        "backbone_kwargs": {"img_size": 64, "patch_size": 8, "depth": 2},
    }  # fmt: skip
    summary = _run([_shrunk(STUDY, tmp_path, vit)], tmp_path, "vit-rows")
    assert {"transition_attention", "var_transformer_attribution"} <= set(summary["method"])


def test_the_cnn_rows_run_on_the_same_grids(tmp_path, trained_run):
    study = _shrunk(STUDY, tmp_path, None)
    checkpoint = {"checkpoint": str(trained_run / "checkpoints" / "last.ckpt")}
    (tmp_path / "cnn").mkdir()
    cnn_rows = _shrunk(CNN_ROWS, tmp_path / "cnn", checkpoint)
    summary = _run([study, cnn_rows], tmp_path, "cnn-rows")
    assert {"lrp", "var_guided_backprop"} <= set(summary["method"])
