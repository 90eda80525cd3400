"""A user's own dataset, fabricated: class folders of JPEGs that a small network can learn.

Class ``c`` of ``n`` draws a bright square in cell ``c`` of a row of ``n`` cells on a noisy
background, so the classes differ in where the evidence lies (and a 2-epoch run learns
them); every image is a real JPEG file as a camera or a download would give.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: dict[str, int] | None = None,
    size: int = 48,
    seed: int = 0,
) -> Path:
    """``<root>/<split>/<class>/<i>.jpg`` for the splits in ``per_class`` (default: train 12,
    val 4, test 4 images per class)."""
    per_class = per_class or {"train": 12, "val": 4, "test": 4}
    generator = np.random.default_rng(seed)
    cell = size // len(classes)
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = generator.integers(0, 90, (size, size, 3), dtype=np.uint8)
                top = int(generator.integers(0, size - cell + 1))
                pixels[top : top + cell, label * cell : (label + 1) * cell] = (230, 220, 60)
                Image.fromarray(pixels).save(folder / f"{index:03d}.jpg", quality=95)
    return root
