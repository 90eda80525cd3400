"""Complexity of a map alone (no model): sparseness (Gini index) and complexity (entropy).

Both read the map's magnitudes ``|E|`` (Quantus' default ``abs=True``) as a distribution over
its ``N`` pixels and are invariant to the map's scale.

* **Sparseness** (Chalasani et al., ICML 2020, Sec. 3; Quantus ``Sparseness``): the Gini index
  of the sorted magnitudes ``v_1 ≤ … ≤ v_N``,
  ``G = Σ_k (2k − N − 1) v_k / (N Σ_k v_k)``, in ``[0, (N − 1)/N]``: 0 for a constant map,
  ``(N − 1)/N`` for a one-hot map. Higher = sparser (more concise).
* **Complexity** (Bhatt et al., IJCAI 2020, Sec. 4.3; Quantus ``Complexity``): the entropy of
  ``p = |E| / Σ|E|``, ``H = −Σ p log p`` (natural log, ``0 log 0 = 0``), in ``[0, log N]``:
  0 for a one-hot map, ``log N`` for a constant map. Lower = less complex.

Rules: ties do not matter (both are symmetric in the pixels); an all-zero map prefers no pixel
and scores as a constant map (sparseness 0, complexity ``log N``); a NaN pixel makes the
sample's value NaN. Quantus adds ``1e-7`` to every normalised magnitude (sparseness) or
``1e-12`` inside the log (complexity); the exact formulas above differ from it by less than
those epsilons' effect (tests/test_complexity_metrics.py checks both).
"""

from __future__ import annotations

import math

import torch


def sparseness(maps: torch.Tensor) -> torch.Tensor:
    """Gini index of ``|maps|`` per sample: ``maps`` ``[B, ...]`` → ``[B]``."""
    values, _ = maps.flatten(1).abs().sort(dim=1)
    count = values.shape[1]
    rank = torch.arange(1, count + 1, device=values.device, dtype=values.dtype)
    total = values.sum(dim=1)
    gini = ((2 * rank - count - 1) * values).sum(dim=1) / (count * total)
    return torch.where(total == 0, torch.zeros_like(gini), gini)


def complexity(maps: torch.Tensor) -> torch.Tensor:
    """Entropy of ``|maps| / Σ|maps|`` per sample: ``maps`` ``[B, ...]`` → ``[B]``."""
    values = maps.flatten(1).abs()
    total = values.sum(dim=1, keepdim=True)
    share = values / total
    entropy = -torch.special.xlogy(share, share).sum(dim=1)
    uniform = torch.full_like(entropy, math.log(values.shape[1]))
    return torch.where(total[:, 0] == 0, uniform, entropy)
