"""Saliency-method throughput, side by side with pytorch-grad-cam, in one run.

For every method: seconds per batch for maps of 1 class and of K classes per image, maps/s,
cost in forward-pass equivalents (time / time of one no-grad forward of the same batch), peak
CUDA memory of the timed calls and the host round trips of one call
(:mod:`benchmarks._host_syncs`).
Where pytorch-grad-cam has the same method, its time to produce the same K maps (one call per
class, as its API takes one target per image) is measured in the same process, on the same
model, inputs and layer; likewise torch-cam where it is installed (one forward, one
extractor call per class). Checks against the methods issue's targets are reported, not asserted:

- maps for K classes cost ≤ 1.5× maps for one class (CAM family);
- ≥ 3× less time than pytorch-grad-cam for the same K maps;
- ``case`` with 3 contrast classes ≤ 1.5× ``grad_cam``.

    uv run python benchmarks/saliency_throughput.py                 # resnet50, 224², batch 8
    uv run python benchmarks/saliency_throughput.py --device cuda --methods grad_cam case
    uv run python benchmarks/saliency_throughput.py --model timm:vit_base_patch16_224 \
        --layer blocks.11.norm1 --methods grad_cam attention_rollout
    uv run python benchmarks/saliency_throughput.py --device cpu --model resnet18 \
        --image-size 64 --batch-size 4 --no-library --methods occlusion gradient_shap \
        deeplift full_grad --output benchmarks/results/method_class_cost_cpu.json \
        --machine "shared 2-core development machine"

Methods that read the sample ``index`` (GradientSHAP's seeded draws) get ``0 … B−1``; methods
reading other batch fields (the reference maps' masks) are listed as skipped.

Suites of the perturbation and transformer methods (the first argument picks one; the rest
are that suite's options, ``--help`` lists them):

    uv run python benchmarks/saliency_throughput.py score_cam   # Score-CAM / Ablation-CAM vs pytorch-grad-cam
    uv run python benchmarks/saliency_throughput.py caap        # CAAP parallel vs per-patch loop (ViT-Ti 224²)
    uv run python benchmarks/saliency_throughput.py cluscam     # ClusCAM: clustering vs scoring time
    uv run python benchmarks/saliency_throughput.py vit_attention  # ViT attention attributions, K classes

Writes JSON (default ``benchmarks/results/saliency_throughput_<device>.json``) and prints a
table. Random-init weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._host_syncs import count_host_round_trips
from benchmarks._timing import (
    PeakMemory,
    environment,
    interleaved_median_seconds,
    load_average,
    median_seconds,
    print_checks,
    print_table,
    random_batch,
    write_json,
)
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method, list_methods
from contrastive_saliency.targets import ConfusionContrast, LogitNeighbours

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
# torch-cam classes producing the same maps as ours (by name).
TORCHCAM = {
    "grad_cam": "GradCAM",
    "grad_cam_pp": "GradCAMpp",
    "xgrad_cam": "XGradCAM",
    "layer_cam": "LayerCAM",
}


def build_model(name: str, device: torch.device, image_size: int | None = None) -> torch.nn.Module:
    """A random-init torchvision model (``resnet50``) or, with the ``timm:`` prefix, a timm
    one (``timm:vit_base_patch16_224``; ViTs built for ``image_size``)."""
    if name.startswith("timm:"):
        import timm

        name = name.removeprefix("timm:")
        try:  # ViTs take the input size (position embeddings); CNNs do not
            model = timm.create_model(name, pretrained=False, img_size=image_size)
        except TypeError:
            model = timm.create_model(name, pretrained=False)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
    return model.eval().to(device)


def library_reshape(model: torch.nn.Module):
    """pytorch-grad-cam's ``reshape_transform`` for a timm ViT token layer (drop the prefix
    tokens, lay the patch tokens on their grid, channels first); ``None`` for CNNs."""
    if not hasattr(model, "patch_embed"):
        return None
    prefix = getattr(model, "num_prefix_tokens", 1)
    height, width = model.patch_embed.grid_size

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[:, prefix:].reshape(tokens.shape[0], height, width, tokens.shape[-1])
        return grid.permute(0, 3, 1, 2)

    return reshape


def method_kwargs(name: str, num_classes: int, contrasts: int, seed: int) -> dict[str, Any]:
    """Construction arguments a benchmark needs beyond the defaults (selectors)."""
    if name == "case":
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.rand(num_classes, num_classes, generator=generator)
        return {"contrast": ConfusionContrast(matrix, k=contrasts)}
    if name == "finer_cam":
        return {"references": LogitNeighbours(contrasts)}
    return {}


def library_seconds(
    name: str, model, layer_module, images, classes, device, repeats: int, warmup: int = 1
) -> float:
    """pytorch-grad-cam producing the maps of every column of ``classes``: one call per class."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(pytorch_grad_cam, GRAD_CAM_LIBRARY[name])(
        model, [layer_module], reshape_transform=library_reshape(model)
    )
    columns = classes.cpu().tolist()

    def run() -> None:
        for k in range(classes.shape[1]):
            cam(images, [ClassifierOutputTarget(row[k]) for row in columns])

    try:
        return median_seconds(run, device, repeats, warmup)
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)  # its backward fills parameter gradients


def torchcam_seconds(
    name: str, model, layer: str, images, classes, device, repeats: int, warmup: int = 1
) -> float | None:
    """torch-cam producing the maps of every column of ``classes`` in its cheapest use of its
    API: one forward, then one extractor call per class (``retain_graph`` between them), raw
    maps (``normalized=False``) at the layer's resolution (ours are upsampled to the input).
    ``None`` when torch-cam is not installed."""
    try:
        from torchcam import methods
    except ImportError:
        return None
    extractor = getattr(methods, TORCHCAM[name])(
        model, layer, reshape_transform=library_reshape(model)
    )
    columns = classes.t().tolist()

    def run() -> None:
        scores = model(images)
        for k, column in enumerate(columns):
            extractor(
                class_idx=column, scores=scores, normalized=False, retain_graph=k < len(columns) - 1
            )

    try:
        return median_seconds(run, device, repeats, warmup)
    finally:
        extractor.remove_hooks()


SUITES = {
    "score_cam": "benchmarks.score_cam_throughput",
    "caap": "benchmarks.caap_throughput",
    "cluscam": "benchmarks.cluscam_cost",
    "vit_attention": "benchmarks.vit_attention_cost",
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUITES:
        return importlib.import_module(SUITES[argv[0]]).main(argv[1:])
    return gradient_cam_suite(argv)


def gradient_cam_suite(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="resnet50", help="torchvision model name, or timm:<name>"
    )
    parser.add_argument("--layer", default="layer4", help="dotted layer path (ours and theirs)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=5, help="K maps per image")
    parser.add_argument("--contrasts", type=int, default=3, help="case/finer_cam references")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each timing")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered")
    parser.add_argument(
        "--method-kwargs",
        type=json.loads,
        default={},
        help='JSON {method: {argument: value}} on top of the defaults, e.g. \'{"rise": '
        '{"n_masks": 500}}\' (recorded in the JSON)',
    )
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out")
    parser.add_argument(
        "--no-library", action="store_true", help="skip pytorch-grad-cam and torch-cam"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--machine", default=None, help="free text naming the machine, recorded in the JSON"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    load_before = load_average()
    torch.manual_seed(args.seed)
    model = build_model(args.model, device, args.image_size)
    images, classes, num_classes = random_batch(
        model, args.batch_size, args.image_size, args.classes, args.seed, device
    )
    layer_module = model.get_submodule(args.layer)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    forward_s = median_seconds(forward, device, max(args.repeats, 3))
    names = args.methods or list_methods()
    rows: list[dict[str, Any]] = []
    for name in names:
        if name in args.skip:
            continue
        row: dict[str, Any] = {"method": name}
        kwargs = method_kwargs(name, num_classes, args.contrasts, args.seed)
        kwargs |= args.method_kwargs.get(name, {})
        try:
            method = create_method(name, model, layer=args.layer, **kwargs)
        except ConfigurationError as error:  # e.g. a method without a layer argument
            try:
                method = create_method(name, model, **kwargs)
            except ConfigurationError:
                row["skipped"] = str(error)
                rows.append(row)
                continue
        declared = tuple(getattr(method, "batch_fields", ()))
        if set(declared) - {"index"}:
            row["skipped"] = f"reads the batch fields {declared}; only index is fabricated here"
            rows.append(row)
            continue
        fields = {"index": torch.arange(args.batch_size, device=device)} if declared else {}

        def one_class(m=method, f=fields) -> torch.Tensor:
            return m(images, classes[:, :1], **f)

        def k_classes(m=method, f=fields) -> torch.Tensor:
            return m(images, classes, **f)

        # in turn, so load changes on a shared machine hit both timings of the k_over_1 ratio
        one, many = interleaved_median_seconds(
            [one_class, k_classes], device, args.repeats, args.warmup
        )
        with PeakMemory(device) as memory_1:  # CUDA only: None elsewhere
            if device.type == "cuda":
                one_class()
        with PeakMemory(device) as memory_k:
            if device.type == "cuda":
                k_classes()
        round_trips = count_host_round_trips(
            lambda m=method, f=fields: m(images, classes, **f), device
        )
        row.update(
            seconds_1_class=one,
            seconds_k_classes=many,
            maps_per_s_1_class=args.batch_size / one,
            maps_per_s_k_classes=args.batch_size * args.classes / many,
            images_per_s_k_classes=args.batch_size / many,
            forwards_1_class=one / forward_s,
            forwards_k_classes=many / forward_s,
            k_over_1=many / one,
            peak_memory_mib_1_class=memory_1.peak_mib,
            peak_memory_mib_k_classes=memory_k.peak_mib,
            extra_memory_mib_k_classes=memory_k.extra_mib,
            host_requests_per_call=round_trips["requests"],
            cuda_syncs_per_call=round_trips["cuda_syncs"],
        )
        if name in GRAD_CAM_LIBRARY and not args.no_library:
            theirs = library_seconds(
                name, model, layer_module, images, classes, device, args.repeats, args.warmup
            )
            row.update(
                library_seconds_k_classes=theirs,
                library_maps_per_s_k_classes=args.batch_size * args.classes / theirs,
                speedup_vs_library=theirs / many,
            )
        if name in TORCHCAM and not args.no_library:
            torchcam = torchcam_seconds(
                name, model, args.layer, images, classes, device, args.repeats, args.warmup
            )
            if torchcam is not None:
                row.update(
                    torchcam_seconds_k_classes=torchcam,
                    torchcam_maps_per_s_k_classes=args.batch_size * args.classes / torchcam,
                    speedup_vs_torchcam=torchcam / many,
                )
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
        "load_average_1min": {"before": load_before, "after": load_average()},
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
            "maps_per_s_k_classes",
            "forwards_k_classes",
            "k_over_1",
            "library_seconds_k_classes",
            "speedup_vs_library",
            "torchcam_seconds_k_classes",
            "peak_memory_mib_k_classes",
            "host_requests_per_call",
        ],
    )
    print_checks(checks, output)
    return result


if __name__ == "__main__":
    main()
