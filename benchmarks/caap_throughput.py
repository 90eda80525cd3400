"""CAAP cost: the parallel form vs the per-patch loop (Alg. 1), and the E-CAAP approximation.

On a random-init timm ViT (default ``vit_tiny_patch16_224`` at 224², batch 1): seconds per
batch of ``caap`` with ``mode="parallel"``, ``mode="loop"`` and ``precompute_blank=True``
(both blank prototypes), in forward-pass equivalents; the largest difference between the
parallel and loop maps (they must agree); and the deviation of E-CAAP from the exact maps
(max abs, max abs relative to the largest |score|, mean abs). The issue's target is reported,
not asserted: parallel ≥ 5× faster than the loop.

    uv run python benchmarks/caap_throughput.py --threads 1
    uv run python benchmarks/caap_throughput.py --device cuda --batch-size 8

Writes JSON (default ``benchmarks/results/caap_throughput_<device>.json``) and prints a
table. Random weights: speed does not depend on them; the E-CAAP deviation does (pretrained
attention is more peaked), so it is a property of this model, not of CAAP in general.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import (
    PeakMemory,
    environment,
    median_seconds,
    print_checks,
    print_table,
    write_json,
)
from contrastive_saliency.methods.caap import CAAP


def timed(method: CAAP, images, classes, device, repeats: int, warmup: int):
    """Median seconds of ``method.compute`` and the maps ``[B, K, h, w]`` of its last run."""
    outputs: list[torch.Tensor] = []

    def run() -> None:
        outputs[:] = [method.compute(images, classes)]

    return median_seconds(run, device, repeats, warmup=warmup), outputs[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--classes", type=int, default=3, help="K maps per image")
    parser.add_argument("--selection", default="box1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-repeats", type=int, default=1, help="the loop is slow")
    parser.add_argument("--loop-patch-batch-size", type=int, default=49)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    import timm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, img_size=args.image_size)
    model = model.eval().to(device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    generator = torch.Generator().manual_seed(args.seed)
    classes = torch.stack(
        [torch.randperm(model.num_classes, generator=generator)[: args.classes] for _ in images]
    ).to(device)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    forward_s = median_seconds(forward, device, args.repeats)
    variants = {
        "parallel": ({}, args.repeats, 1),
        "parallel_precompute_mean": (
            {"precompute_blank": True, "blank_prototype": "mean"},
            args.repeats,
            1,
        ),
        "parallel_precompute_weighted": (
            {"precompute_blank": True, "blank_prototype": "weighted"},
            args.repeats,
            1,
        ),
        "loop": (
            {"mode": "loop", "patch_batch_size": args.loop_patch_batch_size},
            args.loop_repeats,
            0,
        ),
    }
    rows: list[dict[str, Any]] = []
    maps: dict[str, torch.Tensor] = {}
    for name, (kwargs, repeats, warmup) in variants.items():
        method = CAAP(model, selection=args.selection, **kwargs)
        with PeakMemory(device) as memory:
            seconds, maps[name] = timed(method, images, classes, device, repeats, warmup)
        rows.append(
            {
                "variant": name,
                "seconds": seconds,
                "images_per_s": args.batch_size / seconds,
                "forwards": seconds / forward_s,
                "peak_memory_mib": memory.peak_mib,
            }
        )
        print(f"  {name}: {seconds:.3f} s", file=sys.stderr)

    exact = maps["parallel"]
    scale = float(exact.abs().max())
    for row in rows:
        difference = (maps[row["variant"]] - exact).abs()
        row.update(
            max_abs_vs_parallel=float(difference.max()),
            max_rel_vs_parallel=float(difference.max()) / scale,
            mean_abs_vs_parallel=float(difference.mean()),
        )
    by_name = {row["variant"]: row for row in rows}
    for row in rows:
        row["speedup_vs_loop"] = by_name["loop"]["seconds"] / row["seconds"]
    checks = {
        "parallel >= 5x faster than loop": bool(by_name["parallel"]["speedup_vs_loop"] >= 5.0),
        "parallel equals loop within 1e-4": bool(by_name["loop"]["max_abs_vs_parallel"] <= 1e-4),
    }
    result = {
        "benchmark": "caap_throughput",
        "config": vars(args) | {"num_patches": exact.shape[-2] * exact.shape[-1]},
        "environment": environment(device),
        "forward_seconds": forward_s,
        "max_abs_score": scale,
        "variants": rows,
        "checks": checks,
    }
    output = args.output or f"benchmarks/results/caap_throughput_{device.type}.json"
    write_json(result, output)
    print(
        f"{args.model} {args.image_size}² batch {args.batch_size} on {device}: one forward "
        f"{forward_s:.3f} s; K = {args.classes}; selection {args.selection}"
    )
    print_table(
        rows,
        [
            "variant",
            "seconds",
            "forwards",
            "speedup_vs_loop",
            "max_abs_vs_parallel",
            "max_rel_vs_parallel",
            "mean_abs_vs_parallel",
        ],
    )
    print_checks(checks, output)
    return result


if __name__ == "__main__":
    main()
