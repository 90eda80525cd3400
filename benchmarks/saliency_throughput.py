"""Saliency-method throughput, side by side with pytorch-grad-cam, in one run.

For every method: seconds per batch for maps of 1 class and of K classes per image, images/s,
and cost in forward-pass equivalents (time / time of one no-grad forward of the same batch).
Where pytorch-grad-cam has the same method, its time to produce the same K maps (one call per
class, as its API takes one target per image) is measured in the same process, on the same
model, inputs and layer. Checks against the methods issue's targets are reported, not asserted:

- maps for K classes cost ≤ 1.5× maps for one class (CAM family);
- ≥ 3× less time than pytorch-grad-cam for the same K maps;
- ``case`` with 3 contrast classes ≤ 1.5× ``grad_cam``.

    uv run python benchmarks/saliency_throughput.py                 # resnet50, 224², batch 8
    uv run python benchmarks/saliency_throughput.py --device cuda --methods grad_cam case

Suites of the perturbation and transformer methods (the first argument picks one; the rest
are that suite's options, ``--help`` lists them):

    uv run python benchmarks/saliency_throughput.py score_cam   # Score-CAM / Ablation-CAM vs pytorch-grad-cam
    uv run python benchmarks/saliency_throughput.py caap        # CAAP parallel vs per-patch loop (ViT-Ti 224²)
    uv run python benchmarks/saliency_throughput.py cluscam     # ClusCAM: clustering vs scoring time

Writes JSON (default ``benchmarks/results/saliency_throughput_<device>.json``) and prints a
table. Random-init weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import (
    environment,
    median_seconds,
    print_checks,
    print_table,
    random_batch,
    write_json,
)
from saliency.errors import ConfigurationError
from saliency.methods import create_method, list_methods
from saliency.targets import ConfusionContrast, LogitNeighbours

# pytorch-grad-cam classes producing the same maps as ours (by name).
GRAD_CAM_LIBRARY = {
    "grad_cam": "GradCAM",
    "grad_cam_pp": "GradCAMPlusPlus",
    "xgrad_cam": "XGradCAM",
    "layer_cam": "LayerCAM",
    "hires_cam": "HiResCAM",
    "eigen_cam": "EigenCAM",
}
CAM_FAMILY = {*GRAD_CAM_LIBRARY, "case", "finer_cam"}


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    return model.eval().to(device)


def method_kwargs(name: str, num_classes: int, contrasts: int, seed: int) -> dict[str, Any]:
    """Construction arguments a benchmark needs beyond the defaults (selectors)."""
    if name == "case":
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.rand(num_classes, num_classes, generator=generator)
        return {"contrast": ConfusionContrast(matrix, k=contrasts)}
    if name == "finer_cam":
        return {"references": LogitNeighbours(contrasts)}
    return {}


def library_seconds(name: str, model, layer_module, images, classes, device, repeats: int) -> float:
    """pytorch-grad-cam producing the maps of every column of ``classes``: one call per class."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(pytorch_grad_cam, GRAD_CAM_LIBRARY[name])(model, [layer_module])
    columns = classes.cpu().tolist()

    def run() -> None:
        for k in range(classes.shape[1]):
            cam(images, [ClassifierOutputTarget(row[k]) for row in columns])

    try:
        return median_seconds(run, device, repeats)
    finally:
        cam.activations_and_grads.release()


SUITES = {
    "score_cam": "benchmarks.score_cam_throughput",
    "caap": "benchmarks.caap_throughput",
    "cluscam": "benchmarks.cluscam_cost",
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUITES:
        return importlib.import_module(SUITES[argv[0]]).main(argv[1:])
    return gradient_cam_suite(argv)


def gradient_cam_suite(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name")
    parser.add_argument("--layer", default="layer4", help="dotted layer path (ours and theirs)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=5, help="K maps per image")
    parser.add_argument("--contrasts", type=int, default=3, help="case/finer_cam references")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered")
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out")
    parser.add_argument("--no-library", action="store_true", help="skip pytorch-grad-cam")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(args.model, device)
    images, classes, num_classes = random_batch(
        model, args.batch_size, args.image_size, args.classes, args.seed, device
    )
    layer_module = model.get_submodule(args.layer)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    forward_s = median_seconds(forward, device, args.repeats)
    names = args.methods or list_methods()
    rows: list[dict[str, Any]] = []
    for name in names:
        if name in args.skip:
            continue
        row: dict[str, Any] = {"method": name}
        try:
            method = create_method(
                name,
                model,
                layer=args.layer,
                **method_kwargs(name, num_classes, args.contrasts, args.seed),
            )
        except ConfigurationError as error:  # e.g. a method without a layer argument
            try:
                method = create_method(name, model)
            except ConfigurationError:
                row["skipped"] = str(error)
                rows.append(row)
                continue
        one = median_seconds(lambda m=method: m(images, classes[:, :1]), device, args.repeats)
        many = median_seconds(lambda m=method: m(images, classes), device, args.repeats)
        row.update(
            seconds_1_class=one,
            seconds_k_classes=many,
            images_per_s_k_classes=args.batch_size / many,
            forwards_1_class=one / forward_s,
            forwards_k_classes=many / forward_s,
            k_over_1=many / one,
        )
        if name in GRAD_CAM_LIBRARY and not args.no_library:
            theirs = library_seconds(
                name, model, layer_module, images, classes, device, args.repeats
            )
            row.update(library_seconds_k_classes=theirs, speedup_vs_library=theirs / many)
        rows.append(row)
        print(f"  {name}: {many:.3f} s for {args.classes} maps/image", file=sys.stderr)

    by_name = {row["method"]: row for row in rows if "skipped" not in row}
    checks = {}
    for name, row in by_name.items():
        if name in CAM_FAMILY:
            checks[f"{name}: K maps <= 1.5x one map"] = bool(row["k_over_1"] <= 1.5)
        if "speedup_vs_library" in row:
            checks[f"{name}: >= 3x faster than pytorch-grad-cam"] = bool(
                row["speedup_vs_library"] >= 3.0
            )
    if "case" in by_name and "grad_cam" in by_name:
        ratio = by_name["case"]["seconds_1_class"] / by_name["grad_cam"]["seconds_1_class"]
        checks[f"case ({args.contrasts} contrasts) <= 1.5x grad_cam"] = bool(ratio <= 1.5)
        by_name["case"]["over_grad_cam_1_class"] = ratio

    result = {
        "benchmark": "saliency_throughput",
        "config": vars(args) | {"num_classes": num_classes},
        "environment": environment(device),
        "forward_seconds": forward_s,
        "methods": rows,
        "checks": checks,
    }
    output = args.output or f"benchmarks/results/saliency_throughput_{device.type}.json"
    write_json(result, output)
    print(
        f"{args.model} {args.image_size}² batch {args.batch_size} on {device}: one forward "
        f"{forward_s:.3f} s; K = {args.classes}"
    )
    print_table(
        rows,
        [
            "method",
            "seconds_1_class",
            "seconds_k_classes",
            "images_per_s_k_classes",
            "forwards_k_classes",
            "k_over_1",
            "library_seconds_k_classes",
            "speedup_vs_library",
        ],
    )
    print_checks(checks, output)
    return result


if __name__ == "__main__":
    main()
