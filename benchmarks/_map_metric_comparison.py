"""The shared run of the map-only metric benchmarks (complexity, localisation): ours batched in
torch on ``--device`` against Quantus' own class on the same maps (and masks), calls
interleaved so a change of load hits both alike, the largest difference of the values kept
beside the ratio."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from benchmarks._timing import (
    environment,
    interleaved_median_seconds,
    load_average,
    print_table,
    write_json,
)

# (our name, our function of (maps[, masks]), Quantus' class name)
Pair = tuple[str, Callable[..., torch.Tensor], str]


def compare_map_metrics(
    benchmark: str,
    description: str,
    pairs: Sequence[Pair],
    argv: list[str] | None,
    masks: Callable[[int, int, torch.Generator], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Parse the common options, time every pair on random ``[maps, size, size]`` maps (and
    ``masks(count, size, generator)`` when given: Quantus' ``s_batch``), print the table and
    write ``benchmarks/results/<benchmark>_<device>.json``."""
    parser = argparse.ArgumentParser(description=description)
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
    ours_inputs = [maps.to(device)]
    theirs_inputs = {"a_batch": maps[:, None].numpy()}
    if masks is not None:
        regions = masks(options.maps, options.size, generator)
        ours_inputs.append(regions.to(device))
        theirs_inputs["s_batch"] = regions[:, None].float().numpy()
    images = np.zeros((options.maps, 3, options.size, options.size), np.float32)
    labels = np.zeros(options.maps, dtype=int)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, options.size, options.size))
    load_start = load_average()
    rows = []
    for name, ours, quantus_name in pairs:
        theirs = getattr(quantus, quantus_name)(disable_warnings=True)

        def run_ours(ours=ours):
            return ours(*ours_inputs)

        def run_theirs(theirs=theirs):
            return theirs(
                model=model, x_batch=images, y_batch=labels, device="cpu", **theirs_inputs
            )

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
        "benchmark": benchmark,
        "config": {**vars(options), "load_average_at_start": load_start},
        "environment": environment(device),
        "load_average_at_end": load_average(),
        "quantus": getattr(quantus, "__version__", None),
        "rows": rows,
    }
    output = options.output or f"benchmarks/results/{benchmark}_{device.type}.json"
    print_table(rows, list(rows[0]))
    print(f"wrote {write_json(result, output)}")
    return result
