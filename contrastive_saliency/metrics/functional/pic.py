"""Performance Information Curves: SIC and AIC (Kapishnikov et al., XRAI, ICCV 2019, Sec. 4.1).

Protocol: that of ``saliency.metrics.pic`` in the public PAIR-code "saliency" library, the
XRAI authors' implementation (``compute_pic_metric``, ``aggregate_individual_pic_results``);
every step below is taken from it, re-implemented batched (no code copied). PROTOCOLS.md's
summary agrees; where it is silent (rule 7c, the exact normalisation and curve), the library
decides.

1. **Pixel space.** Images arrive normalised, ``[B, C, H, W]``; they are un-normalised with
   ``mean``/``std``, scaled by 255, rounded and clamped to uint8 ``[H, W, C]`` (the reference
   works on uint8 images only). Every image the model sees — original, start, and each
   threshold's image — is such a uint8 image re-normalised as ``(u / 255 − mean) / std``.
2. **Information** of an image = size in bytes of its lossless WebP encoding (Pillow,
   ``lossless=True, quality=100``, i.e. maximum compression effort).
3. **Start ("fully blurred") image**: a fixed random mask keeps ``int(H·W·random_fraction)``
   pixels (1 %); every other pixel is filled by interpolation from the kept ones.
4. **Interpolation** (reference ``create_blurred_image``): the four corner pixels are always
   kept; the others are filled by ``scipy.interpolate.griddata(method="linear")`` — Delaunay
   triangulation of the kept pixel coordinates (``np.argwhere`` order) and barycentric linear
   interpolation; points outside the hull (none: the corners span the image) get the image's
   per-channel mean colour. Values are stored as float32, rounded half-to-even and cast to
   uint8. A mask that keeps every pixel returns the image unchanged. :func:`interpolate_from_kept`
   produces exactly this uint8 result from the same Qhull triangulation with exact integer
   barycentric weights instead of ``griddata``'s point location (see there; the tests compare
   it with per-channel ``griddata`` bit for bit).
5. **Thresholds** ``t`` (default ``[0.005, .01, .02, .03, .04, .05, .07, .10, .13, .21, .34,
   .5, .75]``, strictly increasing): pixels with ``saliency >= quantile(saliency, 1 − t)``
   (``numpy.quantile``'s default linear interpolation, in float64) OR the random mask are
   kept, the rest interpolated as in 4. Ties at the quantile (a sparse map's zeros): the
   reference keeps them all, so a map that is 0 on 90 % of the image reveals the whole image
   at every ``t`` whose quantile is 0 (``ties="keep_all"``). By default (``ties="random"``,
   DESIGN.md "Ties", :mod:`contrastive_saliency.metrics.functional.ties`) exactly as many pixels are kept
   as the reference keeps on a map without ties — those above the quantile plus a uniformly
   random subset of the tied ones, keyed by the sample ``indices`` — which is the reference's
   result on every map whose values at the quantile are distinct.
6. **Scores**: SIC uses the softmax probability of the explained class, AIC uses accuracy
   (1 if the argmax equals the explained class, else 0).
7. **Skipping** (separately for SIC and AIC, as the reference calls ``compute_pic_metric``
   once per curve type): an image is invalid when (a) its score on the original is below
   ``min_confidence`` (for AIC: the original is misclassified), (b) the start image is not less
   informative than the original (``info(start) >= info(original)``), or (c) the start image's
   score is not below the original's. Rule (c) is not in PROTOCOLS.md but is in the reference
   and is forced by the normalisation below (its denominator would be ≤ 0).
8. **Normalisation**: ``x = (info(t) − info(start)) / (info(original) − info(start))`` and
   ``y = (score(t) − score(start)) / (score(original) − score(start))``, each clipped to
   [0, 1]. (Note: scores are normalised between the start and the original, not divided by
   the original's score.)
9. **Monotonicity** (reference ``keep_monotonous=True``, "as in the original paper"): ``y`` is
   replaced by its running maximum *over the thresholds in increasing order* (starting from 0).
   The curve over ``x`` is therefore non-decreasing only where ``x`` itself grows with the
   threshold (WebP sizes usually do, but need not).
10. **Curve**: the points ``(x_t, y_t)`` plus ``(0, 0)`` and ``(1, 1)`` (in that order) are
    stably sorted by ``x`` and linearly interpolated (``numpy.interp`` semantics, which the
    reference's ``scipy.interpolate.interp1d`` delegates to: at a repeated ``x`` the last point
    in that order wins) on the grid ``i / num_points``, ``i = 0 … num_points − 1``, to which
    ``(1, 1)`` is appended. Per-image AUC = trapezoid area under that curve.
11. **Aggregate** (:func:`aggregate_pic`): the median (or mean) over the *valid* images at each
    grid point, then the trapezoid AUC of that curve — this, not the mean per-image AUC, is the
    reported SIC / AIC.

Everything is batched on the images' device except steps 2 and 4: WebP encoding and the
Delaunay interpolation are inherently per-image CPU operations (numpy / Pillow / scipy) — the
one exception to "no numpy round trips" in the functional metrics. Their cost dominates: per
image ``T + 1`` triangulations of up to ``max(t)·H·W`` points and ``T + 2`` WebP encodes —
several seconds per 224² image on one core, most of it the encoder at maximum effort, which
holds the GIL; an ``executor`` (e.g. a process pool created once and reused across batches)
spreads the images over workers. All ``B·(T + 2)`` model queries go through the model in
forward batches of ``batch_size``. Results do not depend on ``batch_size`` or ``executor``
except through the model's own batch-dependent float32 kernels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from PIL import Image
from scipy.interpolate import griddata
from scipy.spatial import Delaunay
from torch import nn

from contrastive_saliency.metrics.functional.ties import pixel_ranks

TIES = ("random", "keep_all")

DEFAULT_THRESHOLDS: tuple[float, ...] = (
    0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.21, 0.34, 0.5, 0.75,
)  # fmt: skip


@dataclass(frozen=True)
class PICResult:
    """Per-image PIC data for ``B`` images and ``T`` thresholds; all tensors on the images'
    device. Image columns ``[B, T + 2]`` are ordered (start, threshold 1 … T, original).

    Values of invalid images are finite placeholders (a normalisation whose denominator is
    ≤ 0 yields 0) so that nothing is NaN; exclude them with ``sic_valid`` / ``aic_valid``.
    """

    thresholds: torch.Tensor  # [T] float64
    information: torch.Tensor  # [B, T + 2] int64, WebP bytes
    scores: torch.Tensor  # [B, T + 2] float32, softmax probability of the explained class
    correct: torch.Tensor  # [B, T + 2] bool, argmax == explained class
    normalised_information: torch.Tensor  # [B, T] float64 in [0, 1]
    sic_points: torch.Tensor  # [B, T] float64 in [0, 1], normalised (monotone) softmax
    aic_points: torch.Tensor  # [B, T] float64 in [0, 1], normalised (monotone) accuracy
    grid: torch.Tensor  # [G + 1] float64, i / G and 1
    sic_curves: torch.Tensor  # [B, G + 1] float64
    aic_curves: torch.Tensor  # [B, G + 1] float64
    sic_auc: torch.Tensor  # [B] float64
    aic_auc: torch.Tensor  # [B] float64
    sic_valid: torch.Tensor  # [B] bool
    aic_valid: torch.Tensor  # [B] bool


def _channel_stats(
    values: Sequence[float] | torch.Tensor, channels: int, name: str, device: torch.device
) -> torch.Tensor:
    stats = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if stats.numel() == 1:
        stats = stats.expand(channels)
    if stats.numel() != channels:
        raise ValueError(
            f"{name} must have one value per image channel ({channels}), got {stats.numel()}; "
            "pass the normalisation the images were prepared with"
        )
    return stats.view(1, channels, 1, 1)


def to_uint8_pixels(
    images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Normalised ``[B, C, H, W]`` images → uint8 ``[B, H, W, C]`` in pixel space:
    ``round(clamp((x · std + mean) · 255, 0, 255))`` (round half to even)."""
    c = images.shape[1]
    mean_ = _channel_stats(mean, c, "mean", images.device)
    std_ = _channel_stats(std, c, "std", images.device)
    pixels = ((images.float() * std_ + mean_) * 255.0).clamp(0.0, 255.0).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8_pixels(
    pixels: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` → normalised float32 ``[N, C, H, W]``: ``(u / 255 − mean) / std``
    (torchvision ``ToTensor`` then ``Normalize``)."""
    c = pixels.shape[-1]
    mean_ = _channel_stats(mean, c, "mean", pixels.device)
    std_ = _channel_stats(std, c, "std", pixels.device)
    return ((pixels.permute(0, 3, 1, 2).float().div(255.0) - mean_) / std_).contiguous()


def random_pixel_masks(
    batch: int,
    height: int,
    width: int,
    fraction: float = 0.01,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[B, H, W]`` bool masks, each with exactly ``int(H·W·fraction)`` pixels set, drawn
    without replacement (reference ``generate_random_mask``) from a CPU ``torch.Generator``
    seeded with ``seed``; image ``i`` gets the ``i``-th draw, so the masks are deterministic
    given (seed, position in the batch). Reuse the same masks across saliency methods for a
    fair comparison (the reference's advice); pass them to :func:`pic_curves`."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"random fraction must lie in [0, 1], got {fraction}")
    size = height * width
    count = int(size * fraction)
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(batch, size, dtype=torch.bool)
    for i in range(batch):
        masks[i, torch.randperm(size, generator=generator)[:count]] = True
    return masks.view(batch, height, width).to(device)


def saliency_keep_masks(
    maps: torch.Tensor,
    thresholds: Sequence[float],
    indices: torch.Tensor | None = None,
    ties: str = "random",
) -> torch.Tensor:
    """``[T, B, H, W]`` masks of the pixels with ``map >= quantile(map, 1 − t)`` per threshold.

    The quantile is ``numpy.quantile``'s default (linear) on the float64 map: virtual index
    ``h = (n − 1)(1 − t)``, ``a, b`` the sorted values at ``floor(h)`` and ``floor(h) + 1``,
    ``γ = h − floor(h)``, value ``a + (b − a)γ`` if ``γ < 0.5`` else ``b − (b − a)(1 − γ)``.

    ``ties="keep_all"`` keeps every pixel ``>=`` the value (the reference). ``ties="random"``
    keeps the ``n − c`` most salient pixels in :func:`~contrastive_saliency.metrics.functional.ties.
    pixel_ranks` order (ties keyed by ``indices`` ``[B]``), where ``c`` is the first sorted
    position the reference keeps when the values are distinct — ``floor(h)`` when the value
    is ``a`` (``γ = 0``, or rounded to ``a``), else ``floor(h) + 1`` — so both agree wherever
    the values around the quantile are distinct.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    b, h, w = maps.shape
    flat = maps.reshape(b, h * w).double()
    ordered = torch.sort(flat, dim=1).values
    n = h * w
    if ties == "random":
        if indices is None:
            raise ValueError(
                "ties='random' breaks ties at the quantile by the samples' dataset index: pass "
                "indices ([B]), or ties='keep_all' for the reference's rule"
            )
        ranks = pixel_ranks(flat, indices.to(flat.device))
    masks = []
    for t in thresholds:
        virtual = (n - 1) * (1.0 - float(t))
        lower = min(int(np.floor(virtual)), n - 1)
        upper = min(lower + 1, n - 1)
        gamma = virtual - lower
        low, high = ordered[:, lower], ordered[:, upper]
        diff = high - low
        value = low + diff * gamma if gamma < 0.5 else high - diff * (1.0 - gamma)
        if ties == "keep_all":
            masks.append((flat >= value.unsqueeze(1)).view(b, h, w))
            continue
        at_lower = (
            (value <= low) & (low < high) if gamma > 0 else torch.ones_like(low, dtype=torch.bool)
        )
        kept = n - torch.where(at_lower, lower, upper)
        masks.append((ranks < kept.unsqueeze(1)).view(b, h, w))
    return torch.stack(masks)


def interpolate_from_kept(pixels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Fill the pixels not in ``keep`` by linear interpolation from those in it (CPU).

    ``pixels`` uint8 ``[H, W, C]``, ``keep`` bool ``[H, W]``. The result is that of the
    reference: corners always kept; ``scipy.interpolate.griddata(method="linear")`` over the
    kept ``np.argwhere`` coordinates per channel (per-channel mean colour outside the hull,
    which the corners make empty); float32 storage, round half to even, uint8.

    It is computed from the same ``scipy.spatial.Delaunay`` (Qhull) triangulation that
    ``griddata`` builds, but without its point location: every pixel is assigned to a
    triangle containing it by an exact integer barycentric test (pixel coordinates are
    integers) and gets the exact rational ``Σ wᵢ uᵢ / Σ wᵢ`` (all channels at once). Two
    reasons: ``griddata`` on a pixel grid is very slow — pixels on the image border lie on the
    hull, where its simplex walk fails and falls back to a brute-force search, and its
    per-simplex LAPACK transforms crawl when OpenBLAS threads compete — and exact values make
    the result independent of which triangle a pixel on a shared edge is given to.
    ``griddata`` computes the same values up to float64 rounding noise; after the float32
    cast and rounding both give the same uint8: the exact values have denominators
    ``D = 2·area ≤ (H − 1)(W − 1)``, and for ``D < 2¹⁶`` (images up to 256×256) none lies
    within that noise of a float32 rounding boundary next to a half-integer. Should Qhull
    leave a point out ("coplanar") or a pixel be uncovered, ``griddata`` itself is used.
    """
    keep = keep.copy()
    h, w = keep.shape
    keep[[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]] = True
    if keep.all():
        return pixels
    known = np.argwhere(keep)
    values = pixels[keep].astype(np.int64)  # [K, C], np.argwhere order
    triangulation = Delaunay(known.astype(np.float64))
    filled_values = None
    if not triangulation.coplanar.size:
        filled_values = _rasterise(known, values, triangulation.simplices, keep)
    filled = pixels.astype(np.float32)
    if filled_values is None:  # exact reference path
        unknown = np.argwhere(~keep)
        interpolated = griddata(
            known, values.astype(np.float64), unknown, method="linear", fill_value=np.nan
        )
        outside = np.isnan(interpolated)
        if outside.any():
            mean_colour = np.broadcast_to(pixels.mean(axis=(0, 1)), interpolated.shape)
            interpolated[outside] = mean_colour[outside]
        filled[~keep] = interpolated
    else:
        filled[~keep] = filled_values
    return np.round(filled).astype(np.uint8)


def _cross(a: np.ndarray, b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``(b − a) × (q − a)`` for integer ``[..., 2]`` points (twice a signed area)."""
    return (b[..., 0] - a[..., 0]) * (q[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (
        q[..., 0] - a[..., 0]
    )


def _rasterise(
    known: np.ndarray, values: np.ndarray, simplices: np.ndarray, keep: np.ndarray
) -> np.ndarray | None:
    """Exact linear interpolation of the unknown pixels (``~keep``, ``np.argwhere`` order),
    ``[N, C]`` float64, or ``None`` if a pixel is in no triangle."""
    h, w = keep.shape
    corners = known[simplices]  # [S, 3, 2] integer (row, col)
    area = _cross(corners[:, 0], corners[:, 1], corners[:, 2])
    flipped = area < 0  # orient every triangle counter-clockwise (positive area)
    simplices = simplices.copy()
    simplices[flipped] = simplices[flipped][:, [0, 2, 1]]
    simplices = simplices[area != 0]  # zero-area triangles cover no pixel on their own
    corners = known[simplices]
    low, high = corners.min(axis=1), corners.max(axis=1)
    box = high - low + 1  # [S, 2] bounding-box extents
    sizes = box[:, 0] * box[:, 1]
    owner = np.full(h * w, -1, dtype=np.int64)  # triangle of each pixel
    weights = np.zeros((h * w, 3), dtype=np.int64)
    unknown = ~keep.reshape(-1)
    # Triangles in chunks of about 2²² candidate pixels (bounding boxes); a pixel on an edge
    # shared by two triangles keeps the first (the exact values agree there anyway).
    ends = np.cumsum(sizes)
    start = 0
    while start < len(simplices):
        base = ends[start] - sizes[start]
        stop = max(start + 1, int(np.searchsorted(ends, base + 2**22, side="right")))
        counts = sizes[start:stop]
        index = np.repeat(np.arange(start, stop), counts)
        offset = np.arange(len(index)) - np.repeat(ends[start:stop] - counts - base, counts)
        row = low[index, 0] + offset // box[index, 1]
        col = low[index, 1] + offset % box[index, 1]
        point = np.stack([row, col], axis=1)
        tri = corners[index]
        barycentric = np.stack(
            [
                _cross(tri[:, 1], tri[:, 2], point),
                _cross(tri[:, 2], tri[:, 0], point),
                _cross(tri[:, 0], tri[:, 1], point),
            ],
            axis=1,
        )
        flat = row * w + col
        inside = (barycentric >= 0).all(axis=1) & unknown[flat]
        inside &= owner[flat] < 0
        candidates = np.flatnonzero(inside)
        _, first = np.unique(flat[candidates], return_index=True)
        chosen = candidates[first]
        owner[flat[chosen]] = index[chosen]
        weights[flat[chosen]] = barycentric[chosen]
        start = stop
    wanted = np.flatnonzero(~keep.reshape(-1))
    if (owner[wanted] < 0).any():
        return None
    vertex_values = values[simplices[owner[wanted]]]  # [N, 3, C]
    numerator = (weights[wanted][:, :, None] * vertex_values).sum(axis=1)
    return numerator / weights[wanted].sum(axis=1, keepdims=True)


def webp_size(pixels: np.ndarray) -> int:
    """Information estimate of a uint8 ``[H, W, C]`` (or ``[H, W]``) image: bytes of its
    lossless WebP encoding (Pillow, ``quality=100`` = maximum effort)."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="WEBP", lossless=True, quality=100)
    return buffer.getbuffer().nbytes


def _image_series(pixels: np.ndarray, keeps: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Interpolated images for ``keeps`` ``[K, H, W]`` followed by the original, and the WebP
    size of each: ``[K + 1, H, W, C]`` uint8 and ``K + 1`` ints."""
    series = [interpolate_from_kept(pixels, keep) for keep in keeps] + [pixels]
    return np.stack(series), [webp_size(image) for image in series]


def _safe_normalise(value: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``clip((value − low) / (high − low), 0, 1)``, 0 where ``high <= low``."""
    span = high - low
    ok = span > 0
    return torch.where(ok, (value - low) / torch.where(ok, span, 1.0), 0.0).clamp(0.0, 1.0)


def pic_interpolate(
    information: torch.Tensor, scores: torch.Tensor, num_points: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Curves on a fixed grid from per-image points ``[B, T]`` (both already normalised).

    Adds ``(0, 0)`` then ``(1, 1)`` after the ``T`` points, sorts stably by information and
    evaluates the piecewise-linear interpolant with ``numpy.interp`` semantics (at a repeated
    abscissa the last point wins) on ``i / num_points``, ``i < num_points``; appends ``(1, 1)``.
    Returns ``(grid [G + 1], curves [B, G + 1])`` in float64.
    """
    if num_points < 1:
        raise ValueError(f"num_points must be at least 1, got {num_points}")
    b = information.shape[0]
    device = information.device
    zeros = torch.zeros(b, 1, dtype=torch.float64, device=device)
    xs = torch.cat([information.double(), zeros, zeros + 1.0], dim=1)
    ys = torch.cat([scores.double(), zeros, zeros + 1.0], dim=1)
    xs, order = torch.sort(xs, dim=1, stable=True)
    ys = ys.gather(1, order)
    grid = torch.arange(num_points, dtype=torch.float64, device=device) * (1.0 / num_points)
    query = grid.expand(b, num_points).contiguous()
    left = torch.searchsorted(xs, query, right=True) - 1  # last point with x <= g (≥ 0)
    right = (left + 1).clamp(max=xs.shape[1] - 1)
    x0, x1 = xs.gather(1, left), xs.gather(1, right)
    y0, y1 = ys.gather(1, left), ys.gather(1, right)
    exact = (x0 == query) | (right == left)
    slope = (y1 - y0) / torch.where(exact, 1.0, x1 - x0)
    curves = torch.where(exact, y0, slope * (query - x0) + y0)
    ones = torch.ones(b, 1, dtype=torch.float64, device=device)
    return torch.cat([grid, grid.new_ones(1)]), torch.cat([curves, ones], dim=1)


def _check_inputs(images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor):
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"PIC encodes images as WebP, which needs 1 or 3 channels; got {c}")
    if h < 2 or w < 2:
        raise ValueError(f"images must be at least 2×2 to triangulate, got {h}×{w}")
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.shape != (b, h, w):
        raise ValueError(
            f"saliency_maps must be [{b}, {h}, {w}] to match the images, got "
            f"{tuple(maps.shape)}; upsample them to the image resolution first"
        )
    if not torch.isfinite(maps).all():
        raise ValueError("saliency_maps contain NaN or inf; replace them before ranking pixels")
    if classes.dim() != 1 or classes.shape[0] != b:
        raise ValueError(f"classes must be [{b}] class indices, got {tuple(classes.shape)}")
    return maps, classes.long().to(images.device)


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    values = [float(t) for t in thresholds]
    if not values:
        raise ValueError("thresholds is empty; pass at least one fraction in (0, 1]")
    if any(not 0.0 < t <= 1.0 for t in values):
        raise ValueError(f"thresholds must lie in (0, 1], got {values}")
    if any(b <= a for a, b in pairwise(values)):
        raise ValueError(
            f"thresholds must be strictly increasing (the monotone curve takes the running "
            f"maximum in this order), got {values}"
        )
    return values


@torch.no_grad()
def pic_curves(
    model: nn.Module,
    images: torch.Tensor,
    saliency_maps: torch.Tensor,
    classes: torch.Tensor,
    *,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    random_fraction: float = 0.01,
    random_masks: torch.Tensor | None = None,
    min_confidence: float = 0.8,
    monotone: bool = True,
    num_points: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
    executor: Executor | None = None,
    indices: torch.Tensor | None = None,
    ties: str = "random",
) -> PICResult:
    """Per-image Softmax and Accuracy Information Curves (SIC, AIC); protocol in the module
    docstring.

    Args:
        model: classifier taking normalised ``[N, C, H, W]`` images, returning logits.
        images: ``[B, C, H, W]`` normalised with ``mean``/``std`` (C = 1 or 3).
        saliency_maps: ``[B, H, W]`` (or ``[B, 1, H, W]``) at the image resolution; higher =
            more important (apply ``abs`` first if that is the intended ranking).
        classes: ``[B]`` explained classes (usually the model's prediction).
        mean, std: per-channel normalisation of ``images`` (pixel values in [0, 1]).
        thresholds: strictly increasing fractions of the most salient pixels to reveal.
        random_fraction: fraction of pixels in each random start mask (1 %).
        random_masks: ``[B, H, W]`` bool start masks; default :func:`random_pixel_masks`
            with ``random_fraction`` and ``seed``.
        min_confidence: images whose original score is below it are invalid (SIC: softmax;
            AIC: accuracy, i.e. misclassified originals).
        monotone: running maximum of the normalised scores over the thresholds (reference
            default ``keep_monotonous=True``).
        num_points: grid resolution of the curves (1000 → 1001 points, 0 … 1).
        batch_size: images per forward pass over all ``B·(T + 2)`` queries.
        seed: seed of the default random masks; masks depend on (seed, position in the batch),
            so vary it per batch of a dataset (or pass ``random_masks``).
        executor: runs the per-image CPU work (interpolation, WebP) via ``executor.map``;
            default: serially in this process. Pillow's WebP encoder holds the GIL, so a
            ``ThreadPoolExecutor`` gains little; a ``ProcessPoolExecutor`` created once and
            reused across batches parallelises it. Results do not depend on it.
        indices: ``[B]`` dataset indices of the samples; they key the random tie-breaking at
            the quantiles (needed with ``ties="random"``).
        ties: ``"random"`` (default) or ``"keep_all"`` (the reference), see step 5 of the
            module docstring and :func:`saliency_keep_masks`.
    """
    maps, classes = _check_inputs(images, saliency_maps, classes)
    values = _check_thresholds(thresholds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_points < 1:
        raise ValueError(f"num_points must be at least 1, got {num_points}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    b, _, h, w = images.shape
    if ties == "random" and (indices is None or indices.shape != (b,)):
        raise ValueError(
            f"ties='random' needs indices, the [{b}] dataset indices of the samples (they key "
            f"the tie-breaking at the quantiles), got "
            f"{None if indices is None else tuple(indices.shape)}; or pass ties='keep_all'"
        )
    device = images.device
    if random_masks is None:
        random_masks = random_pixel_masks(b, h, w, random_fraction, seed)
    elif random_masks.shape != (b, h, w):
        raise ValueError(
            f"random_masks must be [{b}, {h}, {w}] booleans, got {tuple(random_masks.shape)}"
        )
    random_masks = random_masks.detach().to(device="cpu", dtype=torch.bool)

    # The keep masks are built (batched) on the CPU, where the interpolation needs them.
    pixels = to_uint8_pixels(images.detach(), mean, std)  # [B, H, W, C]
    if indices is not None:
        indices = indices.detach().cpu()
    keeps = saliency_keep_masks(maps.detach().cpu(), values, indices, ties)
    keeps = keeps | random_masks.unsqueeze(0)
    keeps = torch.cat([random_masks.unsqueeze(0), keeps]).transpose(0, 1)  # [B, T + 1, H, W]

    # CPU exception: Delaunay interpolation and WebP encoding, one image at a time.
    pixels_np = pixels.cpu().numpy()
    keeps_np = keeps.numpy()
    if executor is None:
        outputs = list(map(_image_series, pixels_np, keeps_np))
    else:
        outputs = list(executor.map(_image_series, pixels_np, keeps_np))
    series = torch.from_numpy(np.stack([o[0] for o in outputs])).to(device)  # [B, T+2, H, W, C]
    information = torch.tensor([o[1] for o in outputs], dtype=torch.int64, device=device)

    num_images = series.shape[1]
    flat = series.view(b * num_images, h, w, -1)
    probabilities, predictions = [], []
    for chunk in flat.split(batch_size):
        logits = model(from_uint8_pixels(chunk, mean, std)).float()
        predictions.append(logits.argmax(dim=1))
        probabilities.append(logits.softmax(dim=1))
    probs = torch.cat(probabilities).view(b, num_images, -1)
    scores = probs.gather(2, classes.view(b, 1, 1).expand(b, num_images, 1))[..., 0]
    correct = torch.cat(predictions).view(b, num_images) == classes.view(b, 1)

    info = information.double()
    normalised_information = _safe_normalise(info[:, 1:-1], info[:, :1], info[:, -1:])
    informative = information[:, 0] < information[:, -1]

    def curve(score: torch.Tensor):
        points = _safe_normalise(score[:, 1:-1], score[:, :1], score[:, -1:])
        if monotone:
            points = points.cummax(dim=1).values
        grid, curves = pic_interpolate(normalised_information, points, num_points)
        valid = (score[:, -1] >= min_confidence) & informative & (score[:, 0] < score[:, -1])
        return points, grid, curves, torch.trapezoid(curves, grid, dim=1), valid

    sic_points, grid, sic_curves, sic_auc, sic_valid = curve(scores.double())
    aic_points, _, aic_curves, aic_auc, aic_valid = curve(correct.double())
    return PICResult(
        thresholds=torch.tensor(values, dtype=torch.float64, device=device),
        information=information,
        scores=scores,
        correct=correct,
        normalised_information=normalised_information,
        sic_points=sic_points,
        aic_points=aic_points,
        grid=grid,
        sic_curves=sic_curves,
        aic_curves=aic_curves,
        sic_auc=sic_auc,
        aic_auc=aic_auc,
        sic_valid=sic_valid,
        aic_valid=aic_valid,
    )


def aggregate_curves(
    curves: torch.Tensor, grid: torch.Tensor, method: str = "median"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointwise ``method`` ("median" as ``numpy.median``: the middle value or the mean of the
    two middle values; or "mean") of ``[N, G + 1]`` curves and the trapezoid AUC of the
    result. With ``N = 0`` the curve and AUC are NaN."""
    if method not in ("median", "mean"):
        raise ValueError(f"method must be 'median' or 'mean', got {method!r}")
    if curves.shape[0] == 0:
        nan = torch.full_like(grid, float("nan"))
        return nan, torch.tensor(float("nan"), dtype=grid.dtype, device=grid.device)
    if method == "mean":
        curve = curves.mean(dim=0)
    else:
        ordered = torch.sort(curves, dim=0).values
        n = ordered.shape[0]
        curve = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2.0
    return curve, torch.trapezoid(curve, grid)


def aggregate_pic(
    results: PICResult | Sequence[PICResult], method: str = "median"
) -> dict[str, torch.Tensor | int]:
    """Aggregate SIC / AIC over the valid images (reference ``aggregate_individual_pic_results``).

    ``results`` is one :class:`PICResult` or several (e.g. one per batch of a dataset, with
    the same thresholds and ``num_points``). At each grid point the ``method`` ("median", the
    paper's, or "mean") over the valid images' curves, then the trapezoid AUC of that curve —
    the reported SIC / AIC. Returns ``sic_auc``, ``aic_auc`` (0-d float64), ``grid``,
    ``sic_curve``, ``aic_curve`` (``[G + 1]``) and ``sic_count``, ``aic_count`` (images used).
    A curve type without any valid image gets a NaN curve and AUC and count 0.
    """
    parts = [results] if isinstance(results, PICResult) else list(results)
    if not parts:
        raise ValueError("results is empty; pass the PICResult of at least one batch")
    grid = parts[0].grid
    if any(not torch.equal(part.grid, grid) for part in parts):
        raise ValueError("results have different grids; compute them with the same num_points")
    sic = torch.cat([part.sic_curves[part.sic_valid] for part in parts])
    aic = torch.cat([part.aic_curves[part.aic_valid] for part in parts])
    sic_curve, sic_auc = aggregate_curves(sic, grid, method)
    aic_curve, aic_auc = aggregate_curves(aic, grid, method)
    return {
        "sic_auc": sic_auc,
        "aic_auc": aic_auc,
        "grid": grid,
        "sic_curve": sic_curve,
        "aic_curve": aic_curve,
        "sic_count": sic.shape[0],
        "aic_count": aic.shape[0],
    }
