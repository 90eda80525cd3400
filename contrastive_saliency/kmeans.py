"""Batched k-means++ (Arthur & Vassilvitskii, SODA 2007) with Lloyd iterations, in pure torch.

Every image of a batch is clustered independently but in the same tensor operations, on the
points' device: the only Python loops run over seeding steps and Lloyd iterations, never over
images. ClusCAM (``cluscam.md`` Sec. 3.4, Alg. 1 line 3) groups the channel maps of each image
with it; scikit-learn's ``KMeans(init="k-means++")`` is the reference code's clusterer.
"""

from __future__ import annotations

import torch

from contrastive_saliency.errors import ConfigurationError


def kmeans(
    points: torch.Tensor,
    k: int,
    iterations: int = 300,
    seed: int | torch.Generator = 0,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each row ``points[b]`` (``[N, D]``) into ``k`` groups minimising the inertia
    ``Σ_i ‖x_i − c_{a(i)}‖²``; returns ``(assignments LongTensor[B, N], centres [B, k, D])``.

    Seeding (k-means++, D² sampling): the first centre is a uniformly drawn point, each next
    one is drawn with probability ``D(x)² / Σ D²``, ``D(x)`` the distance to the nearest chosen
    centre (the standard single-trial rule; scikit-learn's greedy variant tries
    ``2 + log k`` candidates per step). Lloyd: ``a(i) = argmin_j ‖x_i − c_j‖²`` then
    ``c_j = mean{x_i : a(i) = j}``, at most ``iterations`` times; an image stops (and is frozen)
    once its assignments repeat or its centres move by ``Σ_j ‖Δc_j‖² ≤ tol · mean_d var(x_d)``
    (scikit-learn's relative tolerance). The returned assignments are those of the last Lloyd
    step and each non-empty cluster's centre is exactly the mean of its members (ClusCAM
    Eq. 4); ``iterations=0`` returns the seeds and the nearest-seed assignment.

    Determinism: ``seed`` (an int, or a ``torch.Generator``, which the call advances) drives
    one uniform draw per seeding step, shared by all images, so row ``b`` of a batch gets
    exactly the clustering it gets alone with the same seed; an int seed draws on the CPU, so
    the draws are the same whatever the points' device. Ties go to the lowest
    index (``argmin``, stable sorts).

    Duplicates and empty clusters: a chosen point's D² is set to exactly 0, so it is never
    drawn again unless every point coincides with a chosen centre, in which case the draw is
    uniform (a duplicate centre). A cluster left empty by a Lloyd step is moved onto the
    point farthest from its own centre (the e-th empty cluster, by index, takes the e-th
    farthest point, as scikit-learn relocates); if that point already sits on a centre
    (fewer than ``k`` distinct points) the cluster keeps its previous centre and stays empty.
    """
    _check_arguments(points, k, iterations, tol)
    generator = seed if isinstance(seed, torch.Generator) else _generator(seed)
    data = points.float() if points.dtype not in (torch.float32, torch.float64) else points
    # Distances are translation invariant; centring keeps ‖x‖² − 2x·c + ‖c‖² accurate.
    offset = data.mean(dim=1, keepdim=True)
    data = data - offset
    centres = kmeans_plus_plus(data, k, generator)
    tolerance = tol * data.var(dim=1, unbiased=False).mean(dim=1)  # [B]
    if iterations == 0:
        return nearest_centres(data, centres)[0], (centres + offset).to(points.dtype)
    previous: torch.Tensor | None = None
    converged = torch.zeros(data.shape[0], dtype=torch.bool, device=data.device)
    for _ in range(iterations):
        assignments, distances = nearest_centres(data, centres)
        updated = _lloyd_update(data, assignments, distances, centres)
        shift = (updated - centres).pow(2).sum(dim=(1, 2))
        done = shift <= tolerance
        if previous is not None:
            assignments = torch.where(converged[:, None], previous, assignments)
            done |= (assignments == previous).all(dim=1)
        centres = torch.where(converged[:, None, None], centres, updated)
        converged |= done
        previous = assignments
        if bool(converged.all()):
            break
    return assignments, (centres + offset).to(points.dtype)


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeds ``[B, k, D]`` of ``points`` ``[B, N, D]`` (D² sampling, see
    :func:`kmeans`): one uniform ``u`` from ``generator`` per step, shared by all rows, picks
    in each row the point whose cumulative-weight interval contains ``u · Σ weights``
    (inverse-CDF sampling, so zero-weight points are never picked)."""
    batch, count, _ = points.shape
    rows = torch.arange(batch, device=points.device)
    first = min(int(_uniform(generator) * count), count - 1)
    chosen = torch.full((batch,), first, dtype=torch.long, device=points.device)
    centres = [points[rows, chosen]]
    nearest = (points - centres[0][:, None]).pow(2).sum(dim=2)
    nearest[rows, chosen] = 0.0
    for _ in range(1, k):
        total = nearest.sum(dim=1, keepdim=True)
        # Every point sits on a chosen centre: draw uniformly (a duplicate centre).
        weights = torch.where(total > 0, nearest, torch.ones_like(nearest))
        cumulative = weights.cumsum(dim=1)
        target = _uniform(generator) * cumulative[:, -1:]
        chosen = torch.searchsorted(cumulative, target, right=True).squeeze(1)
        chosen = chosen.clamp_max(count - 1)
        centres.append(points[rows, chosen])
        distance = (points - centres[-1][:, None]).pow(2).sum(dim=2)
        nearest = torch.minimum(nearest, distance)
        nearest[rows, chosen] = 0.0
    return torch.stack(centres, dim=1)


def nearest_centres(
    points: torch.Tensor, centres: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index ``[B, N]`` of each point's nearest centre (lowest index on ties) and the squared
    distance ``[B, N]`` to it, from ``‖x‖² − 2 x·c + ‖c‖²`` (clamped at 0)."""
    squared = (
        points.pow(2).sum(dim=2, keepdim=True)
        - 2 * torch.bmm(points, centres.transpose(1, 2))
        + centres.pow(2).sum(dim=2)[:, None, :]
    ).clamp_min(0)
    distances, indices = squared.min(dim=2)
    return indices, distances


def inertia(points: torch.Tensor, assignments: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``Σ_i ‖x_i − c_{a(i)}‖²`` per row: ``[B]``."""
    assigned = centres.gather(1, assignments[..., None].expand(-1, -1, centres.shape[2]))
    return (points - assigned).pow(2).sum(dim=(1, 2))


def _lloyd_update(
    points: torch.Tensor,
    assignments: torch.Tensor,
    distances: torch.Tensor,
    centres: torch.Tensor,
) -> torch.Tensor:
    """Cluster means ``[B, k, D]``; empty clusters relocated as documented in :func:`kmeans`."""
    k = centres.shape[1]
    one_hot = torch.nn.functional.one_hot(assignments, k).to(points.dtype)  # [B, N, k]
    counts = one_hot.sum(dim=1)  # [B, k]
    means = torch.bmm(one_hot.transpose(1, 2), points) / counts.clamp_min(1)[..., None]
    empty = counts == 0
    if not bool(empty.any()):
        return means
    farthest = distances.argsort(dim=1, descending=True, stable=True)  # [B, N]
    rank = (empty.long().cumsum(dim=1) - 1).clamp_min(0)  # e-th empty cluster → e-th point
    candidate = farthest.gather(1, rank)  # [B, k]; rank < k <= N
    movable = empty & (distances.gather(1, candidate) > 0)
    relocated = points.gather(1, candidate[..., None].expand(-1, -1, points.shape[2]))
    kept = torch.where(empty[..., None], centres, means)
    return torch.where(movable[..., None], relocated, kept)


def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigurationError(
            f"seed must be an int or a torch.Generator, got {type(seed).__name__}"
        )
    return torch.Generator().manual_seed(seed)


def _uniform(generator: torch.Generator) -> float:
    """One draw from U[0, 1) (a CPU generator gives the same stream whatever the points' device)."""
    return float(torch.rand((), generator=generator, dtype=torch.float64, device=generator.device))


def _check_arguments(points: torch.Tensor, k: int, iterations: int, tol: float) -> None:
    if not isinstance(points, torch.Tensor) or points.dim() != 3:
        raise ConfigurationError(
            f"points must be a tensor [B, N, D], got shape {tuple(getattr(points, 'shape', ()))}"
        )
    if not points.is_floating_point():
        raise ConfigurationError(f"points must be floating point, got {points.dtype}")
    count = points.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= count:
        raise ConfigurationError(
            f"k must be an int in [1, N] = [1, {count}] (points per row), got {k!r}"
        )
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ConfigurationError(f"iterations must be an int >= 0, got {iterations!r}")
    if not tol >= 0:
        raise ConfigurationError(f"tol must be >= 0, got {tol!r}")
    if not bool(torch.isfinite(points).all()):
        raise ConfigurationError("points contain NaN or infinite values")
