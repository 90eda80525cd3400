"""Random draws that are a pure function of the sample ``index``: the same values on every
process, rank, device and batch composition, computed batched on the device.

A counter-based generator (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011): the value at (``seed``, ``stream``, sample ``index``, position ``p``) is a hash of
those four integers, so no generator state is carried from one sample or batch to the next and
no per-sample Python loop or ``torch.Generator`` is needed. The hash is an integer mixer
with the structure of Wellons' ``lowbias32`` (a murmur3-style finaliser; C. Wellons,
"Prospecting for hash functions", 2018), applied in int64 arithmetic that never overflows,
chained over the four keys. For a fixed (seed, stream, index) it is a bijection of the
position, so ordering a row by its hashes is a permutation (the tie-breaking of
:mod:`contrastive_saliency.metrics.functional.ties`). Indices are
folded to 32 bits (``index ⊕ hash(index >> 32)``); splits beyond 2³² samples may share
streams.

Uniform values take the top 24 bits (``[0, 1)`` on a 2⁻²⁴ grid, exact in float32); normal
values are a Box–Muller transform of two of them (:func:`index_normal`).
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF

STREAM_RANDOM_MAP = 0  # the ``random`` reference map (contrastive_saliency.methods.reference_maps)
STREAM_RANDOM_OTHER_CLASS = 1  # Random Logit's other class (random_other_classes)
STREAM_TIE_BREAKING = 2  # tie-break keys of masks and pixel orders (metrics.functional.ties)
# GradientSHAP's draws (contrastive_saliency.methods.gradient_shap): baseline choice, path point, noise.
STREAM_SHAP_BASELINE = 10
STREAM_SHAP_ALPHA = 11
STREAM_SHAP_NOISE = 12
# Quantus-style faithfulness metrics (contrastive_saliency.metrics.functional.faithfulness):
# faithfulness correlation's random pixel subsets, the "uniform" perturbation baselines.
STREAM_PIXEL_SUBSETS = 20
STREAM_PERTURBATION_BASELINE = 21
STREAM_SENSITIVITY = 22  # Max-/Avg-Sensitivity's input noise (metrics.functional.sensitivity)
STREAM_ROAD_NOISE = 23  # ROAD's imputation noise (metrics.functional.road)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash of int64 values in ``[0, 2³²)`` (xor-shift-multiply with
    the structure of Wellons' ``lowbias32``; multipliers below 2³¹, so every product of a
    32-bit value fits in int64 without overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def _key(value: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.int64, device=device)
    return (value & _MASK32) ^ _mix32((value >> 32) & _MASK32)


def index_hash(
    indices: torch.Tensor, positions: torch.Tensor, seed: int = 0, stream: int = 0
) -> torch.Tensor:
    """32-bit hashes ``[B, P]`` (int64 in ``[0, 2³²)``) of every (sample index, position) pair.

    ``indices`` ``[B]`` are the samples' ``index``; ``positions`` ``[P]`` number the draws within
    a sample (pixels, classes), the same for every sample, or ``[B, P]``, each sample's own
    (these must lie in ``[0, 2³²)``, where they hash as the ``[P]`` form does; they are taken
    modulo 2³², which saves the folding pass). ``seed`` selects the run, ``stream`` the purpose
    (so two consumers with the same seed draw independent values)."""
    device = indices.device
    state = _mix32(_key(seed, device) ^ 0x9E3779B9)
    state = _mix32(state ^ _key(stream, device))
    state = _mix32(state ^ _key(indices.long(), device))[:, None]  # [B, 1]
    if positions.dim() == 2:
        return _mix32(state ^ (positions.long().to(device) & _MASK32))
    return _mix32(state ^ _key(positions.long().to(device), device)[None, :])


def index_subsets(
    indices: torch.Tensor,
    draws: torch.Tensor,
    num_positions: int,
    size: int,
    seed: int = 0,
    stream: int = STREAM_PIXEL_SUBSETS,
) -> torch.Tensor:
    """One uniformly random ``size``-subset of ``range(num_positions)`` per row, ``[P, size]``
    (int64, in no particular order): row ``r`` is a pure function of ``(seed, stream,
    indices[r], draws[r])`` — the sample's ``index`` and the number of the draw — so any mix of
    samples and draws can be generated in any batch.

    The positions are ordered by their hash under a per-row state and the ``size`` largest
    are kept; the hash is a bijection of the position, so the keys of a row are distinct and
    the subset has exactly ``size`` distinct positions."""
    if indices.shape != draws.shape or indices.dim() != 1:
        raise ValueError(
            f"indices and draws must be [P] alike, got {tuple(indices.shape)} and "
            f"{tuple(draws.shape)}"
        )
    if not 0 <= size <= num_positions:
        raise ValueError(f"size must lie in [0, {num_positions}], got {size}")
    device = indices.device
    state = _mix32(_key(seed, device) ^ 0x9E3779B9)
    state = _mix32(state ^ _key(stream, device))
    state = _mix32(state ^ _key(indices.long(), device))
    state = _mix32(state ^ _key(draws.long().to(device), device))[:, None]  # [P, 1]
    positions = torch.arange(num_positions, dtype=torch.int64, device=device)
    keys = _mix32(state ^ positions[None, :])
    return torch.topk(keys, size, dim=1, sorted=False).indices


def index_uniform(
    indices: torch.Tensor,
    shape: tuple[int, ...],
    seed: int = 0,
    stream: int = 0,
    start: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Uniform values in ``[0, 1)``, ``[B, *shape]`` float32: position ``start + p`` (``p`` in
    raster order) of sample ``indices[b]`` depends only on ``(seed, stream, indices[b],
    start + p)``, so a long stream can be drawn in consecutive pieces (``start``; a tensor
    ``[B]`` gives each row its own start, so rows of different pieces come in one call; then
    ``start + count`` must not exceed 2³²)."""
    count = math.prod(shape)
    positions = torch.arange(count, device=indices.device)
    if torch.is_tensor(start):
        positions = start.to(indices.device).long().reshape(-1, 1) + positions
    else:
        positions = positions + start
    bits = index_hash(indices.reshape(-1), positions, seed, stream) >> 8
    return (bits.float() / float(1 << 24)).view(indices.numel(), *shape)


def index_normal(
    indices: torch.Tensor,
    shape: tuple[int, ...],
    seed: int = 0,
    stream: int = 0,
    start: int = 0,
) -> torch.Tensor:
    """Standard normal values, ``[B, *shape]`` float32, a pure function of ``(seed, stream,
    indices[b], position)`` as :func:`index_uniform`: value ``q`` is the Box–Muller transform
    ``sqrt(−2 ln(1 − u₁)) · cos(2π u₂)`` of the uniforms at positions ``2q`` and ``2q + 1``
    (``1 − u₁ ∈ [2⁻²⁴, 1]``, so values are finite, ``|z| ≤ 5.8``)."""
    count = math.prod(shape)
    uniforms = index_uniform(indices, (count, 2), seed, stream, 2 * start)
    radius = (-2.0 * torch.log1p(-uniforms[..., 0])).sqrt()
    return (radius * torch.cos(2.0 * math.pi * uniforms[..., 1])).view(indices.numel(), *shape)


def random_other_classes(
    indices: torch.Tensor, excluded: torch.Tensor, num_classes: int, seed: int = 0
) -> torch.Tensor:
    """One class per sample drawn uniformly from the ``num_classes − 1`` classes other than
    ``excluded[b]``, seeded by the sample index, ``LongTensor[B]``.

    As Quantus' ``RandomLogit`` (``evaluate_batch``): an offset ``o`` uniform in
    ``0 … N − 2`` indexes the classes with the excluded one removed, i.e. the class is
    ``o + 1[o ≥ excluded]``. Quantus draws ``o`` with ``np.random.seed(seed)`` once per batch
    (so it depends on the batch composition); here ``o`` is a function of the sample index.
    Stream :data:`STREAM_RANDOM_OTHER_CLASS` is reserved for this draw. Needs ``num_classes ≥ 2``."""
    if num_classes < 2:
        raise ValueError(f"a random other class needs at least 2 classes, got {num_classes}")
    uniform = index_uniform(indices, (1,), seed, STREAM_RANDOM_OTHER_CLASS)[:, 0]
    offsets = (uniform.double() * (num_classes - 1)).long().clamp(max=num_classes - 2)
    excluded = excluded.to(offsets.device).long()
    return offsets + (offsets >= excluded).long()
