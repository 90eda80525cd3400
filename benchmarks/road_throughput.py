"""Images/s of ``road`` (MoRF + LeRF over 9 removal percentages, noisy linear imputation)
against pytorch-grad-cam's ``ROADCombined`` and Quantus' ``ROAD`` on the same model and
inputs, side by side in one run (calls interleaved, so a change of load on a shared machine
hits all alike; the ratios are the figures to read).

Inputs are single-channel images because Quantus 0.6.0's ``ROAD`` raises ``IndexError`` on
multi-channel ones (tests/test_road.py). Quantus scores the MoRF curve only (accuracy), so it
does half the imputations of ours and pytorch-grad-cam's (both orders): its images/s is for
the MoRF half, and ``speedup_vs_quantus_same_work`` halves its time to compare equal work.
All three use noise 0.01 and percentages 10, 20, …, 90; ours imputes and scores the
``2 · 9 · B`` perturbed images in chunks of ``--chunk`` (conjugate gradients on the device),
pytorch-grad-cam and Quantus solve each image's system with SciPy's ``spsolve``.

    uv run python benchmarks/road_throughput.py                 # 16 images 32², 1 thread
    uv run python benchmarks/road_throughput.py --size 64 --threads 2

Writes JSON (default ``benchmarks/results/road_throughput_<device>.json``).
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
from contrastive_saliency.metrics.functional.road import DEFAULT_PERCENTAGES, road


def _model(size: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 10),
    ).eval()  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=256, help="our perturbed images per solve")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (all three)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    options = parser.parse_args(argv)
    import quantus
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(options.images, 1, options.size, options.size, generator=generator)
    maps = torch.rand(options.images, options.size, options.size, generator=generator)
    model = _model(options.size)
    with torch.no_grad():
        classes = model(images).argmax(dim=1)
    on_device = [t.to(device) for t in (images, maps, classes)]
    model_on_device = _model(options.size).to(device)
    index = torch.arange(options.images, device=device)
    percentages = list(DEFAULT_PERCENTAGES)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    grad_cam = ROADCombined(percentiles=percentages)
    quantus_road = quantus.ROAD(percentages=percentages, noise=0.01, disable_warnings=True)

    def run_ours():
        return road(model_on_device, *on_device, percentages, 0.01, "probability", options.chunk,
                    indices=index)  # fmt: skip

    def run_grad_cam():
        return grad_cam(images, maps.numpy(), targets, model)

    def run_quantus():
        return quantus_road(
            model=model, x_batch=images.numpy(), y_batch=classes.numpy(),
            a_batch=maps[:, None].numpy(), device="cpu", batch_size=options.images,
        )  # fmt: skip

    load_start = load_average()
    ours_s, grad_cam_s, quantus_s = interleaved_median_seconds(
        [run_ours, run_grad_cam, run_quantus], device, options.repeats
    )
    # Agreement of the scores (noise differs in its draws: each draws its own noise).
    ours = run_ours()
    theirs = grad_cam(images, maps.numpy(), targets, model)
    rows = [
        {
            "implementation": "ours (MoRF + LeRF)",
            "images_per_s": options.images / ours_s,
            "seconds": ours_s,
        },
        {
            "implementation": "pytorch-grad-cam ROADCombined (MoRF + LeRF)",
            "images_per_s": options.images / grad_cam_s,
            "seconds": grad_cam_s,
        },
        {
            "implementation": "Quantus ROAD (MoRF only)",
            "images_per_s": options.images / quantus_s,
            "seconds": quantus_s,
        },
    ]
    result = {
        "benchmark": "road_throughput",
        "config": {**vars(options), "load_average_at_start": load_start},
        "environment": environment(device),
        "load_average_at_end": load_average(),
        "quantus": getattr(quantus, "__version__", None),
        "rows": rows,
        "speedup_vs_grad_cam": grad_cam_s / ours_s,
        "speedup_vs_quantus": quantus_s / ours_s,
        "speedup_vs_quantus_same_work": 2 * quantus_s / ours_s,
        "combined_max_abs_difference_vs_grad_cam_noise_0.01": float(
            np.abs(ours.combined.cpu().numpy() - theirs).max()
        ),
    }
    output = options.output or f"benchmarks/results/road_throughput_{device.type}.json"
    print_table(rows, list(rows[0]))
    for key in ("speedup_vs_grad_cam", "speedup_vs_quantus", "speedup_vs_quantus_same_work"):
        print(f"{key}: {result[key]:.2f}")
    print(f"wrote {write_json(result, output)}")
    return result


if __name__ == "__main__":
    main()
