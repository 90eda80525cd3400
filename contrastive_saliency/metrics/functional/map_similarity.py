"""Similarity of two saliency maps: the measures of the randomisation sanity check.

Adebayo et al. (2018, "Sanity checks for saliency maps", Sec. 3–4) compare the map of the
trained model with the map of a (cascadingly) randomised model by

- the Spearman rank correlation of the two maps, with and without taking the absolute value
  of the maps first;
- the structural similarity index (SSIM, Wang et al. 2004) of the maps rescaled to [0, 1];
- the Spearman rank correlation of the histogram-of-oriented-gradients (HOG, Dalal & Triggs
  2005) descriptors of the two maps.

VAR (`papers/var.md`, Sec. 4.3, Fig. 6) follows the same procedure and reports the Spearman
correlation, and in its App. Figs. 8–14 also the cosine similarity and the Pearson correlation
of the maps (:func:`cosine_similarity_maps`, :func:`pearson_similarity`). The reference implementations are ``scipy.stats.spearmanr``,
``skimage.metrics.structural_similarity`` and ``skimage.feature.hog``; every function here
reproduces them exactly (tests compare them numerically), but batched and in torch: maps are
``[B, H, W]`` and every function returns one value per sample, ``[B]``.

Degenerate cases are defined, never NaN: the correlation of a map without variance (a constant
map, or a HOG descriptor of a constant map, which is all zeros) is ``constant_value``, 0 by
default ("no evidence of similarity"); min-max normalisation maps a constant map to all zeros.

Internally everything is computed in float64 (float32 on MPS, which has no float64); the result
has the floating dtype of the inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from contrastive_saliency.metrics.functional.localisation import min_max_normalise

_BLOCK_NORMS = ("L1", "L1-sqrt", "L2", "L2-Hys")


def _check_pair(maps_a: torch.Tensor, maps_b: torch.Tensor) -> None:
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"map shapes differ: {tuple(maps_a.shape)} vs {tuple(maps_b.shape)}")
    if maps_a.dim() != 3:
        raise ValueError(
            f"maps must be [B, H, W], got shape {tuple(maps_a.shape)}; squeeze the channel "
            "dimension of [B, 1, H, W] maps first"
        )
    if torch.isnan(maps_a).any() or torch.isnan(maps_b).any():
        raise ValueError("maps contain NaN; similarity of NaN maps is undefined")


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1…N of each row of ``[B, N]`` values, ties sharing their average rank.

    Equal to ``scipy.stats.rankdata(row, method="average")`` for every row. Batched: one sort
    per row; the first and last sorted position of every tie group are found with running
    max / min scans, and a group of sorted positions ``s…e`` (0-based) gets rank
    ``(s + e) / 2 + 1``.
    """
    if values.dim() != 2:
        raise ValueError(f"values must be [B, N], got shape {tuple(values.shape)}")
    num = values.shape[1]
    ranks = torch.empty(values.shape, dtype=_work_dtype(values.device), device=values.device)
    if num == 0:
        return ranks
    order = torch.sort(values, dim=1, stable=True)
    sorted_values = order.values
    positions = torch.arange(num, device=values.device).expand_as(sorted_values)
    differs = sorted_values[:, 1:] != sorted_values[:, :-1]
    edge = torch.ones_like(differs[:, :1])
    starts = torch.cat([edge, differs], dim=1)  # first element of a tie group
    ends = torch.cat([differs, edge], dim=1)  # last element of a tie group
    group_start = torch.where(starts, positions, 0).cummax(dim=1).values
    group_end = torch.where(ends, positions, num - 1).flip(1).cummin(dim=1).values.flip(1)
    sorted_ranks = (group_start + group_end).to(ranks.dtype) / 2 + 1
    return ranks.scatter_(1, order.indices, sorted_ranks)


def _pearson_rows(x: torch.Tensor, y: torch.Tensor, constant_value: float) -> torch.Tensor:
    """Pearson correlation of each row pair of ``[B, N]``; ``constant_value`` where a row has
    zero variance."""
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    denominator = (x.square().sum(dim=1) * y.square().sum(dim=1)).sqrt()
    defined = denominator > 0
    correlation = (x * y).sum(dim=1) / denominator.where(defined, 1)
    return torch.where(defined, correlation.clamp(-1, 1), constant_value)


def pearson_rows(a: torch.Tensor, b: torch.Tensor, constant_value: float = 0.0) -> torch.Tensor:
    """Pearson correlation of each row pair of ``[B, ...]`` tensors (flattened), ``[B]``, in
    float64 (float32 on MPS) — equal to ``scipy.stats.pearsonr(a_i, b_i)``. A row without
    variance gives ``constant_value`` instead of NaN; a NaN in a row gives ``constant_value``
    too, so callers that must propagate NaN mask it themselves."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"inputs must be batched [B, ...], got shape {tuple(a.shape)}")
    dtype = _work_dtype(a.device)
    return _pearson_rows(a.flatten(1).to(dtype), b.flatten(1).to(dtype), constant_value)


def spearman_rows(a: torch.Tensor, b: torch.Tensor, constant_value: float = 0.0) -> torch.Tensor:
    """Spearman rank correlation of each row pair of ``[B, ...]`` tensors (flattened), ``[B]``.

    ``ρ = cov(R_a, R_b) / (σ(R_a) σ(R_b))`` with average ranks for ties (Spearman 1904), i.e.
    the Pearson correlation of the ranks — equal to ``scipy.stats.spearmanr(a_i, b_i)``.
    A row without variance (all values tied) gives ``constant_value`` instead of NaN.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"inputs must be batched [B, ...], got shape {tuple(a.shape)}")
    ranks_a = average_ranks(a.flatten(1))
    ranks_b = average_ranks(b.flatten(1))
    return _pearson_rows(ranks_a, ranks_b, constant_value).to(_out_dtype(a, b))


def spearman_similarity(
    maps_a: torch.Tensor,
    maps_b: torch.Tensor,
    absolute: bool = False,
    constant_value: float = 0.0,
) -> torch.Tensor:
    """Spearman rank correlation between two ``[B, H, W]`` map batches, per sample ``[B]``.

    Adebayo et al. (2018), Sec. 4 ("Spearman rank correlation with/without absolute value"):
    ``ρ(E, E′)`` over all pixels; with ``absolute=True`` the maps are replaced by ``|E|`` and
    ``|E′|`` first (their "absolute value" variant, which ignores the sign of attributions).
    Ties get average ranks, so the value equals ``scipy.stats.spearmanr``; a constant map
    (e.g. an all-zero ReLU'd CAM) gives ``constant_value`` (0) instead of NaN.
    """
    _check_pair(maps_a, maps_b)
    if absolute:
        maps_a, maps_b = maps_a.abs(), maps_b.abs()
    return spearman_rows(maps_a, maps_b, constant_value)


def pearson_similarity(
    maps_a: torch.Tensor, maps_b: torch.Tensor, constant_value: float = 0.0
) -> torch.Tensor:
    """Pearson correlation of two ``[B, H, W]`` map batches over all pixels, per sample ``[B]``
    (VAR App. Figs. 8–14): ``Σ (a − ā)(b − b̄) / √(Σ (a − ā)² · Σ (b − b̄)²)``, equal to
    ``scipy.stats.pearsonr``; a constant map gives ``constant_value`` (0) instead of NaN."""
    _check_pair(maps_a, maps_b)
    return pearson_rows(maps_a, maps_b, constant_value).to(_out_dtype(maps_a, maps_b))


def cosine_similarity_maps(
    maps_a: torch.Tensor, maps_b: torch.Tensor, zero_value: float = 0.0
) -> torch.Tensor:
    """Cosine similarity of two ``[B, H, W]`` map batches as vectors of pixels, per sample
    ``[B]`` (VAR App. Figs. 8–14): ``⟨a, b⟩ / (‖a‖ ‖b‖)``, the maps as given (no centring, no
    normalisation); an all-zero map gives ``zero_value`` (0) instead of NaN."""
    _check_pair(maps_a, maps_b)
    work = _work_dtype(maps_a.device)
    a, b = maps_a.flatten(1).to(work), maps_b.flatten(1).to(work)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    defined = denominator > 0
    cosine = (a * b).sum(dim=1) / denominator.where(defined, 1)
    return torch.where(defined, cosine.clamp(-1, 1), zero_value).to(_out_dtype(maps_a, maps_b))


def ssim_similarity(
    maps_a: torch.Tensor,
    maps_b: torch.Tensor,
    *,
    normalise: bool = True,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Mean structural similarity (SSIM) of two ``[B, H, W]`` map batches, per sample ``[B]``.

    Adebayo et al. (2018), Sec. 4: SSIM of the maps rescaled to [0, 1]. With ``normalise``
    (default) each map is min-max normalised on its own (a constant map → zeros) and
    ``data_range`` is 1. For every ``win_size × win_size`` window (uniform weights),

    ``SSIM = (2 μ_a μ_b + C1)(2 σ_ab + C2) / ((μ_a² + μ_b² + C1)(σ_a² + σ_b² + C2))``,

    ``C1 = (K1 L)²``, ``C2 = (K2 L)²``, ``L = data_range``, with sample (co)variances
    (normalised by ``n − 1``, ``n = win_size²``). The result is the mean over the windows lying
    fully inside the image: skimage filters with reflect padding and then crops
    ``(win_size − 1) // 2`` pixels from every border before averaging, which leaves exactly the
    valid (unpadded) windows, so an unpadded ``avg_pool2d`` reproduces it. Equal to
    ``skimage.metrics.structural_similarity(a, b, data_range=1)`` with its 2-D defaults
    (``win_size=7``, ``K1=0.01``, ``K2=0.03``, ``use_sample_covariance=True``, uniform filter).
    """
    _check_pair(maps_a, maps_b)
    if win_size < 2 or win_size % 2 == 0:
        raise ValueError(f"win_size must be odd and ≥ 3, got {win_size}")
    height, width = maps_a.shape[1:]
    if min(height, width) < win_size:
        raise ValueError(
            f"maps of {height}×{width} pixels are smaller than the {win_size}×{win_size} SSIM "
            "window; pass a smaller odd win_size"
        )
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    out_dtype = _out_dtype(maps_a, maps_b)
    work = _work_dtype(maps_a.device)
    a, b = maps_a.to(work), maps_b.to(work)
    if normalise:
        a, b = min_max_normalise(a), min_max_normalise(b)
    data_range = torch.tensor(data_range, dtype=work, device=a.device)
    return mean_ssim(a, b, (win_size, win_size), data_range, k1, k2).to(out_dtype)


def mean_ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    window: tuple[int, int],
    data_range: torch.Tensor,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """The SSIM of :func:`ssim_similarity` averaged over the valid ``window`` (rows, columns)
    positions of ``[B, H, W]`` maps, ``[B]``; ``data_range`` ``L`` is a scalar or one value per
    sample ``[B]``. A ``(1, w)`` window over ``[B, 1, N]`` is skimage's 1-D SSIM of flattened
    maps (``win_size = w``), as Quantus compares explanations."""
    stacked = torch.stack([a, b, a * a, b * b, a * b], dim=1)  # [B, 5, H, W]
    means = F.avg_pool2d(stacked, kernel_size=window, stride=1)
    mu_a, mu_b, mu_aa, mu_bb, mu_ab = means.unbind(dim=1)
    num = window[0] * window[1]
    cov_norm = num / (num - 1)
    var_a = cov_norm * (mu_aa - mu_a * mu_a)
    var_b = cov_norm * (mu_bb - mu_b * mu_b)
    cov_ab = cov_norm * (mu_ab - mu_a * mu_b)
    data_range = data_range.reshape(-1, 1, 1)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)
    denominator = (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2)
    return (numerator / denominator).mean(dim=(1, 2))


def _image_gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences ``I[r+1] − I[r−1]`` along rows and columns, 0 on the border rows /
    columns (skimage ``_hog_channel_gradient``)."""
    g_row = torch.zeros_like(images)
    g_col = torch.zeros_like(images)
    g_row[:, 1:-1, :] = images[:, 2:, :] - images[:, :-2, :]
    g_col[:, :, 1:-1] = images[:, :, 2:] - images[:, :, :-2]
    return g_row, g_col


def _cell_histograms(
    magnitude: torch.Tensor, bins: torch.Tensor, pixels_per_cell: tuple[int, int], orientations: int
) -> torch.Tensor:
    """Cell histograms ``[B, n_r, n_c, O]`` from cropped ``[B, n_r p_r, n_c p_c]`` float64
    magnitudes and orientation bins (bin ``O`` = no vote), as skimage's ``_hoghistogram``
    computes them: the votes of a cell are added one pixel at a time in row-major order into a
    float32 total (``total = (float)((double)total + vote)``, adding an exact 0 for the other
    bins), and the total is divided by ``p_r p_c`` in float32. Reproducing order and precision
    makes equal cells bit-identical and matches skimage bit for bit in practice, so the
    descriptor's ties — which the rank correlation sees — are skimage's. The Python loop runs
    over the ``p_r p_c`` pixel offsets of a cell (64 by default), each step vectorised over the
    batch and all cells; memory stays ``O(B H W)``.
    """
    cell_rows, cell_cols = pixels_per_cell
    batch, height, width = magnitude.shape
    n_rows, n_cols = height // cell_rows, width // cell_cols
    magnitude = magnitude.view(batch, n_rows, cell_rows, n_cols, cell_cols)
    bins = bins.view(batch, n_rows, cell_rows, n_cols, cell_cols)
    shape = (batch, n_rows, n_cols, orientations + 1)
    total = torch.zeros((*shape[:3], orientations), dtype=torch.float32, device=magnitude.device)
    for row in range(cell_rows):
        for col in range(cell_cols):
            votes = torch.zeros(shape, dtype=magnitude.dtype, device=magnitude.device)
            votes.scatter_(3, bins[:, :, row, :, col, None], magnitude[:, :, row, :, col, None])
            total = (total.to(magnitude.dtype) + votes[..., :orientations]).to(torch.float32)
    return total / (cell_rows * cell_cols)


def _pairwise_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in numpy's pairwise order (``np.sum`` of a contiguous array).

    numpy adds ``n < 8`` values one by one; ``8 ≤ n ≤ 128`` values into eight interleaved
    partial sums ``r_j = a_j + a_{j+8} + …``, combined as ``((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))``,
    the ``n mod 8`` leftovers added last; longer inputs are split in halves (a multiple of 8)
    and recursed. Every step here is an element-wise IEEE operation, so the result is
    bit-identical to numpy's, and blocks with equal content get equal sums wherever they lie —
    HOG descriptors therefore keep exactly skimage's ties, which the rank correlation sees.
    """
    n = values.shape[-1]
    if n > 128:
        half = n // 2
        half -= half % 8
        return _pairwise_sum(values[..., :half]) + _pairwise_sum(values[..., half:])
    if n < 8:
        total = torch.zeros_like(values[..., 0])
        for index in range(n):
            total = total + values[..., index]
        return total
    stop = n - n % 8
    partial = values[..., :8]
    for start in range(8, stop, 8):
        partial = partial + values[..., start : start + 8]
    r = partial.unbind(-1)
    total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for index in range(stop, n):
        total = total + values[..., index]
    return total


def _block_sum(blocks: torch.Tensor) -> torch.Tensor:
    """``np.sum`` of each C-ordered ``[..., b_r, b_c, O]`` block, shaped ``[..., 1, 1, 1]``."""
    return _pairwise_sum(blocks.flatten(-3))[..., None, None, None]


def _normalise_blocks(blocks: torch.Tensor, method: str, eps: float, clip: float) -> torch.Tensor:
    """Normalise ``[..., b_r, b_c, O]`` blocks over their last three dimensions (skimage
    ``_hog_normalize_block``)."""
    if method == "L1":
        return blocks / (_block_sum(blocks.abs()) + eps)
    if method == "L1-sqrt":
        return (blocks / (_block_sum(blocks.abs()) + eps)).sqrt()
    normalised = blocks / (_block_sum(blocks.square()) + eps**2).sqrt()
    if method == "L2":
        return normalised
    clipped = normalised.clamp(max=clip)
    return clipped / (_block_sum(clipped.square()) + eps**2).sqrt()


def hog_features(
    images: torch.Tensor,
    orientations: int = 9,
    pixels_per_cell: tuple[int, int] = (8, 8),
    cells_per_block: tuple[int, int] = (3, 3),
    block_norm: str = "L2-Hys",
    eps: float = 1e-5,
    clip: float = 0.2,
) -> torch.Tensor:
    """HOG descriptors (Dalal & Triggs 2005) of ``[B, H, W]`` grey images, ``[B, F]``.

    Reproduces ``skimage.feature.hog(image, orientations, pixels_per_cell, cells_per_block,
    block_norm)`` (``transform_sqrt=False``, ``feature_vector=True``; defaults equal skimage's):

    1. gradients by central differences, ``g_r = I[r+1, c] − I[r−1, c]`` and
       ``g_c = I[r, c+1] − I[r, c−1]``, set to 0 on the first/last row (``g_r``) and column
       (``g_c``);
    2. magnitude ``hypot(g_c, g_r)``, unsigned orientation
       ``θ = (atan2(g_r, g_c) · 180/π) mod 180`` ∈ [0, 180);
    3. a pixel votes its magnitude into bin ``i`` iff ``180/O · i ≤ θ < 180/O · (i + 1)`` (hard
       assignment, no interpolation; a θ that rounds to 180 votes nowhere, as in skimage);
       cells are the non-overlapping ``p_r × p_c`` tiles from the top-left corner (rows/columns
       beyond ``⌊H/p_r⌋ p_r`` / ``⌊W/p_c⌋ p_c`` are ignored), and a cell's histogram is the sum of
       its votes divided by ``p_r p_c``;
    4. blocks of ``b_r × b_c`` cells at every cell offset (stride one cell), each normalised on
       its own; ``L2-Hys``: ``v ← v / √(‖v‖² + ε²)``, ``v ← min(v, clip)``,
       ``v ← v / √(‖v‖² + ε²)`` (ε = 1e-5, clip = 0.2); ``L2``, ``L1``
       (``v / (‖v‖₁ + ε)``) and ``L1-sqrt`` are supported as in skimage;
    5. flattened in the order (block row, block col, cell row, cell col, orientation).

    Cell votes are accumulated exactly as skimage does (sequentially, in float32; see
    :func:`_cell_histograms`), so the descriptors agree with skimage's to float precision and
    share its ties.
    """
    if images.dim() != 3:
        raise ValueError(f"images must be [B, H, W], got shape {tuple(images.shape)}")
    if block_norm not in _BLOCK_NORMS:
        raise ValueError(f"block_norm must be one of {_BLOCK_NORMS}, got {block_norm!r}")
    if orientations < 1:
        raise ValueError(f"orientations must be ≥ 1, got {orientations}")
    cell_rows, cell_cols = pixels_per_cell
    block_rows, block_cols = cells_per_block
    if min(cell_rows, cell_cols, block_rows, block_cols) < 1:
        raise ValueError(
            f"pixels_per_cell {pixels_per_cell} and cells_per_block {cells_per_block} must be "
            "positive"
        )
    batch, height, width = images.shape
    n_cells_r, n_cells_c = height // cell_rows, width // cell_cols
    n_blocks_r, n_blocks_c = n_cells_r - block_rows + 1, n_cells_c - block_cols + 1
    if n_blocks_r <= 0 or n_blocks_c <= 0:
        raise ValueError(
            f"images of {height}×{width} are too small for pixels_per_cell {pixels_per_cell} and "
            f"cells_per_block {cells_per_block}: at least {block_rows * cell_rows}×"
            f"{block_cols * cell_cols} pixels are needed"
        )
    out_dtype = _out_dtype(images)
    work = _work_dtype(images.device)
    if not images.dtype.is_floating_point:
        images = images.to(work)
    elif images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()  # skimage's smallest float type is float32
    # skimage differentiates in the image's float dtype and bins in float64.
    g_row, g_col = (gradient.to(work) for gradient in _image_gradients(images))
    magnitude = torch.hypot(g_col, g_row)
    angle = torch.remainder(torch.atan2(g_row, g_col) * (180.0 / math.pi), 180.0)
    # Bin i holds 180/O·i ≤ θ < 180/O·(i+1) (skimage _hoghistogram compares against these
    # products); index O collects a θ that rounded up to 180 and is dropped.
    edges = torch.arange(orientations + 1, dtype=work, device=images.device) * (
        180.0 / orientations
    )
    bins = (torch.bucketize(angle, edges, right=True) - 1).clamp(0, orientations)
    crop_r, crop_c = n_cells_r * cell_rows, n_cells_c * cell_cols
    histogram = _cell_histograms(
        magnitude[:, :crop_r, :crop_c].contiguous(),
        bins[:, :crop_r, :crop_c].contiguous(),
        (cell_rows, cell_cols),
        orientations,
    ).to(work)  # [B, n_cells_r, n_cells_c, O]
    # [B, n_blocks_r, n_blocks_c, O, b_r, b_c] → [B, n_blocks_r, n_blocks_c, b_r, b_c, O]
    blocks = histogram.unfold(1, block_rows, 1).unfold(2, block_cols, 1)
    blocks = blocks.permute(0, 1, 2, 4, 5, 3)
    normalised = _normalise_blocks(blocks, block_norm, eps, clip)
    return normalised.reshape(batch, -1).to(out_dtype)


def hog_similarity(
    maps_a: torch.Tensor,
    maps_b: torch.Tensor,
    *,
    normalise: bool = True,
    orientations: int = 9,
    pixels_per_cell: tuple[int, int] = (8, 8),
    cells_per_block: tuple[int, int] = (3, 3),
    block_norm: str = "L2-Hys",
    constant_value: float = 0.0,
) -> torch.Tensor:
    """Spearman rank correlation of the HOG descriptors of two map batches, ``[B]``.

    Adebayo et al. (2018), Sec. 4 ("rank correlation of HOG features"): ``ρ(HOG(E), HOG(E′))``.
    With ``normalise`` (default) each map is min-max normalised to [0, 1] first. HOG parameters
    default to ``skimage.feature.hog``'s defaults (9 unsigned orientations, 8×8-pixel cells,
    3×3-cell blocks, L2-Hys); Adebayo et al.'s notebooks call ``skimage.feature.hog`` and do not
    state other parameters in the paper, so its defaults are used. A map with no gradient has
    an all-zero descriptor, whose correlation is ``constant_value`` (0).
    """
    _check_pair(maps_a, maps_b)
    out_dtype = _out_dtype(maps_a, maps_b)
    work = _work_dtype(maps_a.device)
    maps_a, maps_b = maps_a.to(work), maps_b.to(work)
    if normalise:
        maps_a, maps_b = min_max_normalise(maps_a), min_max_normalise(maps_b)
    options = {
        "orientations": orientations,
        "pixels_per_cell": pixels_per_cell,
        "cells_per_block": cells_per_block,
        "block_norm": block_norm,
    }
    features_a = hog_features(maps_a, **options)
    features_b = hog_features(maps_b, **options)
    return spearman_rows(features_a, features_b, constant_value).to(out_dtype)
