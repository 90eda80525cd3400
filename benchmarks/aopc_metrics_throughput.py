"""Images/s of ``pixel_flipping``, ``region_perturbation`` and ``irof`` against Quantus' own
``PixelFlipping`` / ``RegionPerturbation`` / ``IROF`` on the same model and inputs, side by side
in one run (calls interleaved, so a change of load on a shared machine hits both alike; the
ratio is the figure to read).

Settings are those under which the two compute the same curves (tests/test_aopc_metrics.py):
pixel flipping ``pixels_per_step = k`` against ``features_in_step = 3·k`` (Quantus counts
channel values), black baseline, softmax; region perturbation with Quantus' defaults (8×8
patches, 100 regions, black); IROF with SLIC's defaults on single-channel images (Quantus 0.6
fails on multi-channel ones) and the constant baseline 0 (Quantus' ``"mean"`` is the mean of
the whole perturbed batch). Quantus calls ``np.trapz``, which NumPy 2 removed: it is aliased
to ``np.trapezoid`` here. Each row also reports the largest difference between our values and
Quantus' (AOPC from Quantus' curves; for IROF Quantus' unit-step form rebuilt from our ratios).

    uv run python benchmarks/aopc_metrics_throughput.py                  # 16 images at 48²
    uv run python benchmarks/aopc_metrics_throughput.py --device cuda --images 128
    uv run python benchmarks/aopc_metrics_throughput.py --size 24 --pixels-per-step 8 \
        --output benchmarks/results/aopc_metrics_throughput_cpu_24px.json  # smaller images

Ours runs at the model's forward cost; the ratio is Quantus' per-step NumPy overhead against
that cost, so it is larger where the forward is cheaper (smaller images or models).

Writes JSON (default ``benchmarks/results/aopc_metrics_throughput_<device>.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import (
    environment,
    interleaved_median_seconds,
    load_average,
    print_table,
    write_json,
)
from contrastive_saliency.metrics.functional import (
    irof_curve,
    pixel_flipping_curve,
    region_perturbation_curve,
)


def _model(channels: int, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, classes),
    ).eval()  # fmt: skip


def _inputs(count: int, channels: int, size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, channels, size, size, generator=generator)
    maps = torch.randn(count, size, size, generator=generator)
    classes = torch.arange(count) % 10
    return images, maps, classes


def _irof_quantus_form(ratios: torch.Tensor, counts: torch.Tensor) -> np.ndarray:
    """Quantus' IROF from our ratios: ``n − trapz`` of ``r_1 … r_n`` zero-padded to the batch's
    largest count (its batch rule)."""
    ratios, counts = ratios.double().cpu().numpy(), counts.cpu().numpy()
    longest = int(counts.max())
    values = []
    for row, n in zip(ratios, counts, strict=True):
        padded = np.zeros(longest)
        padded[:n] = row[1 : n + 1]
        values.append(n - np.trapezoid(padded))
    return np.asarray(values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--pixels-per-step", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=256, help="our images per forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    options = parser.parse_args(argv)
    import quantus

    if not hasattr(np, "trapz"):  # Quantus 0.6 on NumPy 2
        np.trapz = np.trapezoid
    device = torch.device(options.device)
    rows = []
    load_start = load_average()
    index = torch.arange(options.images, device=device)
    common = {"normalise": False, "disable_warnings": True}

    # Pixel flipping and region perturbation: RGB images.
    rgb_model = _model(3).to(device)
    images, maps, classes = _inputs(options.images, 3, options.size)
    quantus_arguments = {
        "model": rgb_model, "x_batch": images.numpy(), "y_batch": classes.numpy(),
        "a_batch": maps[:, None].numpy(), "device": options.device,
    }  # fmt: skip
    on_device = (images.to(device), maps.to(device), classes.to(device))
    step = options.pixels_per_step

    def ours_pixel_flipping():
        return pixel_flipping_curve(
            rgb_model, *on_device, step, "black", batch_size=options.batch_size, indices=index
        )

    def ours_region_perturbation():
        return region_perturbation_curve(
            rgb_model, *on_device, 8, 100, "black", batch_size=options.batch_size, indices=index
        )

    cases = [
        (
            "pixel_flipping",
            ours_pixel_flipping,
            quantus.PixelFlipping(features_in_step=3 * step, perturb_baseline="black", **common),
            lambda curve: curve[:, 1:],  # Quantus' curve lacks the unperturbed point
        ),
        (
            "region_perturbation",
            ours_region_perturbation,
            quantus.RegionPerturbation(patch_size=8, regions_evaluation=100, **common),
            lambda curve: curve[:, :1] - curve[:, 1:],  # Quantus returns the drops
        ),
    ]
    for name, run_ours, metric, comparable in cases:

        def run_theirs(metric=metric):
            return metric(**quantus_arguments)

        ours_s, theirs_s = interleaved_median_seconds(
            [run_ours, run_theirs], device, options.repeats
        )
        curve = run_ours().cpu().double()
        theirs = np.asarray(run_theirs(), dtype=np.float64)
        difference = np.abs(comparable(curve).numpy() - theirs).max()
        rows.append({
            "metric": name, "steps_per_image": curve.shape[1] - 1,
            "ours_images_per_s": options.images / ours_s,
            "quantus_images_per_s": options.images / theirs_s,
            "speedup": theirs_s / ours_s, "max_abs_difference": float(difference),
        })  # fmt: skip

    # IROF: single-channel images (Quantus 0.6's IROF masks only one channel).
    grey_model = _model(1).to(device)
    grey, grey_maps, grey_classes = _inputs(options.images, 1, options.size, seed=1)
    grey_on_device = (grey.to(device), grey_maps.to(device), grey_classes.to(device))
    irof_metric = quantus.IROF(perturb_baseline=0.0, return_aggregate=False, **common)

    def run_ours_irof():
        return irof_curve(grey_model, *grey_on_device, baseline="zero",
                          batch_size=options.batch_size, indices=index)  # fmt: skip

    def run_theirs_irof():
        return irof_metric(
            model=grey_model, x_batch=grey.numpy(), y_batch=grey_classes.numpy(),
            a_batch=grey_maps[:, None].numpy(), device=options.device,
        )  # fmt: skip

    ours_s, theirs_s = interleaved_median_seconds([run_ours_irof, run_theirs_irof], device,
                                                  options.repeats)  # fmt: skip
    ratios, counts = run_ours_irof()
    difference = np.abs(_irof_quantus_form(ratios, counts) - np.asarray(run_theirs_irof())).max()
    rows.append({
        "metric": "irof", "steps_per_image": float(counts.float().mean()),
        "ours_images_per_s": options.images / ours_s,
        "quantus_images_per_s": options.images / theirs_s,
        "speedup": theirs_s / ours_s, "max_abs_difference": float(difference),
    })  # fmt: skip

    result = {
        "benchmark": "aopc_metrics_throughput",
        "config": {**vars(options), "load_average_at_start": load_start},
        "environment": environment(device),
        "load_average_at_end": load_average(),
        "quantus": getattr(quantus, "__version__", None),
        "rows": rows,
    }
    output = options.output or f"benchmarks/results/aopc_metrics_throughput_{device.type}.json"
    print_table(rows, list(rows[0]))
    print(f"wrote {write_json(result, output)}")
    return result


if __name__ == "__main__":
    main()
