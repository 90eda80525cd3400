"""Maps/s of ``sparseness`` and ``complexity`` against Quantus' own ``Sparseness`` /
``Complexity`` on the same maps, side by side in one run (calls interleaved, so a change of
load on a shared machine hits both alike; the ratio is the figure to read).

Both metrics read the map alone (no model), so the figure is the cost of the metric itself:
ours batched in torch on ``--device``, Quantus' NumPy path with its defaults (``abs``,
``normalise``) on the same maps as arrays.

    uv run python benchmarks/complexity_metrics_throughput.py                 # 64 maps at 224²
    uv run python benchmarks/complexity_metrics_throughput.py --device cuda --maps 256

Writes JSON (default ``benchmarks/results/complexity_metrics_throughput_<device>.json``).
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
from contrastive_saliency.metrics.functional import complexity, sparseness

PAIRS = (("sparseness", sparseness, "Sparseness"), ("complexity", complexity, "Complexity"))


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
    on_device = maps.to(device)
    arrays = maps[:, None].numpy()
    images = np.zeros((options.maps, 3, options.size, options.size), np.float32)
    labels = np.zeros(options.maps, dtype=int)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, options.size, options.size))
    load_start = load_average()
    rows = []
    for name, ours, quantus_name in PAIRS:
        theirs = getattr(quantus, quantus_name)(disable_warnings=True)

        def run_ours(ours=ours):
            return ours(on_device)

        def run_theirs(theirs=theirs):
            return theirs(model=model, x_batch=images, y_batch=labels, a_batch=arrays, device="cpu")

        ours_s, theirs_s = interleaved_median_seconds(
            [run_ours, run_theirs], device, options.repeats
        )
        agreement = np.abs(run_ours().cpu().double().numpy() - np.asarray(run_theirs())).max()
        rows.append({
            "metric": name,
            "ours_maps_per_s": options.maps / ours_s,
            "quantus_maps_per_s": options.maps / theirs_s,
            "speedup": theirs_s / ours_s,
            "max_abs_difference": float(agreement),
        })  # fmt: skip
    result = {
        "benchmark": "complexity_metrics_throughput",
        "config": {**vars(options), "load_average_at_start": load_start},
        "environment": environment(device),
        "load_average_at_end": load_average(),
        "quantus": quantus.__version__ if hasattr(quantus, "__version__") else None,
        "rows": rows,
    }
    output = (
        options.output or f"benchmarks/results/complexity_metrics_throughput_{device.type}.json"
    )
    print_table(rows, list(rows[0]))
    print(f"wrote {write_json(result, output)}")
    return result


if __name__ == "__main__":
    main()
