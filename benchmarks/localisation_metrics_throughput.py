"""Maps/s of ``relevance_rank_accuracy`` and ``pointing_game`` against Quantus' own
``RelevanceRankAccuracy`` / ``PointingGame`` on the same maps and masks, side by side in one run
(calls interleaved, so a change of load on a shared machine hits both alike; the ratio is the
figure to read).

Both read the map and a ground-truth mask (no model), so the figure is the cost of the metric
itself: ours batched in torch on ``--device``, Quantus' NumPy path with its defaults on the
same maps and masks as arrays. Maps are continuous random values (no ties), where the two
definitions agree exactly (tests/test_localisation_metrics.py); the JSON records the largest
difference of the values.

    uv run python benchmarks/localisation_metrics_throughput.py                 # 64 maps at 224²
    uv run python benchmarks/localisation_metrics_throughput.py --device cuda --maps 256

Writes JSON (default ``benchmarks/results/localisation_metrics_throughput_<device>.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import (
    environment,
    interleaved_median_seconds,
    load_average,
    print_table,
    write_json,
)
from contrastive_saliency.metrics.functional import pointing_game, relevance_rank_accuracy

PAIRS = (
    ("relevance_rank_accuracy", relevance_rank_accuracy, "RelevanceRankAccuracy"),
    # ties="any" is Quantus' rule; on maps without ties every rule gives the same hit
    ("pointing_game", lambda maps, masks: pointing_game(maps, masks, "any"), "PointingGame"),
)


def _object_masks(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, size, size]`` boolean discs of random centre and radius (10–30 % of the side)."""
    centres = torch.rand(count, 2, generator=generator) * size
    radii = (0.1 + 0.2 * torch.rand(count, generator=generator)) * size
    coordinates = torch.arange(size, dtype=torch.float32)
    dy = coordinates[None, :, None] - centres[:, 0, None, None]
    dx = coordinates[None, None, :] - centres[:, 1, None, None]
    return dy**2 + dx**2 <= radii[:, None, None] ** 2


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--maps", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=None)
    options = parser.parse_args(argv)
    import quantus

    device = torch.device(options.device)
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(options.maps, options.size, options.size, generator=generator)
    masks = _object_masks(options.maps, options.size, generator)
    maps_on_device, masks_on_device = maps.to(device), masks.to(device)
    arrays, mask_arrays = maps[:, None].numpy(), masks[:, None].float().numpy()
    images = np.zeros((options.maps, 3, options.size, options.size), np.float32)
    labels = np.zeros(options.maps, dtype=int)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, options.size, options.size))
    load_start = load_average()
    rows = []
    for name, ours, quantus_name in PAIRS:
        theirs = getattr(quantus, quantus_name)(disable_warnings=True)

        def run_ours(ours=ours):
            return ours(maps_on_device, masks_on_device)

        def run_theirs(theirs=theirs):
            return theirs(
                model=model, x_batch=images, y_batch=labels, a_batch=arrays,
                s_batch=mask_arrays, device="cpu",
            )  # fmt: skip

        ours_s, theirs_s = interleaved_median_seconds(
            [run_ours, run_theirs], device, options.repeats
        )
        ours_values = run_ours().cpu().double().numpy()
        theirs_values = np.asarray(run_theirs(), dtype=np.float64)
        rows.append({
            "metric": name,
            "ours_maps_per_s": options.maps / ours_s,
            "quantus_maps_per_s": options.maps / theirs_s,
            "speedup": theirs_s / ours_s,
            "max_abs_difference": float(np.abs(ours_values - theirs_values).max()),
        })  # fmt: skip
    result = {
        "benchmark": "localisation_metrics_throughput",
        "config": {**vars(options), "load_average_at_start": load_start},
        "environment": environment(device),
        "load_average_at_end": load_average(),
        "quantus": quantus.__version__ if hasattr(quantus, "__version__") else None,
        "rows": rows,
    }
    output = (
        options.output or f"benchmarks/results/localisation_metrics_throughput_{device.type}.json"
    )
    print_table(rows, list(rows[0]))
    print(f"wrote {write_json(result, output)}")
    return result


if __name__ == "__main__":
    main()
