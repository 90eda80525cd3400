"""Images/s of the ROAD metrics against Quantus' ``ROAD`` and pytorch-grad-cam's
``ROADCombined`` on the same model and inputs and the same work, side by side in one run
(calls interleaved, so a change of load on a shared machine hits all alike; the ratios are the
figures to read):

- ``road_morf`` (ours, the MoRF curve only) against Quantus ``ROAD``, which computes the MoRF
  curve only (accuracy);
- ``road`` (ours, MoRF + LeRF, the combined score) against pytorch-grad-cam's
  ``ROADCombined`` (MoRF + LeRF).

Ours run as the registered metrics (``update`` without a shared cache, so each computes its
own curves). Inputs are single-channel images because Quantus 0.6.0's ``ROAD`` raises
``IndexError`` on multi-channel ones (tests/test_road.py). All use noise 0.01 and percentages
10, 20, …, 90; ours imputes and scores the perturbed images in chunks of ``--chunk``
(conjugate gradients on the device), pytorch-grad-cam and Quantus solve each image's system
with SciPy's ``spsolve``.

    uv run python benchmarks/road_throughput.py                 # 16 images 32², 1 thread
    uv run python benchmarks/road_throughput.py --size 64 --threads 2

Writes JSON (default ``benchmarks/results/road_throughput_<device>.json``).
"""

from __future__ import annotations

import argparse
import sys
import time
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
from contrastive_saliency.metrics import create_metric
from contrastive_saliency.metrics.functional.road import DEFAULT_PERCENTAGES


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

    metrics = {
        name: create_metric(name, percentages=percentages, noise_std=0.01, batch_size=options.chunk)
        for name in ("road_morf", "road")
    }

    def ours(name: str):
        def run():
            metric = metrics[name]
            metric.reset()
            metric.update(model_on_device, *on_device, index)
            return metric.per_sample_table()[1][name]

        return run

    def run_grad_cam():
        return grad_cam(images, maps.numpy(), targets, model)

    def run_quantus():
        return quantus_road(
            model=model, x_batch=images.numpy(), y_batch=classes.numpy(),
            a_batch=maps[:, None].numpy(), device="cpu", batch_size=options.images,
        )  # fmt: skip

    load_start = load_average()
    cpu_start = time.process_time()
    morf_s, quantus_s, combined_s, grad_cam_s = interleaved_median_seconds(
        [ours("road_morf"), run_quantus, ours("road"), run_grad_cam], device, options.repeats
    )
    cpu_s = time.process_time() - cpu_start
    # Agreement of the combined scores (noise differs in its draws: each draws its own noise).
    combined = ours("road")().cpu().numpy()
    theirs = grad_cam(images, maps.numpy(), targets, model)
    timings = (
        ("ours road_morf (MoRF only)", morf_s),
        ("Quantus ROAD (MoRF only)", quantus_s),
        ("ours road (MoRF + LeRF)", combined_s),
        ("pytorch-grad-cam ROADCombined (MoRF + LeRF)", grad_cam_s),
    )
    rows = [
        {"implementation": name, "images_per_s": options.images / seconds, "seconds": seconds}
        for name, seconds in timings
    ]
    result = {
        "benchmark": "road_throughput",
        "config": {**vars(options), "load_average_at_start": load_start},
        "environment": environment(device),
        "load_average_at_end": load_average(),
        "process_cpu_seconds_all_calls": cpu_s,
        "quantus": getattr(quantus, "__version__", None),
        "rows": rows,
        "speedup_road_morf_vs_quantus": quantus_s / morf_s,
        "speedup_road_vs_grad_cam": grad_cam_s / combined_s,
        "combined_max_abs_difference_vs_grad_cam_noise_0.01": float(
            np.abs(combined - theirs).max()
        ),
    }
    output = options.output or f"benchmarks/results/road_throughput_{device.type}.json"
    print_table(rows, list(rows[0]))
    for key in ("speedup_road_morf_vs_quantus", "speedup_road_vs_grad_cam"):
        print(f"{key}: {result[key]:.2f}")
    print(f"wrote {write_json(result, output)}")
    return result


if __name__ == "__main__":
    main()
