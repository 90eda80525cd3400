"""ClusCAM cost, split into clustering and scoring (the split of ClusCAM Fig. 6).

For each model (torchvision, random init: speed does not depend on the weights), with the
paper's Table 3 preset of that architecture, on one batch:

- ``forward``: one no-grad forward of the batch (the unit of the forward-equivalent columns);
- clustering, ``cluster`` = capture forward + ``group``; ``group`` = ``normalise`` (each
  channel map's upsampled min/max) + ``kmeans`` (k-means++ and Lloyd in the reduced space,
  dimension h·w, and the centres mapped back to H·W; ``kmeans_s = group_s − normalise_s``);
- ``score``: the B·K masked forwards of Eq. 5 (all requested classes from the same forwards);
- ``combine``: discarding, temperature softmax, weighted sum, normalisation (Eqs. 6–7);
- ``full``: one whole ``method(images, classes)`` call (≈ cluster + score + combine).

With ``--explicit-iterations N > 0`` the same k-means also runs on the explicit H·W-pixel
upsampled maps (what the reference code clusters): seeding plus at most N Lloyd iterations,
a lower bound of its cost, next to ``group`` capped at the same N iterations
(``group_same_iterations_s``), to show what the exact reduction saves.

    uv run python benchmarks/cluscam_cost.py                  # resnet18 + resnet50, 224², batch 4
    uv run python benchmarks/cluscam_cost.py --models resnet18 --device cuda
    uv run python benchmarks/cluscam_cost.py --threads 1   # a shared, oversubscribed CPU

Writes JSON (default ``benchmarks/results/cluscam_cost_<device>.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import environment, median_seconds, print_table, write_json
from contrastive_saliency.kmeans import kmeans
from contrastive_saliency.methods.cluscam import (
    CLUSCAM_PRESETS,
    ClusCAM,
    combine,
    normalise_by_upsampled_range,
)


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None).eval().to(device)


def measure(
    name: str, args: argparse.Namespace, device: torch.device, generator: torch.Generator
) -> dict[str, Any]:
    """One table row: the timings of ClusCAM's stages for model ``name``."""
    model = build_model(name, device)
    method = ClusCAM(model, preset=name, batch_size=args.score_batch_size, seed=args.seed)
    images = torch.randn(
        args.batch_size, 3, args.image_size, args.image_size, generator=generator
    ).to(device)
    with torch.no_grad():
        num_classes = model(images[:1]).shape[1]
    classes = torch.randint(num_classes, (args.batch_size, args.classes), generator=generator)
    classes = classes.to(device)
    size = (args.image_size, args.image_size)

    activations, _ = method.features(images)
    maps, _, logits = method.cluster(images)
    scores = method.score(images, maps, classes, logits)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    repeats = args.repeats
    row: dict[str, Any] = {
        "model": name,
        "layer": method.layer,
        "channels": activations.shape[1],
        "feature_size": list(activations.shape[-2:]),
        "K": method.num_clusters,
        "r": method.discard_ratio,
        "tau": method.temperature,
        "masked_forwards": args.batch_size * method.num_clusters,
        "forward_s": median_seconds(forward, device, repeats),
        "normalise_s": median_seconds(
            lambda: normalise_by_upsampled_range(activations, size), device, repeats
        ),
        "group_s": median_seconds(lambda: method.group(activations, size), device, repeats),
        "cluster_s": median_seconds(lambda: method.cluster(images), device, repeats),
        "score_s": median_seconds(
            lambda: method.score(images, maps, classes, logits),
            device,
            args.score_repeats,
            warmup=0,
        ),
        "combine_s": median_seconds(
            lambda: combine(maps, scores, method.discard_ratio, method.temperature),
            device,
            repeats,
        ),
    }
    row["kmeans_s"] = row["group_s"] - row["normalise_s"]  # + the reduction, ~free
    row["full_s"] = median_seconds(lambda: method(images, classes), device, 1, warmup=0)
    row["cluster_share"] = row["cluster_s"] / row["full_s"]
    row["full_forwards"] = row["full_s"] / row["forward_s"]
    row["score_s_per_masked_forward_image"] = row["score_s"] / row["masked_forwards"]
    if args.explicit_iterations > 0:
        unit = normalise_by_upsampled_range(activations, size)
        explicit = torch.nn.functional.interpolate(
            unit, size=size, mode="bilinear", align_corners=False
        ).flatten(2)
        capped = ClusCAM(
            model, preset=name, seed=args.seed, kmeans_iterations=args.explicit_iterations
        )
        row["group_same_iterations_s"] = median_seconds(
            lambda: capped.group(activations, size), device, repeats
        )
        row["explicit_dim"] = explicit.shape[-1]
        row["explicit_kmeans_s"] = median_seconds(
            lambda: kmeans(
                explicit, method.num_clusters, iterations=args.explicit_iterations, seed=args.seed
            ),
            device,
            1,
            warmup=0,
        )
        del explicit
    print(
        f"  {name}: cluster {row['cluster_s']:.3f} s, score {row['score_s']:.3f} s", file=sys.stderr
    )
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--classes", type=int, default=1, help="maps per image")
    parser.add_argument("--score-batch-size", type=int, default=32, help="masked images/forward")
    parser.add_argument("--repeats", type=int, default=3, help="for the cheap stages")
    parser.add_argument("--score-repeats", type=int, default=1, help="for the masked forwards")
    parser.add_argument("--explicit-iterations", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    unknown = [name for name in args.models if name not in CLUSCAM_PRESETS]
    if unknown:
        parser.error(f"no Table 3 preset for {unknown}; choose from {sorted(CLUSCAM_PRESETS)}")

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    rows = [measure(name, args, device, generator) for name in args.models]
    result = {
        "benchmark": "cluscam_cost",
        "config": vars(args),
        "environment": environment(device),
        "models": rows,
    }
    output = args.output or f"benchmarks/results/cluscam_cost_{device.type}.json"
    write_json(result, output)
    print(f"{args.image_size}² batch {args.batch_size}, {args.classes} class(es)/image, {device}")
    print_table(
        rows,
        [
            "model",
            "K",
            "channels",
            "forward_s",
            "normalise_s",
            "kmeans_s",
            "group_s",
            "cluster_s",
            "score_s",
            "combine_s",
            "full_s",
            "cluster_share",
            "full_forwards",
            "group_same_iterations_s",
            "explicit_kmeans_s",
        ],
    )
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
