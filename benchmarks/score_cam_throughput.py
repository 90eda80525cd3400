"""Perturbation-CAM throughput: our ``score_cam`` / ``ablation_cam`` vs pytorch-grad-cam.

For each implementation: seconds per batch for maps of 1 class and of K classes per image,
images/s, and cost in forward-pass equivalents (time / one no-grad forward of the same
batch). Both sides use the same model, inputs, layer and forward batch size (perturbed
copies per forward pass). pytorch-grad-cam takes one target per image and call, so its K maps
are K calls, timed together; the first call's time is its 1-class time. Ours scores all K
classes from the same perturbed forwards. Ablation-CAM is measured with ``share_prefix=True``
(layers before the explained one run once per forward) and ``False`` (full forwards, as
pytorch-grad-cam). Checks (reported, not asserted):

- ours: K maps cost <= 1.2x one map;
- ours: K maps >= 3x faster than pytorch-grad-cam's K maps.

    uv run python benchmarks/score_cam_throughput.py          # resnet18, 160², batch 2, K=5
    uv run python benchmarks/score_cam_throughput.py --image-size 224 --batch-size 4

Writes JSON (default ``benchmarks/results/score_cam_throughput_<device>.json``) and prints a
table. Random-init weights: speed does not depend on them. The 1-minute load average before
and after the run is recorded: on a shared machine other processes slow every number. Each configuration runs
``--repeats`` times after one warm-up forward of the model (a single call takes tens of
seconds on CPU, so per-call warm-up would double the run time for no information).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's per-image progress bars

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contrastive_saliency.methods.score_cams  # noqa: F401  (registers score_cam, ablation_cam)
from benchmarks._timing import (
    PeakMemory,
    environment,
    median_seconds,
    print_checks,
    print_table,
    random_batch,
    synchronise,
    write_json,
)
from contrastive_saliency.methods import create_method


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    return model.eval().to(device)


def library_cam(name: str, model: torch.nn.Module, layer: torch.nn.Module, forward_batch: int):
    """pytorch-grad-cam's ScoreCAM / AblationCAM with ``forward_batch`` copies per forward."""
    from pytorch_grad_cam import AblationCAM, ScoreCAM

    if name == "score_cam":
        cam = ScoreCAM(model, [layer])
        cam.batch_size = forward_batch  # read by ScoreCAM.get_cam_weights (default 16)
        return cam
    return AblationCAM(model, [layer], batch_size=forward_batch)


def library_seconds(
    cam, images: torch.Tensor, classes: torch.Tensor, device: torch.device, repeats: int
) -> tuple[float, float]:
    """(1-class, K-class) seconds of pytorch-grad-cam: K calls, one per class column; the
    first call's time is the 1-class time. Medians over ``repeats``."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    columns = classes.cpu().tolist()
    first, total = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for k in range(classes.shape[1]):
            cam(images, [ClassifierOutputTarget(row[k]) for row in columns])
            synchronise(device)
            if k == 0:
                first.append(time.perf_counter() - start)
        total.append(time.perf_counter() - start)
    return sorted(first)[len(first) // 2], sorted(total)[len(total) // 2]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="torchvision model name")
    parser.add_argument("--layer", default="layer4", help="dotted layer path (ours and theirs)")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=2, help="images per call")
    parser.add_argument("--forward-batch", type=int, default=32, help="copies per forward")
    parser.add_argument("--classes", type=int, default=5, help="K maps per image")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--methods", nargs="*", default=["score_cam", "ablation_cam"], help="which to measure"
    )
    parser.add_argument("--no-library", action="store_true", help="skip pytorch-grad-cam")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    load_before = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    model = build_model(args.model, device)
    images, classes, num_classes = random_batch(
        model, args.batch_size, args.image_size, args.classes, args.seed, device
    )
    layer_module = model.get_submodule(args.layer)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    forward_s = median_seconds(forward, device, repeats=3)
    variants: list[tuple[str, str, dict[str, Any]]] = []
    for name in args.methods:
        variants.append((name, "ours", {}))
        if name == "ablation_cam":
            variants.append((name, "ours share_prefix=False", {"share_prefix": False}))
    rows: list[dict[str, Any]] = []
    for name, implementation, kwargs in variants:
        method = create_method(
            name, model, layer=args.layer, batch_size=args.forward_batch, **kwargs
        )

        def timed(k: int, m: Callable = method) -> float:
            return median_seconds(lambda: m(images, classes[:, :k]), device, args.repeats, 0)

        with PeakMemory(device) as memory:
            one, many = timed(1), timed(args.classes)
        rows.append(_row(name, implementation, one, many, args.batch_size, forward_s))
        rows[-1]["peak_memory_mib"] = memory.peak_mib
        print(f"  {name} ({implementation}) done", file=sys.stderr)
        if implementation == "ours" and not args.no_library:
            cam = library_cam(name, model, layer_module, args.forward_batch)
            try:
                with PeakMemory(device) as memory:
                    one, many = library_seconds(cam, images, classes, device, args.repeats)
            finally:
                cam.activations_and_grads.release()
            model.zero_grad(set_to_none=True)
            rows.append(_row(name, "pytorch-grad-cam", one, many, args.batch_size, forward_s))
            rows[-1]["peak_memory_mib"] = memory.peak_mib
            print(f"  {name} (pytorch-grad-cam) done", file=sys.stderr)

    checks: dict[str, bool] = {}
    for name in args.methods:
        ours = next(r for r in rows if r["method"] == name and r["implementation"] == "ours")
        checks[f"{name}: K maps <= 1.2x one map"] = bool(ours["k_over_1"] <= 1.2)
        theirs = [
            r for r in rows if r["method"] == name and r["implementation"] == "pytorch-grad-cam"
        ]
        if theirs:
            speedup = theirs[0]["seconds_k_classes"] / ours["seconds_k_classes"]
            ours["speedup_vs_library_k_classes"] = speedup
            ours["speedup_vs_library_1_class"] = (
                theirs[0]["seconds_1_class"] / ours["seconds_1_class"]
            )
            checks[f"{name}: K maps >= 3x faster than pytorch-grad-cam"] = bool(speedup >= 3.0)

    result = {
        "benchmark": "score_cam_throughput",
        "config": vars(args) | {"num_classes": num_classes},
        "environment": environment(device),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "forward_seconds": forward_s,
        "rows": rows,
        "checks": checks,
    }
    output = args.output or f"benchmarks/results/score_cam_throughput_{device.type}.json"
    write_json(result, output)
    print(
        f"{args.model} {args.layer} {args.image_size}² batch {args.batch_size} on {device}, "
        f"{args.forward_batch} copies per forward: one forward {forward_s:.3f} s; "
        f"K = {args.classes}"
    )
    print_table(
        rows,
        [
            "method",
            "implementation",
            "seconds_1_class",
            "seconds_k_classes",
            "images_per_s_1_class",
            "images_per_s_k_classes",
            "forwards_k_classes",
            "k_over_1",
            "speedup_vs_library_k_classes",
        ],
    )
    print_checks(checks, output)
    return result


def _row(
    name: str, implementation: str, one: float, many: float, batch: int, forward_s: float
) -> dict[str, Any]:
    return {
        "method": name,
        "implementation": implementation,
        "seconds_1_class": one,
        "seconds_k_classes": many,
        "images_per_s_1_class": batch / one,
        "images_per_s_k_classes": batch / many,
        "forwards_1_class": one / forward_s,
        "forwards_k_classes": many / forward_s,
        "k_over_1": many / one,
    }


if __name__ == "__main__":
    main()
