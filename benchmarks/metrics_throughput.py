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

It also times the feature agreement (CASE Eq. 7) with its tie rule — the expected overlap under
uniform tie-breaking (:mod:`contrastive_saliency.metrics.functional.ties`) — against the version it
replaced, which ranked each map with a stable sort and so padded a sparse map's top k in
raster order (kept below, only as this baseline), side by side on dense and on sparse maps
(issue 16 acceptance: the unbiased one costs at most 2× the old). Only that comparison:

    uv run python benchmarks/metrics_throughput.py --feature-agreement-only   # ~2 min on CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import (
    environment,
    median_seconds,
    print_checks,
    print_table,
    write_json,
)
from contrastive_saliency.metrics import functional as F


def stable_sort_feature_agreement(
    maps_a: torch.Tensor, maps_b: torch.Tensor, fraction: float = 0.05
) -> torch.Tensor:
    """BASELINE ONLY — the feature agreement before issue 16: each map's top k by a stable
    descending sort, so ties (a sparse map's zeros) enter in raster order and two sparse maps
    agree on their shared padding. Biased; kept here to time the unbiased one against it."""
    num_pixels = maps_a[0].numel()
    k = max(1, round(fraction * num_pixels))
    ranked = [
        torch.sort(m.clamp(min=0).flatten(1), dim=1, descending=True, stable=True).indices[:, :k]
        for m in (maps_a, maps_b)
    ]
    selected = torch.zeros(maps_a.shape[0], num_pixels, dtype=torch.bool, device=maps_a.device)
    selected.scatter_(1, ranked[0], True)
    return selected.gather(1, ranked[1]).sum(dim=1).float() / k


def feature_agreement_comparison(
    maps: int, sizes: list[int], device: torch.device, repeats: int, seed: int
) -> list[dict[str, Any]]:
    """Seconds of the unbiased and the stable-sort feature agreement on the same ``maps``
    pairs of each ``size²``, dense (uniform noise, no ties) and sparse (ReLU'd: 3 % and 2 % of
    the pixels positive, both fewer than k = 5 %, so each top k ends in a tie at 0 — where the
    baseline's raster padding makes them agree), the two alternating call by call in one run."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for size in sizes:
        dense = [torch.rand(maps, size, size, generator=generator) for _ in range(2)]
        sparse = [
            (torch.rand(maps, size, size, generator=generator) - c).relu() for c in (0.97, 0.98)
        ]
        for kind, pair in (("dense", dense), ("sparse", sparse)):
            rows.append(_time_pair(kind, size, *(m.to(device) for m in pair), device, repeats))
    return rows


def _alternate(
    calls: dict[str, Callable[[], Any]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median seconds of each call, the calls alternating one by one for ``repeats`` rounds
    (after one warm-up each), so load changes hit them alike."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(median_seconds(call, device, 1, warmup=0))
    return {name: statistics.median(values) for name, values in times.items()}


def _time_pair(
    kind: str, size: int, a: torch.Tensor, b: torch.Tensor, device: torch.device, repeats: int
) -> dict[str, Any]:
    calls = {
        "unbiased": lambda: F.feature_agreement(a, b),
        "stable_sort": lambda: stable_sort_feature_agreement(a, b),
    }
    seconds = _alternate(calls, device, repeats)
    unbiased, baseline = seconds["unbiased"], seconds["stable_sort"]
    print(
        f"  feature agreement, {size}² {kind}: {unbiased:.4f} s vs {baseline:.4f} s",
        file=sys.stderr,
    )
    return {
        "maps": kind,
        "size": size,
        "pairs": a.shape[0],
        "unbiased_seconds": unbiased,
        "stable_sort_seconds": baseline,
        "ratio_unbiased_over_stable_sort": unbiased / baseline,
        "unbiased_mean": calls["unbiased"]().mean().item(),
        "stable_sort_mean": calls["stable_sort"]().mean().item(),
    }


def order_comparison(
    maps: int, sizes: list[int], device: torch.device, repeats: int, seed: int
) -> list[dict[str, Any]]:
    """Informational: the index-keyed tie-broken orders (the top-k mask of confidence / relative
    drop, the full rank of deletion / insertion) against a stable sort by position, on sparse
    maps (3 % positive) — the cost of a random tie order, not part of the acceptance."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for size in sizes:
        flat = (torch.rand(maps, size * size, generator=generator) - 0.97).relu().to(device)
        rows += _time_orders(flat, size, device, repeats)
    return rows


def _time_orders(
    flat: torch.Tensor, size: int, device: torch.device, repeats: int
) -> list[dict[str, Any]]:
    from contrastive_saliency.metrics.functional.ties import pixel_ranks, top_k_positions

    indices = torch.arange(flat.shape[0], device=device)
    k = round(0.05 * flat.shape[1])

    def stable() -> torch.Tensor:
        return torch.sort(flat, dim=1, descending=True, stable=True).indices

    rows = []
    for name, tie_broken, baseline in (
        ("top_k_mask", lambda: top_k_positions(flat, indices, k), lambda: stable()[:, :k]),
        ("full_rank", lambda: pixel_ranks(flat, indices), stable),
    ):
        seconds = _alternate({"tie_broken": tie_broken, "stable": baseline}, device, repeats)
        rows.append(
            {
                "order": name,
                "size": size,
                "maps": flat.shape[0],
                "tie_broken_seconds": seconds["tie_broken"],
                "stable_sort_seconds": seconds["stable"],
                "ratio": seconds["tie_broken"] / seconds["stable"],
            }
        )
    return rows


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None).eval().to(device)


def metric_calls(
    model, images, maps, other_maps, classes, references, masks, boxes, cells, batch_size: int
) -> dict[str, Callable[[], Any]]:
    """Every metric, as a zero-argument call on the same inputs (``batch_size`` forwards)."""
    indices = torch.arange(images.shape[0], device=images.device)
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
            model, images, maps, classes, batch_size=batch_size, indices=indices
        ),
        "relative_drop": lambda: F.relative_drop(
            model, images, maps, classes, references, batch_size=batch_size, indices=indices
        ),
        "average_drop_increase_gain": lambda: F.drop_increase_gain(
            model, images, maps, classes, batch_size=batch_size
        ),
        "deletion_auc": lambda: F.deletion_auc(
            model, images, maps, classes, batch_size=batch_size, indices=indices
        ),
        "insertion_auc": lambda: F.insertion_auc(
            model, images, maps, classes, batch_size=batch_size, indices=indices
        ),
    }
    optional = {  # functionals that may not exist in older checkouts
        "spearman_similarity": lambda f: lambda: f(maps, other_maps),
        "ssim_similarity": lambda f: lambda: f(maps, other_maps),
        "hog_similarity": lambda f: lambda: f(maps, other_maps),
        "pic_curves": lambda f: (
            lambda: f(
                model,
                images,
                maps,
                classes,
                mean=mean,
                std=std,
                batch_size=batch_size,
                indices=indices,
            )
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
    parser.add_argument(
        "--feature-agreement-only",
        action="store_true",
        help="only the unbiased vs stable-sort feature agreement comparison",
    )
    parser.add_argument("--agreement-maps", type=int, default=64, help="map pairs per call")
    parser.add_argument(
        "--agreement-sizes",
        type=int,
        nargs="+",
        default=[64, 224],
        help="map sides (the embedded benchmark's 64², ImageNet's 224²)",
    )
    parser.add_argument("--agreement-repeats", type=int, default=7)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    args.load_average_at_start = list(os.getloadavg())
    agreement_rows = feature_agreement_comparison(
        args.agreement_maps, args.agreement_sizes, device, args.agreement_repeats, args.seed
    )
    if args.feature_agreement_only:
        return _report_feature_agreement(args, device, agreement_rows)
    torch.manual_seed(args.seed)
    model = build_model(args.model, device)
    n, size = args.images, args.image_size
    images = torch.randn(n, 3, size, size, device=device)
    indices = torch.arange(n, device=device)
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
            for auc in (F.deletion_auc, F.insertion_auc):
                auc(
                    model, images, maps, classes, pixels_per_step, batch_size=batch_size,
                    indices=indices,
                )  # fmt: skip

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
        "feature_agreement_vs_stable_sort": agreement_rows,
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
    print()
    print_table(agreement_rows, AGREEMENT_COLUMNS)
    print(f"wrote {output}")
    return result


AGREEMENT_COLUMNS = [
    "size", "maps", "unbiased_seconds", "stable_sort_seconds", "ratio_unbiased_over_stable_sort",
    "unbiased_mean", "stable_sort_mean",
]  # fmt: skip


def _report_feature_agreement(
    args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``--feature-agreement-only`` JSON (``…_feature_agreement_<device>.json``) and table."""
    worst = max(row["ratio_unbiased_over_stable_sort"] for row in rows)
    orders = order_comparison(
        args.agreement_maps, args.agreement_sizes, device, args.agreement_repeats, args.seed
    )
    result = {
        "benchmark": "metrics_throughput/feature_agreement_vs_stable_sort",
        "config": vars(args),
        "environment": environment(device),
        "load_average_1_5_15_min_at_end": list(os.getloadavg()),
        "feature_agreement_vs_stable_sort": rows,
        "acceptance": {"max_ratio": worst, "target": 2.0, "passed": worst <= 2.0},
        "tie_broken_orders_vs_stable_sort": orders,
    }
    output = args.output or (
        f"benchmarks/results/metrics_throughput_feature_agreement_{device.type}.json"
    )
    write_json(result, output)
    print_table(rows, AGREEMENT_COLUMNS)
    print()
    print_table(orders, ["order", "size", "tie_broken_seconds", "stable_sort_seconds", "ratio"])
    print_checks(
        {f"unbiased feature agreement ≤ 2× the stable-sort one ({worst:.2f}×)": worst <= 2}, output
    )
    return result


if __name__ == "__main__":
    main()
