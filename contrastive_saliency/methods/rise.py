"""RISE: saliency as the mask-weighted average of the model's score on randomly masked inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from contrastive_saliency.checks import check_batch_size, check_positive_int
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import _check_classes
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.registry import register_method

Score = Literal["probability", "logit"]


@dataclass(frozen=True)
class RiseMasks:
    """``N`` RISE masks ``[N, H, W]`` stored factorised (memory ``N·s·(s + H + W)``, not
    ``N·H·W``: 803 MB at the paper's N = 4000, 224²).

    ``M_i = rows_i · grid_i · cols_iᵀ``: ``grid`` ``[N, s, s]`` is the binary grid, and
    ``rows`` ``[N, H, s]`` / ``cols`` ``[N, W, s]`` are the rows of the 1-D bilinear upsampling
    matrices (``s → (s+1)·cell``) that survive the crop at offset ``shifts[i]`` (row, col).
    """

    grid: torch.Tensor
    shifts: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    def __len__(self) -> int:
        return self.grid.shape[0]

    def materialise(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Masks ``start:stop`` as a dense float32 ``[n, H, W]`` tensor."""
        rows, grid, cols = self.rows[start:stop], self.grid[start:stop], self.cols[start:stop]
        return rows @ grid @ cols.transpose(1, 2)


def upsampling_matrix(source: int, target: int) -> torch.Tensor:
    """``[target, source]`` float64 matrix of 1-D linear interpolation from ``source`` to
    ``target`` samples with half-pixel centres, ``u_i = (i + ½)·source/target − ½``, and mirror
    reflection about the edge samples where ``u_i`` falls outside ``[0, source − 1]``.

    This is ``skimage.transform.resize(order=1, mode="reflect", anti_aliasing=False)``, the
    upsampling of the RISE reference code (``F.interpolate`` would clamp at the edges instead).
    """
    if source == 1:
        return torch.ones(target, 1, dtype=torch.float64)
    position = (torch.arange(target, dtype=torch.float64) + 0.5) * (source / target) - 0.5
    position = position.abs()  # mirror at the first sample
    position = torch.where(position > source - 1, 2 * (source - 1) - position, position)
    low = position.floor().long().clamp(max=source - 2)
    fraction = position - low
    matrix = torch.zeros(target, source, dtype=torch.float64)
    index = torch.arange(target)
    matrix[index, low] = 1 - fraction
    matrix[index, low + 1] = fraction
    return matrix


def generate_masks(
    n_masks: int,
    grid_size: int,
    keep_probability: float,
    size: tuple[int, int],
    seed: int,
    device: torch.device | str = "cpu",
) -> RiseMasks:
    """The RISE masks for ``H × W`` images (Petsiuk et al., BMVC 2018, Sec. 3, mask generation):

    1. ``N`` binary grids ``s × s``, each cell 1 with probability ``p1``;
    2. bilinear upsampling of each to ``(s+1)·C_H × (s+1)·C_W`` with cell size
       ``C = ⌈H/s⌉ × ⌈W/s⌉`` (the reference code's ceil: every shift stays inside the
       upsampled mask; it is H/s when s divides H);
    3. an ``H × W`` crop at a uniformly random offset in ``[0, C_H) × [0, C_W)``.

    Random numbers come from a CPU ``torch.Generator`` seeded with ``seed`` (the grids, then the
    row offsets, then the column offsets), so the masks do not depend on ``device``.
    """
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    grid = (torch.rand(n_masks, grid_size, grid_size, generator=generator) < keep_probability).to(
        torch.float64
    )
    cell_height, cell_width = math.ceil(height / grid_size), math.ceil(width / grid_size)
    row_shift = torch.randint(0, cell_height, (n_masks,), generator=generator)
    col_shift = torch.randint(0, cell_width, (n_masks,), generator=generator)
    row_matrix = upsampling_matrix(grid_size, (grid_size + 1) * cell_height)
    col_matrix = upsampling_matrix(grid_size, (grid_size + 1) * cell_width)
    rows = row_matrix[row_shift[:, None] + torch.arange(height)]  # [N, H, s]
    cols = col_matrix[col_shift[:, None] + torch.arange(width)]  # [N, W, s]
    return RiseMasks(
        grid=grid.float().to(device),
        shifts=torch.stack([row_shift, col_shift], dim=1).to(device),
        rows=rows.float().to(device),
        cols=cols.float().to(device),
    )


@register_method("rise")
class RISE(SaliencyMethod):
    """RISE (Petsiuk et al., BMVC 2018, Sec. 3, Eqs. 4–6): the Monte-Carlo estimate

    ``S_c(λ) = 1/(N·p1) · Σ_i f_c(x ⊙ M_i) · M_i(λ)``   (Eq. 6; ``E[M(λ)] = p1``)

    with ``f_c`` the softmax probability of class c (``score="probability"``, the reference
    code's ``Softmax`` head) or its logit (``score="logit"``). Masks: :func:`generate_masks`.
    Defaults are the paper's ResNet-50 settings: ``n_masks`` N = 4000, ``grid_size`` s = 7,
    ``keep_probability`` p1 = 0.5.

    The masks are generated once per (image size, device) from ``seed`` and reused for every
    batch, so an image's map does not depend on the batch it is in. The ``N·B`` masked images
    of a batch go through the model ``batch_size`` at a time (mask-major: all images of mask i,
    then of mask i+1, ...), in eval mode under ``torch.no_grad`` (mode restored after); all K
    requested classes are read from the same forwards. ``layer`` is accepted for the
    registry's common signature and ignored (RISE works on the input).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        n_masks: int = 4000,
        grid_size: int = 7,
        keep_probability: float = 0.5,
        seed: int = 0,
        batch_size: int = 100,
        score: Score = "probability",
    ) -> None:
        super().__init__(model)
        check_positive_int(n_masks, "rise n_masks")
        check_positive_int(grid_size, "rise grid_size")
        check_batch_size(batch_size, "rise", "masked images per forward pass")
        if not isinstance(keep_probability, (int, float)) or not 0 < keep_probability <= 1:
            raise ConfigurationError(
                f"rise keep_probability p1 must lie in (0, 1] (the paper uses 0.5), got "
                f"{keep_probability!r}"
            )
        if score not in get_args(Score):
            raise ConfigurationError(
                f"rise score must be one of {', '.join(get_args(Score))}, got {score!r}"
            )
        self.n_masks, self.grid_size, self.keep_probability = n_masks, grid_size, keep_probability
        self.seed, self.batch_size, self.score = seed, batch_size, score
        self._masks: dict[tuple[int, int, torch.device], RiseMasks] = {}

    def masks(self, height: int, width: int, device: torch.device | str = "cpu") -> RiseMasks:
        """The masks used for ``height × width`` images on ``device`` (generated on first use)."""
        key = (height, width, torch.device(device))
        if key not in self._masks:
            self._masks[key] = generate_masks(
                self.n_masks,
                self.grid_size,
                self.keep_probability,
                (height, width),
                self.seed,
                device,
            )
        return self._masks[key]

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        num_classes = classes.shape[1]
        classes = classes.to(images.device)
        masks = self.masks(height, width, images.device)
        total = len(masks) * batch
        saliency = torch.zeros(
            (batch, num_classes, height * width), dtype=torch.float32, device=images.device
        )
        class_index = torch.arange(num_classes, device=images.device)
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                for start in range(0, total, self.batch_size):
                    stop = min(start + self.batch_size, total)
                    pair = torch.arange(start, stop, device=images.device)
                    first_mask = start // batch
                    chunk = masks.materialise(first_mask, (stop - 1) // batch + 1)  # [m, H, W]
                    mask_index, image_index = pair // batch - first_mask, pair % batch
                    masked = images[image_index] * chunk[mask_index, None].to(images.dtype)
                    outputs = self.model(masked)
                    if start == 0:
                        _check_outputs(outputs, classes)
                    scores = self._scores(outputs, classes[image_index])  # [n, K]
                    # weights[b, k, m] = f_{c_bk}(x_b ⊙ M_m): each (image, mask) pair once
                    weights = scores.new_zeros((batch, num_classes, chunk.shape[0]))
                    weights[image_index[:, None], class_index, mask_index[:, None]] = scores
                    saliency += weights @ chunk.flatten(1)
        finally:
            self.model.train(was_training)
        saliency /= len(masks) * self.keep_probability
        return saliency.view(batch, num_classes, height, width)

    def _scores(self, outputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``f_c`` of each row's classes, float32 ``[n, K]``."""
        outputs = outputs.float()
        if self.score == "probability":
            outputs = outputs.softmax(dim=1)
        return outputs.gather(1, classes)

    def __repr__(self) -> str:
        return (
            f"RISE(n_masks={self.n_masks}, grid_size={self.grid_size}, "
            f"keep_probability={self.keep_probability}, seed={self.seed}, "
            f"batch_size={self.batch_size}, score={self.score!r})"
        )


def _check_outputs(outputs: object, classes: torch.Tensor) -> None:
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
        raise ConfigurationError(
            f"rise needs a model returning logits [B, num_classes]; it returned "
            f"{getattr(outputs, 'shape', type(outputs).__name__)}"
        )
    _check_classes(classes, outputs.shape[1])
