"""The embedded benchmark's acceptance numbers (issue 16) from a default training run and the
class-sensitivity study on it, written as JSON.

From the train run: its last val top-1 (``metrics.csv``), the size of the default saliency
layer's map at the benchmark's resolution, and — on the whole test split, with the checkpoint —
the share of correctly classified samples whose top-2 prediction is the sibling class. From
the study run: the sibling share it printed (``manifest.json``, its correctly classified
sample subset), the mean mark energy of the reference maps ``oracle_part``, ``oracle_object``
and ``random``, and the mark's mean share of the image on the same samples (the chance level
of ``random``). Timings measured outside (e.g. ``/usr/bin/time``) are recorded as given.

    uv run python benchmarks/shapes_benchmark_check.py --train_run outputs/<run> --study_run outputs/<study> \
        --timing train_cpu_s=473 --output benchmarks/results/shapes_benchmark_check_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from benchmarks._timing import environment, load_average, write_json
from contrastive_saliency.layers import default_layer, resolve_layer
from lightning_modules.evaluation import load_classifier

REFERENCES = ("oracle_part", "oracle_object", "random")


def train_numbers(run: Path) -> dict:
    from datamodules import ShapesDataModule

    metrics = pd.read_csv(run / "metrics.csv")
    val = metrics.dropna(subset=["val/acc_top1"])
    classifier = load_classifier(run / "checkpoints" / "last.ckpt")
    model = classifier.model.eval()
    data = ShapesDataModule()
    test = data.dataset("test")
    layer_name = default_layer(model)
    shapes: list[tuple[int, ...]] = []
    hook = resolve_layer(model, layer_name).register_forward_hook(
        lambda _m, _i, out: shapes.append(tuple(out.shape[-2:]))
    )
    hits = correct = 0
    siblings = data.sibling_classes
    with torch.no_grad():
        for start in range(0, len(test), 100):
            items = [test[i] for i in range(start, min(start + 100, len(test)))]
            images = torch.stack([item["image"] for item in items])
            labels = torch.stack([item["label"] for item in items])
            top2 = model(images).topk(2, dim=1).indices
            right = top2[:, 0] == labels
            correct += int(right.sum())
            hits += sum(
                int(second) in siblings[int(label)]
                for label, second in zip(labels[right], top2[right, 1], strict=True)
            )
    hook.remove()
    return {
        "val_acc_top1": float(val["val/acc_top1"].iloc[-1]),
        "epochs": int(val["epoch"].iloc[-1]) + 1,
        "default_layer": layer_name,
        "default_layer_map_size": list(shapes[0]),
        "test_correct": correct,
        "test_top2_sibling_count": hits,
        "test_top2_sibling_share": hits / correct if correct else None,
    }


def study_numbers(run: Path) -> dict:
    from datamodules import ShapesDataModule

    manifest = json.loads((run / "manifest.json").read_text())
    frame = pd.read_parquet(run / "per_sample.parquet")
    energy = frame[(frame["metric"] == "mark_energy") & frame["method"].isin(REFERENCES)]
    means = energy.groupby("method")["value"].mean()
    indices = sorted(int(i) for i in energy["index"].unique())
    test = ShapesDataModule().dataset("test")
    area = sum(float(test[i]["part_mask"].float().mean()) for i in indices) / len(indices)
    random = float(means["random"])
    return {
        "samples": len(indices),
        "printed_top2_sibling": manifest.get("dataset_checks"),
        "mark_energy": {name: float(means[name]) for name in REFERENCES},
        "mark_area_share": area,
        "random_vs_area_relative_error": random / area - 1.0,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_run", type=Path, required=True)
    parser.add_argument("--study_run", type=Path, default=None)
    parser.add_argument("--timing", action="append", default=[], metavar="NAME=SECONDS")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result: dict = {
        "benchmark": "shapes_benchmark_check",
        "environment": environment(torch.device("cpu")),
        "load_average_1min": load_average(),
        "train": train_numbers(args.train_run),
        "timings_s": {k: float(v) for k, v in (t.split("=", 1) for t in args.timing)},
    }
    if args.study_run is not None:
        result["study"] = study_numbers(args.study_run)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    if args.output is not None:
        write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
