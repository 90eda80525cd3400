"""ROAD: Remove And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and
Efficient Evaluation Strategy for Attribution Methods", ICML 2022).

**Noisy linear imputation** (the paper's debiasing removal operator). Each removed pixel
takes the weighted mean of its in-image 8 neighbours — 1/6 for the 4 direct and 1/12 for the
4 diagonal ones, the weights of absent (out-of-image) neighbours dropped from the
normaliser — where a removed neighbour enters with its own imputed value. For the removed pixels ``R`` of one channel this
is the sparse linear system ``s_i x_i − Σ_{j ∈ R} w_ij x_j = Σ_{j ∉ R} w_ij v_j`` (``s_i`` the
sum of pixel ``i``'s in-image neighbour weights, ``v`` the image), the system of the authors'
``NoisyLinearImputer`` (tleemann/road_evaluation, also in pytorch-grad-cam and Quantus).
Its matrix is symmetric and, where every 8-connected region of removed pixels touches a kept
pixel (always, unless every pixel is removed), positive definite, so it is solved here for
all images, channels and removal masks of a chunk at once by Jacobi-preconditioned conjugate
gradients on the device, the matrix applied as a masked 3×3 neighbour sum; iterations stop
when every system's residual ``‖b − Ax‖`` is at most ``tolerance · max(‖b‖, ‖b − Ax₀‖)``
(``x₀`` a pull-push fill of the removed pixels; default 1e-6, in
float64 for float64 images, else float32; the tests compare with SciPy's direct ``spsolve``).
Then ``noise_std`` · N(0, 1) is added to every removed pixel and channel, the draws a pure
function of the sample ``index`` (:func:`contrastive_saliency.index_random.index_normal`).

**MoRF / LeRF curves.** For each removal percentage ``p`` the ``⌊N·p/100⌋`` most (MoRF) or
least (LeRF) salient of the ``N`` pixels are removed (all channels) and imputed, and the model
scores the explained class on the imputed image: its softmax probability (default; the
authors' ``road_eval`` "average probability"), its logit, or ``accuracy`` (1 if the model
still predicts the class: the paper's accuracy curves when the class is the label). The
per-sample values are the means over the percentages (equally spaced percentages make them
the normalised area under the curve): ``morf`` (lower = more faithful), ``lerf`` (higher =
more faithful) and ``combined = (lerf − morf) / 2`` (higher = more faithful). The paper
reports the two curves and defines no single number; ``combined`` is pytorch-grad-cam's
``ROADCombined`` — its MoRF and LeRF averages are score differences to the unperturbed image,
which cancel in the combined score (docs/deviations.md).

Rules: pixels are ranked by saliency with ties in a uniformly random order keyed by the
sample ``index`` (:mod:`contrastive_saliency.metrics.functional.ties`), so a constant map
removes a random pixel set (the same on every process and in every batch); NaN ranks as the
least salient value (removed last by MoRF, first by LeRF). Percentages lie in ``(0, 100)``:
removing every pixel leaves the system singular (nothing to impute from).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from contrastive_saliency.index_random import STREAM_ROAD_NOISE, index_normal
from contrastive_saliency.metrics.functional.ties import pixel_ranks

DEFAULT_PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # pytorch-grad-cam's ROADCombined
SCORES = ("probability", "logit", "accuracy")
ORDERS = ("morf", "lerf")

_DIRECT, _DIAGONAL = 1.0 / 6.0, 1.0 / 12.0


def _blur(values: torch.Tensor) -> torch.Tensor:
    """The ``[1, 2, 1] ⊗ [1, 2, 1]`` sum over the 3×3 neighbourhood (zero outside the image)
    of ``[..., H, W]``, by shifted in-place adds (no padding copies)."""
    vertical = 2.0 * values
    vertical[..., 1:, :] += values[..., :-1, :]
    vertical[..., :-1, :] += values[..., 1:, :]
    blurred = 2.0 * vertical
    blurred[..., 1:] += vertical[..., :-1]
    blurred[..., :-1] += vertical[..., 1:]
    return blurred


def _neighbour_sum(values: torch.Tensor) -> torch.Tensor:
    """``Σ_j w_ij values_j`` over the in-image neighbours of every pixel of ``[..., H, W]``
    (zero outside the image). The 3×3 kernel ``[[1, 2, 1], [2, 0, 2], [1, 2, 1]] / 12`` is
    the separable ``[1, 2, 1] ⊗ [1, 2, 1]`` minus 4 at the centre, so two 3-tap passes of
    shifted adds compute it (much faster than a one-channel ``conv2d`` on CPU)."""
    rows = F.pad(values, (0, 0, 1, 1))
    vertical = rows[..., :-2, :] + 2.0 * rows[..., 1:-1, :] + rows[..., 2:, :]
    columns = F.pad(vertical, (1, 1))
    blurred = columns[..., :-2] + 2.0 * columns[..., 1:-1] + columns[..., 2:]
    return (blurred - 4.0 * values) * (1.0 / 12.0)


def _pull_push(images: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """A smooth fill of the removed pixels (pull-push over a 2× pyramid: each level's mean of
    the kept values, blended by the kept share with the coarser level's estimate): the
    conjugate gradients' start, giving the low frequencies CG is slowest to find."""
    levels = [(images * kept, kept)]
    while min(levels[-1][1].shape[-2:]) > 1:
        values, weights = levels[-1]
        levels.append(
            (F.avg_pool2d(values, 2, ceil_mode=True), F.avg_pool2d(weights, 2, ceil_mode=True))
        )
    values, weights = levels[-1]
    estimate = values.sum(dim=(2, 3), keepdim=True) / weights.sum(dim=(2, 3), keepdim=True)
    for values, weights in reversed(levels):
        coarse = F.interpolate(estimate, size=values.shape[-2:], mode="bilinear")
        estimate = values + (1.0 - weights) * coarse  # = w·mean_kept + (1 − w)·coarse
    return estimate


def linear_imputation(
    images: torch.Tensor,
    removed: torch.Tensor,
    tolerance: float = 1e-6,
    max_iterations: int | None = None,
) -> torch.Tensor:
    """The images ``[M, C, H, W]`` with the pixels ``removed`` (bool ``[M, H, W]``, all
    channels) replaced by the solution of the linear imputation system (module docstring),
    without noise; kept pixels are returned unchanged.

    Conjugate gradients, Jacobi-preconditioned, all ``M·C`` systems batched; stops when every
    relative residual is at most ``tolerance`` or after ``max_iterations`` (default
    ``4·(H + W) + 100``, with a warning naming the residual reached). A sample with every
    pixel removed is an error (its system is singular).
    """
    if images.dim() != 4 or removed.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"images must be [M, C, H, W] and removed [M, H, W], got {tuple(images.shape)} and "
            f"{tuple(removed.shape)}"
        )
    h, w = images.shape[-2:]
    removed = removed.to(device=images.device, dtype=torch.bool)
    if bool(removed.flatten(1).all(dim=1).any()):
        raise ValueError(
            "linear imputation needs at least one kept pixel per image (every pixel removed "
            "leaves nothing to impute from); use removal percentages below 100"
        )
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    original = images
    images = images.to(dtype)
    m, c = images.shape[:2]
    mask = removed.to(dtype).unsqueeze(1)  # [M, 1, H, W], 1 where imputed
    # 12 × the system, per image channel (S = M·C systems): diagonal 12·s_i on the removed
    # pixels, off-diagonal −(12 w_ij) = the [1, 2, 1] ⊗ [1, 2, 1] blur minus 4 at the centre.
    diagonal = 12.0 * _neighbour_sum(torch.ones(1, 1, h, w, dtype=dtype, device=images.device))
    rhs = (12.0 * mask * _neighbour_sum((1.0 - mask) * images)).reshape(m * c, h, w)
    solution = (mask * _pull_push(images, 1.0 - mask)).reshape(m * c, h, w)
    system_mask = mask.expand(m, c, h, w).reshape(m * c, h, w)
    diagonal = diagonal.reshape(1, h, w) + 4.0 * system_mask  # d = 12 s_i + 4 (the blur's 4)
    preconditioner = system_mask / (diagonal - 4.0).clamp_min(1.0)  # Jacobi: 1 / (12 s_i)

    def apply(x: torch.Tensor, on: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return on * (d * x - _blur(x))  # x is 0 off the removed pixels

    residual = rhs - apply(solution, system_mask, diagonal)
    # Relative to the larger of ‖b‖ and the start's residual (b = 0 when every kept neighbour
    # is 0: the solution is 0, reached from the start's residual).
    scale = torch.maximum(rhs.flatten(1).norm(dim=1), residual.flatten(1).norm(dim=1))
    scale = scale.clamp_min(torch.finfo(dtype).tiny)
    done = solution.clone()  # converged systems are copied out and dropped (compaction)
    active = torch.arange(m * c, device=images.device)
    on, d, z = system_mask, diagonal, preconditioner
    direction = residual * z
    rho = (residual * direction).sum(dim=(1, 2))
    limit = max_iterations if max_iterations is not None else 4 * (h + w) + 100
    tiny = torch.finfo(dtype).tiny
    iteration = 0
    while True:
        if iteration % 8 == 0 or iteration >= limit:  # one host sync per 8 iterations
            relative = residual.flatten(1).norm(dim=1) / scale
            converged = relative <= tolerance
            if bool(converged.any()) or iteration >= limit:
                done[active] = solution
                keep = ~converged
                if not bool(keep.any()) or iteration >= limit:
                    break
                active, solution, residual, direction = (
                    t[keep] for t in (active, solution, residual, direction)
                )
                rho, scale, on, z = rho[keep], scale[keep], on[keep], z[keep]
                d = diagonal.expand(m * c, h, w)[active] if d.shape[0] > 1 else d
        product = apply(direction, on, d)
        curvature = (direction * product).sum(dim=(1, 2))
        step = torch.where(curvature > 0, rho / curvature.clamp_min(tiny), 0.0)[:, None, None]
        solution = solution + step * direction
        residual = residual - step * product
        preconditioned = residual * z
        rho_next = (residual * preconditioned).sum(dim=(1, 2))
        beta = torch.where(rho > 0, rho_next / rho.clamp_min(tiny), 0.0)[:, None, None]
        direction = preconditioned + beta * direction
        rho = rho_next
        iteration += 1
    if iteration >= limit and not bool(converged.all()):
        warnings.warn(
            f"linear imputation stopped after {limit} conjugate-gradient iterations at a "
            f"relative residual of {float(relative.max()):.2e} (tolerance {tolerance:.0e}); "
            "raise max_iterations for an exact solve",
            RuntimeWarning,
            stacklevel=2,
        )
    imputed = torch.where(removed.unsqueeze(1), done.view(m, c, h, w), images)
    return imputed.to(original.dtype)


def _noise_scale(
    noise_std: float, pixel_std: Sequence[float] | None, channels: int, like: torch.Tensor
) -> torch.Tensor:
    """Per-channel noise σ ``[1, C, 1, 1]`` in the images' space: ``noise_std`` there, or
    ``noise_std / pixel_std[c]`` when the noise is given in pixel units (normalised images)."""
    if pixel_std is None:
        return torch.full(
            (1, channels, 1, 1), float(noise_std), dtype=like.dtype, device=like.device
        )
    std = torch.as_tensor(tuple(pixel_std), dtype=like.dtype, device=like.device).reshape(-1)
    if std.numel() not in (1, channels):
        raise ValueError(
            f"pixel_std needs 1 or {channels} values (one per channel), got {std.numel()}"
        )
    return (noise_std / std).expand(channels).view(1, channels, 1, 1)


def noisy_linear_imputation(
    images: torch.Tensor,
    removed: torch.Tensor,
    noise_std: float = 0.01,
    *,
    indices: torch.Tensor,
    draw: int | torch.Tensor = 0,
    seed: int = 0,
    pixel_std: Sequence[float] | None = None,
    tolerance: float = 1e-6,
    max_iterations: int | None = None,
) -> torch.Tensor:
    """:func:`linear_imputation` plus ``noise_std`` · N(0, 1) on every removed pixel and
    channel. The noise of image ``m`` is a pure function of (``seed``, its sample
    ``indices[m]``, ``draw[m]``, the pixel position): ``draw`` (one number, or one per image)
    numbers the independent perturbations of one sample (ROAD: order × percentage). With
    ``pixel_std`` (the normalisation's per-channel std) ``noise_std`` is in pixel units, as in
    the authors' code that imputes before normalising; without it, in the images' space (as
    pytorch-grad-cam and Quantus)."""
    imputed = linear_imputation(images, removed, tolerance, max_iterations)
    if noise_std == 0:
        return imputed
    m, c, h, w = images.shape
    indices = indices.to(images.device).reshape(-1)
    draws = torch.as_tensor(draw, device=images.device).long().expand(m)
    noise = torch.empty(m, c, h, w, dtype=torch.float32, device=images.device)
    for value in draws.unique().tolist():  # one counter-based stream per draw
        rows = (draws == value).nonzero()[:, 0]
        noise[rows] = index_normal(
            indices[rows], (c, h, w), seed, STREAM_ROAD_NOISE, value * c * h * w
        )
    noise = noise.to(imputed.dtype) * _noise_scale(noise_std, pixel_std, c, imputed)
    return imputed + removed.to(imputed.device).unsqueeze(1) * noise


@dataclass(frozen=True)
class RoadResult:
    """Per-sample ROAD: ``morf_curve`` / ``lerf_curve`` ``[B, P]`` (the class score at each
    removal percentage; ``None`` for an order not computed), their means ``morf`` / ``lerf``
    ``[B]`` and ``combined`` ``[B]`` = ``(lerf − morf) / 2``; ``percentages`` ``[P]``."""

    percentages: torch.Tensor
    morf_curve: torch.Tensor | None
    lerf_curve: torch.Tensor | None

    def _curve(self, order: str) -> torch.Tensor:
        curve = self.morf_curve if order == "morf" else self.lerf_curve
        if curve is None:
            raise ValueError(f"the {order} curve was not computed; pass orders including {order!r}")
        return curve

    @property
    def morf(self) -> torch.Tensor:
        return self._curve("morf").mean(dim=1)

    @property
    def lerf(self) -> torch.Tensor:
        return self._curve("lerf").mean(dim=1)

    @property
    def combined(self) -> torch.Tensor:
        return (self.lerf - self.morf) / 2


def check_percentages(percentages: Sequence[float]) -> tuple[float, ...]:
    """The removal percentages as floats, each in ``(0, 100)``; an error names the bad value."""
    values = tuple(percentages) if not isinstance(percentages, str) else ()
    if not values or any(
        isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p < 100 or math.isnan(p)
        for p in values
    ):
        raise ValueError(
            f"percentages must be a non-empty list of removal percentages in (0, 100), got "
            f"{percentages!r} (100 % would remove every pixel, leaving nothing to impute from)"
        )
    return tuple(float(p) for p in values)


def _class_scores(logits: torch.Tensor, classes: torch.Tensor, score: str) -> torch.Tensor:
    if score == "probability":
        return logits.float().softmax(dim=1).gather(1, classes[:, None])[:, 0]
    if score == "logit":
        return logits.float().gather(1, classes[:, None])[:, 0]
    return (logits.argmax(dim=1) == classes).float()


@torch.no_grad()
def road(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    noise_std: float = 0.01,
    score: str = "probability",
    batch_size: int = 64,
    *,
    indices: torch.Tensor,
    seed: int = 0,
    pixel_std: Sequence[float] | None = None,
    tolerance: float = 1e-6,
    orders: Sequence[str] = ORDERS,
) -> RoadResult:
    """The MoRF and / or LeRF curves (``orders``) of ``classes`` ``[B]`` for ``maps`` ``[B, H, W]`` on ``images``
    ``[B, C, H, W]`` (module docstring), ties and noise keyed by the samples' ``indices``.

    The ``O·P·B`` perturbed images (``O`` orders) are imputed and scored in chunks of at most ``batch_size``
    (any mix of orders, percentages and samples; one batched conjugate-gradient solve and one
    forward pass per chunk) in the model's current mode, so ``batch_size`` bounds the memory
    and changes nothing else. Perturbation ``(order o, percentage j)`` of a sample draws its
    noise as ``draw = o·P + j`` (:func:`noisy_linear_imputation`; ``o`` = 0 for MoRF, 1 for
    LeRF, whichever orders are computed, so a curve does not depend on ``orders``).
    """
    percentages = check_percentages(percentages)
    if isinstance(orders, str) or not orders or any(o not in ORDERS for o in orders):
        raise ValueError(f"orders must be a non-empty subset of {ORDERS}, got {orders!r}")
    order_codes = sorted({ORDERS.index(o) for o in orders})
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    b, _, h, w = images.shape
    if maps.shape != (b, h, w) or classes.numel() != b:
        raise ValueError(
            f"maps must be [B, H, W] = {(b, h, w)} and classes [B] for images "
            f"{tuple(images.shape)}, got {tuple(maps.shape)} and {tuple(classes.shape)}"
        )
    device = images.device
    num_pixels = h * w
    counts = torch.tensor(
        [math.floor(num_pixels * p / 100) for p in percentages], device=device
    )  # ⌊N·p/100⌋ as the authors' int(W·H·p) and Quantus
    ranks = pixel_ranks(maps.reshape(b, num_pixels), indices.to(maps.device)).to(device)
    classes = classes.reshape(b).to(device)
    indices = indices.reshape(b).to(device)
    num = len(percentages)
    codes = torch.tensor(order_codes, device=device)
    scores = torch.empty(len(order_codes) * num * b, device=device)
    # Item t is (order codes[t // (P·B)], percentage (t // B) % P, sample t % B).
    for items in torch.arange(scores.numel(), device=device).split(batch_size):
        order, step, sample = codes[items // (num * b)], (items // b) % num, items % b
        count = counts[step].view(-1, 1)
        item_ranks = ranks[sample]
        removed = torch.where(
            (order == 0).view(-1, 1), item_ranks < count, item_ranks >= num_pixels - count
        ).view(-1, h, w)
        imputed = noisy_linear_imputation(
            images[sample], removed, noise_std, indices=indices[sample],
            draw=order * num + step, seed=seed, pixel_std=pixel_std, tolerance=tolerance,
        )  # fmt: skip
        logits = model(imputed.contiguous(memory_format=torch.channels_last))
        scores[items] = _class_scores(logits, classes[sample], score)
    curves = dict(zip(order_codes, scores.view(-1, num, b).permute(0, 2, 1), strict=True))
    return RoadResult(
        percentages=torch.tensor(percentages), morf_curve=curves.get(0), lerf_curve=curves.get(1)
    )
