"""A fabricated ImageNet validation folder in the real on-disk format, for timing a study.

``<root>/LOC_synset_mapping.txt`` with 1000 wnids (the class order of a 1000-class head),
``<root>/val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG`` (class folders, as read by
:class:`datamodules.imagenet.ImageNetDataModule`; configs/data/imagenet.yaml) and ImageNet-S-919
object masks ``<root>/imagenet-s/ImageNetS919/validation-segmentation/<wnid>/<stem>.png`` (RGB
PNG, class id = R + 256·G, the 1-based rank of the wnid among the 919 S wnids, 0 background)
with ``ImageNetS_categories_im919.txt``; optionally ``train_images`` training images
``<root>/train/<wnid>/<wnid>_<n>.JPEG`` (classes in turn, no masks), the data of a study's
``confusion_matrix: holdout`` (CASE's matrix from data disjoint from the explained val split).
Image ``i`` (1-based) has class ``(i − 1) mod 919``
(every image has a mask) and is a pure function of ``(seed, i)``: a smooth random colour field
with noise and a brighter ellipse (the object, = the mask), JPEG quality 90, so decoding costs
what a photograph of that size costs (flat images decode faster). The default size, 500×375,
is the most common size in the ILSVRC2012 validation set; the datamodule resizes the shorter
side to 256 and crops 224 as for the real data.

    uv run python -m benchmarks.fabricated_imagenet /tmp/imagenet --images 2000
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

NUM_CLASSES = 1000
S_CLASSES = 919  # ImageNet-S-919: the split with masks for the most classes


def wnid(index: int) -> str:
    """A wnid-shaped identifier (``n`` + 8 digits) for class ``index``, sorted by index."""
    return f"n{index + 1:08d}"


def val_name(number: int) -> str:
    """ILSVRC2012 validation file stem of the 1-based image ``number``."""
    return f"ILSVRC2012_val_{number:08d}"


def _write_image(task: tuple[Path, Path | None, int, int, int, int, int]) -> None:
    path, mask_path, class_id, seed, number, width, height = task
    generator = np.random.default_rng([seed, number])
    coarse = generator.integers(0, 256, size=(height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    field = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(field, dtype=np.int16)
    pixels = pixels + generator.integers(-24, 25, size=pixels.shape, dtype=np.int16)
    rows, columns = np.ogrid[:height, :width]
    cy, cx = generator.uniform(0.3, 0.7) * height, generator.uniform(0.3, 0.7) * width
    ry, rx = generator.uniform(0.15, 0.3) * height, generator.uniform(0.15, 0.3) * width
    inside = ((rows - cy) / ry) ** 2 + ((columns - cx) / rx) ** 2 <= 1
    pixels[inside] += 60
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
    if mask_path is None:
        return
    ids = np.zeros((height, width, 3), np.uint8)
    ids[inside, 0], ids[inside, 1] = class_id % 256, class_id // 256
    Image.fromarray(ids).save(mask_path)


def fabricate_imagenet_val(
    root: str | Path,
    num_images: int,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
    workers: int | None = None,
    train_images: int = 0,
) -> Path:
    """Write ``num_images`` validation images with their ImageNet-S-919 masks and the class
    lists under ``root`` (layout in the module docstring); returns ``root``. A folder made
    with the same arguments is reused (``fabricated.txt`` records them)."""
    root = Path(root)
    stamp = f"images={num_images} train={train_images} size={size[0]}x{size[1]} seed={seed}\n"
    record = root / "fabricated.txt"
    if record.is_file() and record.read_text() == stamp:
        return root
    root.mkdir(parents=True, exist_ok=True)
    mapping = [f"{wnid(c)} fabricated class {c}" for c in range(NUM_CLASSES)]
    (root / "LOC_synset_mapping.txt").write_text("\n".join(mapping) + "\n")
    s_split = root / "imagenet-s" / f"ImageNetS{S_CLASSES}"
    s_split.mkdir(parents=True, exist_ok=True)
    categories = [wnid(c) for c in range(S_CLASSES)]
    (s_split / f"ImageNetS_categories_im{S_CLASSES}.txt").write_text("\n".join(categories) + "\n")
    tasks = []
    for number in range(1, num_images + 1):
        label = (number - 1) % S_CLASSES
        folder = root / "val" / wnid(label)
        mask_folder = s_split / "validation-segmentation" / wnid(label)
        folder.mkdir(parents=True, exist_ok=True)
        mask_folder.mkdir(parents=True, exist_ok=True)
        stem = val_name(number)
        tasks.append(
            (folder / f"{stem}.JPEG", mask_folder / f"{stem}.png", label + 1, seed, number, *size)
        )
    for number in range(1, train_images + 1):
        label = (number - 1) % S_CLASSES
        folder = root / "train" / wnid(label)
        folder.mkdir(parents=True, exist_ok=True)
        # seeds after the val images' so no training image repeats a val image
        tasks.append((folder / f"{wnid(label)}_{number}.JPEG", None, label + 1, seed,
                      num_images + number, *size))  # fmt: skip
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(tasks) > 64:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_image, tasks, chunksize=32))
    else:
        for task in tasks:
            _write_image(task)
    record.write_text(stamp)
    return root


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=0)
    args = parser.parse_args(argv)
    root = fabricate_imagenet_val(
        args.root, args.images, tuple(args.size), args.seed, train_images=args.train_images
    )
    print(f"wrote {args.images} images under {root / 'val'}")
    return root


if __name__ == "__main__":
    main()
