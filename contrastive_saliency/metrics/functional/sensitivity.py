"""Max- and Avg-Sensitivity: how much a map changes when the input moves a little (Yeh et al.,
"On the (in)fidelity and sensitivity of explanations", NeurIPS 2019, Sec. 3 and Eq. 4
``SENS_MAX(Φ, f, x, r) = max_{‖y − x‖ ≤ r} ‖Φ(f, y) − Φ(f, x)‖``; Quantus ``MaxSensitivity`` /
``AvgSensitivity``).

Monte Carlo, as Yeh et al. and Quantus: ``nr_samples`` draws ``δ_s`` uniform in the L∞ ball of
radius ``radius`` (each element uniform in ``[−r, r)``), re-explain the explained class on
``x + δ_s``, and per draw

    ``s_s = ‖Φ(x + δ_s) − Φ(x)‖ / ‖Φ(x)‖``   (``normalise=True``, Quantus' default)
    ``s_s = ‖Φ(x + δ_s) − Φ(x)‖``             (``normalise=False``, Yeh et al.'s Eq. 4)

with ``‖·‖`` the Frobenius (L2 of the flattened map, ``norm="fro"``, Quantus' ``fro_norm``) or
the max-abs norm (``norm="linf"``, Quantus' ``linf_norm``), the same norm in numerator and
denominator. Max-Sensitivity is ``max_s s_s``, Avg-Sensitivity ``mean_s s_s``; lower = a more
robust map. The noise is added in the space of the images given (the model's normalised input,
as Quantus perturbs ``x_batch`` as given), so ``radius`` is in those units.

Batched and reproducible: all ``B · nr_samples`` perturbed images go through ``explain`` in
calls of at most ``batch_size`` images, on the images' device; the noise of draw ``s`` of a
sample is a pure function of ``(seed, sample index, s)``
(:func:`contrastive_saliency.index_random.index_uniform`, stream
:data:`STREAM_SENSITIVITY`), so a sample scores the same in any batch, on any process.

Rules:

* an original map that is all zero: a draw whose map is all zero too scores 0 (nothing
  changed); a draw whose map is not scores ``inf`` (an unbounded relative change; Quantus: the
  same ``inf``, and NaN for 0/0, which its ``nanmax`` / ``nanmean`` then skip). A constant
  non-zero map is an ordinary map (its norm is positive);
* NaN propagates: a NaN in the original map or in any re-explained map makes the sample's
  value NaN (Quantus' ``nanmax`` / ``nanmean`` skip NaN draws; hiding a broken map is not
  done here);
* ``radius = 0`` gives 0 for a deterministic method (``x + 0 = x``).

``explain(images [N, C, H, W], classes [N, ...], rows [N]) → maps [N, ...]``: the explanation
method on other images; ``rows[n]`` is the row of the original batch that image ``n`` perturbs
(so the method gets that sample's batch fields, e.g. its ``index``), ``classes`` are those rows
of ``classes``, and the maps have the shape of those rows of ``maps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from contrastive_saliency.checks import check_batch_size, check_positive_int
from contrastive_saliency.index_random import STREAM_SENSITIVITY, index_uniform

NORMS = ("fro", "linf")
Explain = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_sensitivity_options(nr_samples: object, radius: object, norm: object) -> None:
    """A ``ValueError`` (:class:`~contrastive_saliency.errors.ConfigurationError`) naming a
    wrong ``nr_samples`` (a positive integer), ``radius`` (a finite number ≥ 0) or ``norm``."""
    check_positive_int(nr_samples, "nr_samples (perturbed images per sample)")
    valid = isinstance(radius, int | float) and not isinstance(radius, bool)
    if not valid or not math.isfinite(radius) or radius < 0:
        raise ValueError(
            f"radius (half-width of the uniform noise, in the model's input units) must be a "
            f"finite number ≥ 0, got {radius!r}"
        )
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def _norm(values: torch.Tensor, norm: str) -> torch.Tensor:
    flat = values.flatten(1).double()
    return flat.norm(dim=1) if norm == "fro" else flat.abs().amax(dim=1)


def sensitivity_noise(
    indices: torch.Tensor, draws: torch.Tensor, shape: tuple[int, ...], radius: float, seed: int
) -> torch.Tensor:
    """The noise ``[N, *shape]`` of draw ``draws[n]`` of the sample with index ``indices[n]``:
    uniform in ``[−radius, radius)``, a pure function of ``(seed, index, draw)``: positions
    ``draw · size … (draw + 1) · size − 1`` of the sample's stream, which must end below 2³²."""
    start = draws.to(indices.device).long() * math.prod(shape)  # < 2³²: sensitivity_samples
    uniform = index_uniform(indices, shape, seed, STREAM_SENSITIVITY, start=start)
    return (2.0 * uniform - 1.0) * radius


def sensitivity_samples(
    explain: Explain,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    indices: torch.Tensor,
    nr_samples: int = 200,
    radius: float = 0.2,
    norm: str = "fro",
    normalise: bool = True,
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Per sample and draw, the sensitivity ``s_s`` (module docstring), ``[B, nr_samples]``
    float64.

    ``images`` ``[B, C, H, W]``; ``maps`` ``[B, ...]`` the method's maps of ``classes``
    ``[B, ...]`` on ``images``; ``indices`` ``[B]`` the samples' ``index`` (the noise's seed);
    ``batch_size``: perturbed images per ``explain`` call."""
    check_sensitivity_options(nr_samples, radius, norm)
    batch_size = check_batch_size(batch_size, "sensitivity", "perturbed images per explanation")
    count = images.shape[0]
    if maps.shape[0] != count or classes.shape[0] != count or indices.shape[0] != count:
        raise ValueError(
            f"images, maps, classes and indices must share the batch size; got "
            f"{count}, {maps.shape[0]}, {classes.shape[0]}, {indices.shape[0]}"
        )
    if nr_samples * images[0].numel() > 2**32:
        raise ValueError(
            f"nr_samples={nr_samples} draws of {images[0].numel()} values exceed the 2³² "
            "positions of a sample's noise stream; use fewer nr_samples"
        )
    indices = indices.to(images.device)
    maps = maps.detach()
    reference = _norm(maps, norm)
    numerators = torch.empty(count * nr_samples, dtype=torch.float64, device=maps.device)
    # draw-major rows: row t perturbs sample t % B with draw t // B
    for start in range(0, count * nr_samples, batch_size):
        flat = torch.arange(
            start, min(start + batch_size, count * nr_samples), device=images.device
        )
        rows, draws = flat % count, flat // count
        noise = sensitivity_noise(indices[rows], draws, tuple(images.shape[1:]), radius, seed)
        perturbed = images[rows] + noise.to(images.dtype)
        explained = explain(perturbed, classes[rows], rows).detach()
        numerators[start : start + rows.shape[0]] = _norm(
            explained.to(maps.dtype) - maps[rows], norm
        )
    numerators = numerators.view(nr_samples, count).T.to(reference.device)
    if not normalise:
        return numerators
    ratio = numerators / reference[:, None]
    unchanged_zero = (reference[:, None] == 0) & (numerators == 0)
    return torch.where(unchanged_zero, torch.zeros_like(ratio), ratio)


def max_sensitivity(explain: Explain, images, maps, classes, indices, **options) -> torch.Tensor:
    """Max-Sensitivity ``[B]``: the largest :func:`sensitivity_samples` of each sample (NaN if
    any draw is NaN)."""
    return sensitivity_samples(explain, images, maps, classes, indices, **options).amax(dim=1)


def avg_sensitivity(explain: Explain, images, maps, classes, indices, **options) -> torch.Tensor:
    """Avg-Sensitivity ``[B]``: the mean :func:`sensitivity_samples` of each sample."""
    return sensitivity_samples(explain, images, maps, classes, indices, **options).mean(dim=1)
