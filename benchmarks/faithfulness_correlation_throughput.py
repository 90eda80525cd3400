"""Images/s of ``faithfulness_correlation``, ``faithfulness_estimate``, ``monotonicity`` and
``monotonicity_correlation`` against Quantus' own ``FaithfulnessCorrelation``,
``FaithfulnessEstimate``, ``Monotonicity`` and ``MonotonicityCorrelation`` on the same model,
images, maps and classes, side by side in one run (calls interleaved, so a change of load on
a shared machine hits both alike; the ratio is the figure to read).

Both sides do the same perturbations: the same number of runs / groups / draws per image and
the same pixels per group — Quantus counts array elements, so its ``subset_size`` and
``features_in_step`` are ``3 ×`` ours on RGB images (which is why the default image size is
48: Quantus asks ``features_in_step`` to divide ``H·W``, and ``3 · 48`` divides ``48²`` while
``3 · 64`` does not divide ``64²``). Ours runs its forward batches of ``--batch-size`` on
``--device``; Quantus its NumPy path with its own batching (its ``batch_size`` 64 images per
call, every perturbation step one forward of those images) on the same device. The model is
the project's default classifier (``small_cnn``, random weights: the cost does not depend on
them), in eval mode. ``monotonicity_correlation`` uses ``--draws`` (default 10) draws per
group on both sides instead of the default 100, to keep the run short.

    uv run python benchmarks/faithfulness_correlation_throughput.py               # 16 images, 48²
    uv run python benchmarks/faithfulness_correlation_throughput.py --device cuda --images 64

Writes JSON (default ``benchmarks/results/faithfulness_metrics_throughput_<device>.json``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import (
    environment,
    interleaved_median_seconds,
    load_average,
    print_table,
    write_json,
)
from contrastive_saliency.metrics import functional as F
from lightning_modules.small_cnn import SmallCNN


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--runs", type=int, default=100, help="faithfulness correlation runs")
    parser.add_argument("--subset", type=int, default=224, help="pixels per random subset")
    parser.add_argument("--draws", type=int, default=10, help="monotonicity correlation draws")
    parser.add_argument("--batch-size", type=int, default=256, help="our forward batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--metrics", nargs="*", default=None, help="a subset of the four")
    parser.add_argument("--output", default=None)
    options = parser.parse_args(argv)
    import quantus

    device = torch.device(options.device)
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    size, channels = options.size, 3
    images = torch.randn(options.images, channels, size, size, generator=generator)
    maps = torch.randn(options.images, size, size, generator=generator)
    classes = torch.randint(0, 10, (options.images,), generator=generator)
    indices = torch.arange(options.images)
    x, y, a = images.numpy(), classes.numpy(), maps[:, None].numpy()
    on_device = [t.to(device) for t in (images, maps, classes, indices)]
    step = size  # ours: one image row of pixels per group; Quantus: 3 × as many elements
    common = {"disable_warnings": True, "return_aggregate": False}
    pairs = {
        "faithfulness_correlation": (
            lambda im, m, c, i: F.faithfulness_correlation(
                model, im, m, c, options.subset, options.runs, batch_size=options.batch_size,
                indices=i,
            ),
            quantus.FaithfulnessCorrelation(
                nr_runs=options.runs, subset_size=channels * options.subset, **common
            ),
        ),
        "faithfulness_estimate": (
            lambda im, m, c, i: F.faithfulness_estimate(
                model, im, m, c, step, batch_size=options.batch_size, indices=i
            ),
            quantus.FaithfulnessEstimate(features_in_step=channels * step, **common),
        ),
        "monotonicity": (
            lambda im, m, c, i: F.monotonicity(
                model, im, m, c, step, batch_size=options.batch_size, indices=i
            ),
            quantus.Monotonicity(features_in_step=channels * step, **common),
        ),
        "monotonicity_correlation": (
            lambda im, m, c, i: F.monotonicity_correlation(
                model, im, m, c, step, options.draws, batch_size=options.batch_size, indices=i
            ),
            quantus.MonotonicityCorrelation(
                nr_samples=options.draws, features_in_step=channels * step, **common
            ),
        ),
    }  # fmt: skip
    names = options.metrics or list(pairs)
    load_start = load_average()
    rows = []
    for name in names:
        ours, theirs = pairs[name]

        def run_ours(ours=ours):
            return ours(*on_device)

        def run_theirs(theirs=theirs):
            return theirs(model=model, x_batch=x, y_batch=y, a_batch=a, device=str(device))

        cpu_start, wall_start = _cpu_seconds(), time.perf_counter()
        ours_s, theirs_s = interleaved_median_seconds(
            [run_ours, run_theirs], device, options.repeats
        )
        rows.append({
            "metric": name,
            "ours_images_per_s": options.images / ours_s,
            "quantus_images_per_s": options.images / theirs_s,
            "speedup": theirs_s / ours_s,
            "ours_s": ours_s,
            "quantus_s": theirs_s,
            "cpu_s_both_all_repeats": _cpu_seconds() - cpu_start,
            "wall_s_both_all_repeats": time.perf_counter() - wall_start,
        })  # fmt: skip
        print_table(rows[-1:], list(rows[-1]))
    result = {
        "benchmark": "faithfulness_metrics_throughput",
        "config": {**vars(options), "load_average_at_start": load_start, "model": "small_cnn"},
        "environment": environment(device),
        "load_average_at_end": load_average(),
        "quantus": getattr(quantus, "__version__", None),
        "notes": (
            "Same perturbations on both sides (Quantus' element counts = 3 x our pixel counts). "
            "Quantus 0.6 Monotonicity never changes its image (tests/test_faithfulness_"
            "metrics.py) but runs the same forwards, so its time is the cost of its loop. "
            "Random subsets and uniform draws differ between the two (parity with the same "
            "draws is in the tests)."
        ),
        "rows": rows,
    }
    output = (
        options.output or f"benchmarks/results/faithfulness_metrics_throughput_{device.type}.json"
    )
    print_table(rows, ["metric", "ours_images_per_s", "quantus_images_per_s", "speedup"])
    print(f"wrote {write_json(result, output)}")
    return result


if __name__ == "__main__":
    main()
