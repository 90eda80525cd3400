"""Metric throughput: deletion + insertion AUC at forward batch sizes 1 vs 64, and the cost of
every metric in forward-pass equivalents, measured side by side in one run.

The perturbation metrics evaluate many perturbed copies of each image; the functionals stack
them into forward batches of ``batch_size``. This script shows what that buys (batch 1 = one
forward per step per image, the naive loop; batch 64 = the default regime) and what each
metric costs relative to one plain forward pass of the same images.

    uv run python benchmarks/metrics_throughput.py                       # resnet18, 224², CPU
    uv run python benchmarks/metrics_throughput.py --device cuda --model resnet50 --images 16

Writes JSON (default ``benchmarks/results/metrics_throughput_<device>.json``) and prints a
table. Random-init weights and random maps: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import environment, median_seconds, print_table, write_json
from saliency.metrics import functional as F


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None).eval().to(device)


def metric_calls(
    model, images, maps, other_maps, classes, references, masks, boxes, cells, batch_size: int
) -> dict[str, Callable[[], Any]]:
    """Every metric, as a zero-argument call on the same inputs (``batch_size`` forwards)."""
    mean = torch.tensor([0.485, 0.456, 0.406])
    std = torch.tensor([0.229, 0.224, 0.225])
    calls: dict[str, Callable[[], Any]] = {
        "feature_agreement": lambda: F.feature_agreement(maps, other_maps),
        "pointing_game": lambda: F.pointing_game(maps, masks),
        "energy_pointing_game": lambda: F.energy_pointing_game(maps, masks),
        "top_k_intersection": lambda: F.top_k_intersection(maps, masks, 1000),
        "aupr": lambda: F.aupr(maps, masks),
        "localisation_error": lambda: F.localisation_error(maps, boxes),
        "grid_pointing_game": lambda: F.grid_pointing_game(maps, cells),
        "grid_region_scores": lambda: F.grid_region_scores(maps, cells),
        "confidence_drop": lambda: F.confidence_drop(
            model, images, maps, classes, batch_size=batch_size
        ),
        "relative_drop": lambda: F.relative_drop(
            model, images, maps, classes, references, batch_size=batch_size
        ),
        "average_drop_increase_gain": lambda: F.drop_increase_gain(
            model, images, maps, classes, batch_size=batch_size
        ),
        "deletion_auc": lambda: F.deletion_auc(model, images, maps, classes, batch_size=batch_size),
        "insertion_auc": lambda: F.insertion_auc(
            model, images, maps, classes, batch_size=batch_size
        ),
    }
    optional = {  # functionals that may not exist in older checkouts
        "spearman_similarity": lambda f: lambda: f(maps, other_maps),
        "ssim_similarity": lambda f: lambda: f(maps, other_maps),
        "hog_similarity": lambda f: lambda: f(maps, other_maps),
        "pic_curves": lambda f: (
            lambda: f(model, images, maps, classes, mean=mean, std=std, batch_size=batch_size)
        ),
    }
    for name, make in optional.items():
        if hasattr(F, name):
            calls[name] = make(getattr(F, name))
    return calls


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="torchvision model name")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4, help="images per measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--metric-batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], help="metrics to leave out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(args.model, device)
    n, size = args.images, args.image_size
    images = torch.randn(n, 3, size, size, device=device)
    maps = torch.rand(n, size, size, device=device)
    other_maps = torch.rand(n, size, size, device=device)
    with torch.no_grad():
        top2 = model(images).topk(2, dim=1).indices
    classes, references = top2[:, 0], top2[:, 1]
    masks = torch.zeros(n, size, size, dtype=torch.bool, device=device)
    masks[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    boxes = torch.tensor([[size // 4, size // 4, 3 * size // 4, 3 * size // 4]] * n, device=device)
    cells = torch.arange(n, device=device) % 4

    def forward() -> None:
        with torch.no_grad():
            model(images)

    forward_s = median_seconds(forward, device, args.repeats)

    # Deletion + insertion AUC at each forward batch size.
    pixels_per_step = size  # RISE: one row of pixels per step (224 at 224²)
    curves_rows = []
    for batch_size in args.batch_sizes:

        def deletion_and_insertion(batch_size: int = batch_size) -> None:
            F.deletion_auc(model, images, maps, classes, pixels_per_step, batch_size=batch_size)
            F.insertion_auc(model, images, maps, classes, pixels_per_step, batch_size=batch_size)

        seconds = median_seconds(deletion_and_insertion, device, args.repeats, warmup=0)
        curves_rows.append(
            {
                "forward_batch_size": batch_size,
                "seconds": seconds,
                "images_per_s": n / seconds,
                "forward_equivalents": seconds / forward_s,
            }
        )
        print(f"  deletion+insertion, batch {batch_size}: {seconds:.2f} s", file=sys.stderr)
    base = curves_rows[0]["seconds"]
    for row in curves_rows:
        row["speedup_vs_first"] = base / row["seconds"]

    metric_rows = []
    calls = metric_calls(
        model,
        images,
        maps,
        other_maps,
        classes,
        references,
        masks,
        boxes,
        cells,
        args.metric_batch_size,
    )
    for name, call in calls.items():
        if name in args.skip:
            continue
        seconds = median_seconds(call, device, args.repeats)
        metric_rows.append(
            {
                "metric": name,
                "seconds": seconds,
                "images_per_s": n / seconds,
                "forward_equivalents": seconds / forward_s,
            }
        )
        print(f"  {name}: {seconds:.3f} s", file=sys.stderr)

    result = {
        "benchmark": "metrics_throughput",
        "config": vars(args),
        "environment": environment(device),
        "forward_seconds": forward_s,
        "deletion_insertion": curves_rows,
        "metrics": metric_rows,
    }
    output = args.output or f"benchmarks/results/metrics_throughput_{device.type}.json"
    write_json(result, output)
    print(f"{args.model} {size}² on {device}, {n} images: one forward {forward_s:.3f} s")
    print_table(
        curves_rows,
        [
            "forward_batch_size",
            "seconds",
            "images_per_s",
            "forward_equivalents",
            "speedup_vs_first",
        ],
    )
    print()
    print_table(metric_rows, ["metric", "seconds", "images_per_s", "forward_equivalents"])
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
