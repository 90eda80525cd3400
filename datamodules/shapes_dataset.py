"""Procedural fine-grained shapes: the embedded benchmark of DESIGN.md.

Class ``c`` is the pair (shape, mark position): ``shape = c // num_marks``, ``mark = c % num_marks``.
Sibling classes share the shape and differ only by where a small mark sits on the object, so the
evidence that *discriminates* a class from its sibling is known pixel-exactly (``part_mask``).

The default design makes the fine-grained axis the hard one: large objects of distinct shapes
(easy to tell apart) carry a faint mark (``mark_contrast`` 0.12: the mark's colour is 12 % of the
way from the object's colour to its complement), so a trained model's second guess is the sibling
(same shape, other mark), not another shape. ``label_mode="shape"`` labels the same images by
shape only (the coarse task; ``num_shapes`` classes), e.g. to pre-train an encoder that a linear
probe then reads for the fine classes (``configs/experiment/linear_probe_shapes.yaml``).

Sample ``i`` of a split is a pure function of ``(seed, split, i)``: every random draw comes from a
``torch.Generator`` seeded by a stable hash of that triple, so samples are identical across
processes, workers, ranks and machines, and nothing is stored on disk.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ellipse", "diamond")
"""Shapes in class order; the first ``num_shapes`` are used."""

MARK_POSITIONS: dict[str, tuple[float, float]] = {
    "top": (0.0, -0.45),
    "bottom": (0.0, 0.45),
    "left": (-0.45, 0.0),
    "right": (0.45, 0.0),
}
"""Mark centre in the object's own frame, as a fraction of the object radius (x right, y down)."""

SPLITS: tuple[str, ...] = ("train", "val", "test")

LABEL_MODES: tuple[str, ...] = ("fine", "shape")
"""``fine``: class = (shape, mark position); ``shape``: class = shape (the coarse task)."""


@dataclass(frozen=True)
class ShapesConfig:
    """Everything that defines the benchmark; two equal configs give identical samples."""

    image_size: int = 64
    num_shapes: int = 5
    num_marks: int = 2
    seed: int = 0
    clutter: int = 4
    noise_std: float = 0.04
    min_radius: float = 0.36
    max_radius: float = 0.48
    max_rotation_deg: float = 20.0
    mark_radius: float = 0.09
    mark_contrast: float = 0.12
    label_mode: str = "fine"

    def __post_init__(self) -> None:
        if not 1 <= self.num_shapes <= len(SHAPES):
            raise ValueError(
                f"num_shapes={self.num_shapes} is out of range: choose 1..{len(SHAPES)} "
                f"(available shapes: {', '.join(SHAPES)})"
            )
        if not 1 <= self.num_marks <= len(MARK_POSITIONS):
            raise ValueError(
                f"num_marks={self.num_marks} is out of range: choose 1..{len(MARK_POSITIONS)} "
                f"(mark positions: {', '.join(MARK_POSITIONS)})"
            )
        if not 0.0 < self.mark_contrast <= 1.0:
            raise ValueError(
                f"mark_contrast={self.mark_contrast} is out of range: choose a value in (0, 1] "
                f"(1: the mark has the complementary colour of the object)"
            )
        if self.label_mode not in LABEL_MODES:
            raise ValueError(
                f"unknown label_mode {self.label_mode!r}; expected one of {', '.join(LABEL_MODES)}"
            )
        if self.image_size < 16:
            raise ValueError(f"image_size={self.image_size} is too small: use at least 16 pixels")

    @property
    def num_fine_classes(self) -> int:
        """(shape, mark) pairs: what an image shows, whatever the label mode."""
        return self.num_shapes * self.num_marks

    @property
    def num_classes(self) -> int:
        return self.num_shapes if self.label_mode == "shape" else self.num_fine_classes

    @property
    def class_names(self) -> list[str]:
        if self.label_mode == "shape":
            return list(SHAPES[: self.num_shapes])
        marks = list(MARK_POSITIONS)[: self.num_marks]
        return [f"{shape}-{mark}" for shape in SHAPES[: self.num_shapes] for mark in marks]

    def siblings(self, label: int) -> list[int]:
        """Classes with the same shape as ``label`` and a different mark (none when labels are
        shapes)."""
        if self.label_mode == "shape":
            return []
        first = (label // self.num_marks) * self.num_marks
        return [c for c in range(first, first + self.num_marks) if c != label]


def sample_seed(seed: int, split: str, index: int) -> int:
    """Stable 63-bit seed for one sample (independent of Python's hash randomisation)."""
    digest = hashlib.blake2b(f"shapes/{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _shape_inside(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-test in the object frame where the object has unit radius."""
    if shape == "circle":
        return u.square() + v.square() <= 1.0
    if shape == "square":
        return (u.abs() <= 0.85) & (v.abs() <= 0.85)
    if shape == "triangle":  # apex up, base at v = 0.75
        return (v <= 0.75) & (v >= -1.0 + 2.0 * u.abs() * 1.75 / 1.732)
    if shape == "cross":
        return ((u.abs() <= 0.35) & (v.abs() <= 1.0)) | ((v.abs() <= 0.35) & (u.abs() <= 1.0))
    if shape == "ellipse":
        return (u / 1.0).square() + (v / 0.62).square() <= 1.0
    if shape == "diamond":
        return u.abs() + v.abs() <= 1.05
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


class ShapesDataset(Dataset):
    """One split of the benchmark. Items are dicts in the sample format of DESIGN.md.

    ``image`` is normalised with ``mean``/``std`` (pixel values in [0, 1] before normalisation);
    ``mask`` is the object, ``part_mask`` the discriminative mark, ``boxes`` the object's box as
    ``[1, 4]`` xyxy in pixel-edge coordinates (the box covers columns ``x1 .. x2 - 1``).
    """

    def __init__(
        self,
        split: str,
        size: int,
        config: ShapesConfig | None = None,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.25, 0.25, 0.25),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if size < 0:
            raise ValueError(f"split size must be non-negative, got {size}")
        self.split = split
        self.size = size
        self.config = config or ShapesConfig()
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        n = self.config.image_size
        # Pixel-centre coordinates in [-1, 1], shared by every sample.
        axis = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2.0 - 1.0
        self._ys, self._xs = torch.meshgrid(axis, axis, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def fine_class_of(self, index: int) -> int:
        """The (shape, mark) class sample ``index`` shows: cycling through the fine classes
        keeps every split balanced in both label modes."""
        return index % self.config.num_fine_classes

    def label_of(self, index: int) -> int:
        """The fine class, or its shape with ``label_mode="shape"``."""
        fine = self.fine_class_of(index)
        return fine // self.config.num_marks if self.config.label_mode == "shape" else fine

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.split} split of {self.size}")
        pixels, mask, part_mask = self.render(index)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        return {
            "image": (pixels - self.mean) / self.std,
            "label": torch.tensor(self.label_of(index)),
            "index": torch.tensor(index),
            "mask": mask,
            "part_mask": part_mask,
            "boxes": box,
        }

    def render(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pixels in [0, 1] ``[3, H, W]``, object mask and mark mask ``[H, W]`` for one sample."""
        cfg = self.config
        g = torch.Generator().manual_seed(sample_seed(cfg.seed, self.split, index))
        # All scalar draws at once (one RNG call instead of dozens keeps generation cheap).
        draws = iter(torch.rand(12 + 7 * cfg.clutter, generator=g).tolist())

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * next(draws)

        fine = self.fine_class_of(index)
        shape = SHAPES[fine // cfg.num_marks]
        mark_u, mark_v = list(MARK_POSITIONS.values())[fine % cfg.num_marks]
        xs, ys = self._xs, self._ys

        # Background: a random colour gradient, then clutter rectangles the object may occlude.
        top = torch.tensor([uniform(0.0, 0.6) for _ in range(3)]).view(3, 1, 1)
        bottom = torch.tensor([uniform(0.0, 0.6) for _ in range(3)]).view(3, 1, 1)
        pixels = torch.lerp(top, bottom, ((ys + 1.0) / 2.0).unsqueeze(0))
        for _ in range(cfg.clutter):
            cx, cy = uniform(-1.0, 1.0), uniform(-1.0, 1.0)
            hw, hh = uniform(0.04, 0.18), uniform(0.04, 0.18)
            rect = ((xs - cx).abs() <= hw) & ((ys - cy).abs() <= hh)
            rect_colour = torch.tensor([uniform(0.0, 1.0) for _ in range(3)]).view(3, 1, 1)
            pixels = torch.where(rect, rect_colour, pixels)

        # Object: random radius, rotation, position fully inside the image, saturated colour.
        radius = uniform(cfg.min_radius, cfg.max_radius)
        angle = math.radians(uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
        margin = 1.0 - radius * 1.45
        cx, cy = uniform(-margin, margin), uniform(-margin, margin)
        cos, sin = math.cos(angle), math.sin(angle)
        dx, dy = xs - cx, ys - cy
        u = (cos * dx + sin * dy) / radius
        v = (-sin * dx + cos * dy) / radius
        mask = _shape_inside(shape, u, v)
        colour = _saturated_colour(uniform(0.0, 1.0), uniform(0.7, 1.0))
        pixels = torch.where(mask, colour.view(3, 1, 1), pixels)

        # Mark: a disc at the class's position in the object frame, its colour mark_contrast of
        # the way from the object's colour to the complementary colour.
        mark_r = cfg.mark_radius / radius
        part_mask = ((u - mark_u).square() + (v - mark_v).square() <= mark_r**2) & mask
        mark_colour = torch.lerp(colour, 1.0 - colour, cfg.mark_contrast)
        pixels = torch.where(part_mask, mark_colour.view(3, 1, 1), pixels)

        noise = torch.randn(pixels.shape, generator=g) * cfg.noise_std
        return (pixels + noise).clamp_(0.0, 1.0), mask, part_mask


def _saturated_colour(hue: float, value: float) -> torch.Tensor:
    """RGB of a fully saturated colour with the given hue in [0, 1) and value."""
    h = hue * 6.0
    channel = [max(0.0, min(1.0, abs((h + shift) % 6.0 - 3.0) - 1.0)) for shift in (0.0, 4.0, 2.0)]
    return torch.tensor(channel) * value
