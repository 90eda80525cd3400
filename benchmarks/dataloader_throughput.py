"""DataLoader throughput of the file-based datamodules: JPEG decode + resize 256 + centre crop
224 + normalise + collate, in images per second, through :class:`ImageFolderDataModule`.

    uv run python benchmarks/dataloader_throughput.py                      # 200 fabricated JPEGs
    uv run python benchmarks/dataloader_throughput.py --num-workers 8 --root data/imagenet-subset

Without ``--root`` it writes ``--images`` random 256×256 JPEGs (quality 90, four classes) into
a temporary ImageFolder (``train/<class>/*.jpg``). It times one pass that includes starting the
workers and then ``--passes`` passes with the (persistent) workers running, and reports the
median of the latter. Writes JSON (default
``benchmarks/results/dataloader_throughput_w<workers>.json``) and prints one line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import environment, write_json
from datamodules.image_folder import ImageFolderDataModule
from datamodules.transforms import TransformConfig


def fabricate(root: Path, images: int, size: int, classes: int = 4, seed: int = 0) -> Path:
    """``images`` JPEGs of ``size²``: smooth random colour fields plus noise, so the files
    compress like photographs rather than flat colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(images):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
        noise = rng.integers(-20, 21, field.shape)
        pixels = np.clip(field.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        path = root / "train" / f"class_{k % classes}" / f"{k:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    return root


def one_pass(loader) -> tuple[float, int]:
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += batch["image"].shape[0]
    return time.perf_counter() - start, count


def measure(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    dm = ImageFolderDataModule(
        root=str(root),
        val_dir=None,
        test_dir=None,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        transform=TransformConfig(
            image_size=args.image_size, resize_size=args.resize_size, train_augment=args.augment
        ),
    )
    loader = dm.train_dataloader()
    first_s, count = one_pass(loader)
    times = [one_pass(loader)[0] for _ in range(args.passes)]
    steady_s = statistics.median(times)
    return {
        "images": count,
        "first_pass_s": first_s,
        "first_pass_images_per_s": count / first_s,
        "pass_s": times,
        "images_per_s": count / steady_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="an ImageFolder root with train/<class>/")
    parser.add_argument("--images", type=int, default=200, help="fabricated images")
    parser.add_argument("--source-size", type=int, default=256, help="fabricated image side")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3, help="timed passes after the first")
    parser.add_argument("--augment", action="store_true", help="random resized crop + flip")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    torch.set_num_threads(1)  # the workers do the work; keep the main process out of the way
    with tempfile.TemporaryDirectory() as scratch:
        if args.root is None:
            root = fabricate(Path(scratch), args.images, args.source_size)
            source = f"{args.images} fabricated {args.source_size}² JPEGs"
        else:
            root = Path(args.root)
            source = str(root)
        result = measure(root, args)

    output = args.output or (
        Path(__file__).parent / "results" / f"dataloader_throughput_w{args.num_workers}.json"
    )
    write_json(
        {
            "environment": {**environment(torch.device("cpu")), "cpu_count": os.cpu_count()},
            "settings": {**vars(args), "source": source},
            "result": result,
        },
        output,
    )
    print(
        f"{source} → {args.image_size}² (resize {args.resize_size}), batch {args.batch_size}, "
        f"{args.num_workers} workers: {result['images_per_s']:.0f} images/s "
        f"(first pass incl. worker start {result['first_pass_images_per_s']:.0f}/s); wrote {output}"
    )


if __name__ == "__main__":
    main()
