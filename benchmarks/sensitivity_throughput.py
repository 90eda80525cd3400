"""Images/s of ``max_sensitivity`` / ``avg_sensitivity`` against Quantus' own ``MaxSensitivity``
/ ``AvgSensitivity`` on the same model, explanation method and inputs, side by side in one run
(calls interleaved, so a change of load on a shared machine hits both alike; the ratio is the
figure to read).

Both re-explain ``nr_samples`` noisy copies of every image with the same method (our
registered method, e.g. Grad-CAM at the model's default layer): Quantus through its
``explain_func`` (one call per draw on its batch, NumPy in and out, its own ``np.random``
noise), ours through :func:`contrastive_saliency.metrics.functional.sensitivity_samples` (all
``images · nr_samples`` perturbed images in calls of ``--forward-batch`` on ``--device``, noise
keyed by the sample index). Both metrics read the same draws, so the row ``max+avg`` times one
pass that gives both (ours shares it through the evaluation's cache; Quantus runs twice). The
draws differ (each side its own noise), so the mean values agree statistically, not exactly:
tests/test_sensitivity_metrics.py checks exact parity on identical draws.

    uv run python benchmarks/sensitivity_throughput.py          # small_cnn 64², grad_cam, 16 images
    uv run python benchmarks/sensitivity_throughput.py --model torchvision:resnet18 --size 224 \\
        --images 4 --nr-samples 8

Writes JSON (default ``benchmarks/results/sensitivity_throughput_<device>.json``).
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
from contrastive_saliency.methods import create_method
from contrastive_saliency.metrics.functional import sensitivity_samples
from lightning_modules.backbones import build_backbone


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--method", default="grad_cam")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--nr-samples", type=int, default=20)
    parser.add_argument("--radius", type=float, default=0.2)
    parser.add_argument("--forward-batch", type=int, default=256, help="ours: images per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    options = parser.parse_args(argv)
    import quantus

    device = torch.device(options.device)
    torch.manual_seed(0)
    model = build_backbone(options.model, options.classes).to(device).eval()
    method = create_method(options.method, model)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(options.images, 3, options.size, options.size, generator=generator)
    images = images.to(device)
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    maps = method(images, targets[:, None]).detach()
    indices = torch.arange(options.images, device=device)

    def explain(perturbed, chosen, rows):
        return method(perturbed, chosen)

    def quantus_explain(model, inputs, targets, **kwargs):
        x = torch.as_tensor(inputs, device=device)
        chosen = torch.as_tensor(targets, device=device)[:, None]
        return method(x, chosen)[:, 0].detach().cpu().numpy()

    x_batch, y_batch = images.cpu().numpy(), targets.cpu().numpy()
    a_batch = maps.cpu().numpy()
    metrics = {
        name: getattr(quantus, name)(
            nr_samples=options.nr_samples, lower_bound=options.radius, disable_warnings=True
        )
        for name in ("MaxSensitivity", "AvgSensitivity")
    }

    def run_theirs(names):
        scores = []
        for name in names:
            values = metrics[name](
                model=model, x_batch=x_batch, y_batch=y_batch, a_batch=a_batch,
                explain_func=quantus_explain, device=str(device), batch_size=options.images,
            )  # fmt: skip
            scores.append(np.asarray(values, np.float64))
        return scores

    def run_ours():
        samples = sensitivity_samples(
            explain, images, maps, targets[:, None], indices, nr_samples=options.nr_samples,
            radius=options.radius, batch_size=options.forward_batch,
        )  # fmt: skip
        return [samples.amax(dim=1).cpu().numpy(), samples.mean(dim=1).cpu().numpy()]

    load_start = load_average()
    rows = []
    for label, names in (
        ("max_sensitivity", ["MaxSensitivity"]),
        ("avg_sensitivity", ["AvgSensitivity"]),
        ("max+avg", ["MaxSensitivity", "AvgSensitivity"]),
    ):
        ours_s, theirs_s = interleaved_median_seconds(
            [run_ours, lambda names=names: run_theirs(names)], device, options.repeats
        )
        ours_values, theirs_values = run_ours(), run_theirs(names)
        column = 0 if label != "avg_sensitivity" else 1
        rows.append({
            "metric": label,
            "ours_images_per_s": options.images / ours_s,
            "quantus_images_per_s": options.images / theirs_s,
            "speedup": theirs_s / ours_s,
            "ours_mean": float(np.nanmean(ours_values[column])),
            "quantus_mean": float(np.nanmean(theirs_values[0])),
        })  # fmt: skip
    result = {
        "benchmark": "sensitivity_throughput",
        "config": {**vars(options), "load_average_at_start": load_start},
        "environment": environment(device),
        "load_average_at_end": load_average(),
        "quantus": getattr(quantus, "__version__", None),
        "rows": rows,
    }
    output = options.output or f"benchmarks/results/sensitivity_throughput_{device.type}.json"
    print_table(rows, list(rows[0]))
    print(f"wrote {write_json(result, output)}")
    return result


if __name__ == "__main__":
    main()
