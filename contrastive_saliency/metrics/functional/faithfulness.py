"""Quantus-style faithfulness metrics: faithfulness correlation, faithfulness estimate,
monotonicity (Arya) and monotonicity correlation (Nguyen & Martínez), batched over samples and
perturbations.

All four compare what a map says about groups of pixels with what the model does when those
pixels are replaced by a **baseline**. ``images`` ``[B, C, H, W]`` are in the model's input
(normalised) space, ``maps`` ``[B, H, W]`` at the image resolution, ``classes`` ``[B]`` the
explained classes. The model's score of the class is its logit (``softmax=False``) or its
softmax probability (``softmax=True``); the defaults are Quantus': the logit for the two
faithfulness metrics, the probability for the two monotonicities (as AIX360's
``predict_proba``).

* **Faithfulness correlation** (Bhatt, Weller & Moura, "Evaluating and aggregating
  feature-based model explanations", IJCAI 2020; Quantus ``FaithfulnessCorrelation``): for
  ``num_runs`` random subsets ``S`` of ``subset_size`` pixels, the Pearson correlation over
  the runs of ``Σ_{i∈S} a_i`` and ``f(x) − f(x_{S ← baseline})``. Higher = more faithful, in
  [−1, 1].
* **Faithfulness estimate** (Alvarez-Melis & Jaakkola, "Towards robust interpretability with
  self-explaining neural networks", NeurIPS 2018; Quantus ``FaithfulnessEstimate``): pixels
  ranked by ``a`` (descending) in groups of ``pixels_per_step``; each group alone is replaced;
  the Pearson correlation over the groups of the group's attribution sum and
  ``f(x) − f(x_{group ← baseline})``. Higher is better.
* **Monotonicity** (Arya et al. 2019, "One explanation does not fit all", the AI Explainability
  360 toolkit; Quantus ``Monotonicity``): start from the all-baseline image and put the
  original pixels back in groups, least attributed first (ascending ``|a|`` by default); 1 if
  the class score never decreases from one step to the next (``f_1 ≤ f_2 ≤ … ≤ f_S``, no
  tolerance), else 0. Higher is better. As in AIX360 and Quantus, ``f_1`` (after the first
  group) is not compared with the all-baseline image. When every pixel's effect is
  non-negative (e.g. a linear model with positive contributions) any order is monotone; the
  map matters through which pixels share a group and which group comes first.
* **Monotonicity correlation** (Nguyen & Martínez 2020, "On quantitative aspects of model
  interpretability"; Quantus ``MonotonicityCorrelation``): pixels in groups of
  ``pixels_per_step`` (ascending ``|a|``); each group alone is replaced ``num_samples`` times by
  a random baseline value; the Spearman correlation over the groups of the group's attribution
  sum and the mean squared change of the score ``E[(f(x̃) − f(x))²]``. Higher is better.
  Quantus divides the mean squared change by ``f(x)²`` (``|f(x)| ≥ eps``): a positive factor per
  sample, which cannot change a rank correlation over that sample's groups, so it is left out.

**Units.** A "feature" here is a pixel: all colour channels of a pixel are replaced together,
and ``a_i`` is the map's value at the pixel. Quantus broadcasts a one-channel map to the
image's ``C`` channels and counts array elements, so its ``subset_size`` / ``features_in_step``
are ``C ×`` ours and its attribution sums ``C ×`` ours (no effect on a correlation): equal to
ours given the same pixels (the parity tests feed Quantus the element indices of our pixels).

**Baselines** (``baseline``): ``"black"`` = the image's minimum over all its values,
``"white"`` its maximum, ``"mean"`` its mean (Quantus' names, computed per image), a number
(that value, e.g. 0 = the dataset mean colour in normalised space), or ``"uniform"``: a value
drawn uniformly in [0, 1) (Quantus' ``uniform_low`` / ``uniform_high`` defaults) for each
perturbed image — per (sample, run), per (sample, step, draw), once per sample for
monotonicity.

**Random draws** (subsets, uniform baselines) are pure functions of ``(seed, sample index,
draw)`` (:mod:`contrastive_saliency.index_random`), never of the batch: the same sample gets
the same value in any batch, on any process. Quantus draws them from NumPy's global generator.

**Rules.** *Ties* in the ranking (faithfulness estimate, both monotonicities) are broken
uniformly at random, keyed by the sample ``indices``
(:mod:`contrastive_saliency.metrics.functional.ties`); Quantus' ``np.argsort`` leaves their
order to the sort. *Undefined correlations*: when the attribution sums or the model's changes
have no variance over the runs / groups — a constant map, a model blind to the perturbation —
the correlation is **0** (no evidence of faithfulness), where Quantus (scipy) returns NaN.
*NaN*: a map with a NaN pixel gives NaN for its sample. *Cost*: ``B · num_runs`` (correlation),
``B · S`` (estimate, monotonicity) and ``B · S · num_samples`` (monotonicity correlation)
perturbed images, ``S = H·W / pixels_per_step``, plus the ``B`` originals, all through the
model in forward batches of at most ``batch_size`` under ``torch.no_grad()``, in its current
mode, on the images' device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from contrastive_saliency.index_random import (
    STREAM_PERTURBATION_BASELINE,
    index_subsets,
    index_uniform,
)
from contrastive_saliency.metrics.functional.map_similarity import pearson_rows, spearman_rows
from contrastive_saliency.metrics.functional.ties import pixel_ranks

BASELINES = ("black", "white", "mean", "uniform")


def check_baseline(baseline: str | float) -> str | float:
    """``baseline`` if it is one of :data:`BASELINES` or a finite number."""
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise ValueError(
                f"baseline must be one of {', '.join(BASELINES)} or a number, got {baseline!r}"
            )
        return baseline
    if isinstance(baseline, bool) or not isinstance(baseline, int | float):
        raise ValueError(
            f"baseline must be one of {', '.join(BASELINES)} or a number, got {baseline!r}"
        )
    if baseline != baseline or abs(baseline) == float("inf"):
        raise ValueError(f"baseline must be a finite number, got {baseline!r}")
    return float(baseline)


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _check_inputs(
    images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(maps [B, N], classes [B], indices [B])`` on the images' device, shapes checked."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if maps.shape != (b, h, w):
        raise ValueError(
            f"maps must be [B, H, W] = {(b, h, w)} (one map per image at its resolution), got "
            f"{tuple(maps.shape)}"
        )
    if classes.numel() != b or indices.shape != (b,):
        raise ValueError(
            f"classes and indices must hold one value per image ({b}), got shapes "
            f"{tuple(classes.shape)} and {tuple(indices.shape)}; pass the batch's 'index'"
        )
    device = images.device
    return (
        maps.reshape(b, h * w).to(device),
        classes.reshape(b).long().to(device),
        indices.to(device),
    )


def _check_step(pixels_per_step: int | None, num_pixels: int, width: int) -> int:
    """``pixels_per_step`` (``None`` = the image width), which must divide ``H·W``."""
    step = width if pixels_per_step is None else pixels_per_step
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= num_pixels:
        raise ValueError(
            f"pixels_per_step must be an integer in [1, {num_pixels}] or None, got "
            f"{pixels_per_step!r}"
        )
    if num_pixels % step:
        raise ValueError(
            f"pixels_per_step={step} must divide the {num_pixels} pixels of an image (groups "
            "of equal size, as Quantus asserts); None = the image width always does"
        )
    return step


def _fill_values(
    images: torch.Tensor,
    baseline: str | float,
    indices: torch.Tensor,
    num_draws: int,
    seed: int,
) -> torch.Tensor:
    """Baseline value of every (sample, draw), ``[B, num_draws]`` (``[B, 1]`` when it does not
    depend on the draw)."""
    baseline = check_baseline(baseline)
    flat = images.flatten(1)
    if baseline == "uniform":
        return index_uniform(indices, (num_draws,), seed, STREAM_PERTURBATION_BASELINE).to(
            images.dtype
        )
    if baseline == "black":
        return flat.amin(dim=1, keepdim=True)
    if baseline == "white":
        return flat.amax(dim=1, keepdim=True)
    if baseline == "mean":
        return flat.mean(dim=1, keepdim=True)
    return torch.full((images.shape[0], 1), baseline, dtype=images.dtype, device=images.device)


def _class_scores(
    model: nn.Module, images: torch.Tensor, classes: torch.Tensor, softmax: bool
) -> torch.Tensor:
    # Channels-last input runs convolutions markedly faster on CPU (oneDNN) and with AMP.
    outputs = model(images.contiguous(memory_format=torch.channels_last))
    if softmax:
        outputs = outputs.softmax(dim=1)
    return outputs.gather(1, classes.view(-1, 1))[:, 0].float()


@torch.no_grad()
def perturbed_scores(
    model: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor,
    num_jobs: int,
    build: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int = 256,
    softmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(original [B], perturbed [B, num_jobs])`` scores of ``classes``.

    ``build(sample [P], job [P])`` returns the ``P`` perturbed images of those (sample, job)
    pairs; the ``B`` originals and the ``B · num_jobs`` perturbed images go through the model
    in forward batches of at most ``batch_size`` (any mix of samples and jobs), so
    ``batch_size`` changes only the speed.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    b = images.shape[0]
    original = torch.cat(
        [
            _class_scores(model, chunk, chunk_classes, softmax)
            for chunk, chunk_classes in zip(
                images.split(batch_size), classes.split(batch_size), strict=True
            )
        ]
    ) if b else images.new_empty(0)  # fmt: skip
    scores = torch.empty(b * num_jobs, device=images.device)
    # Pair p is (job p // B, sample p % B): consecutive pairs share a job.
    for pairs in torch.arange(b * num_jobs, device=images.device).split(batch_size):
        job, sample = pairs // b, pairs % b
        scores[pairs] = _class_scores(model, build(sample, job), classes[sample], softmax)
    return original, scores.view(num_jobs, b).T


def _finish(value: torch.Tensor, flat_maps: torch.Tensor) -> torch.Tensor:
    """NaN where the sample's map has a NaN pixel, in the maps' floating dtype."""
    dtype = flat_maps.dtype if flat_maps.is_floating_point() else torch.float32
    nan = torch.isnan(flat_maps).any(dim=1) if flat_maps.is_floating_point() else None
    value = value.to(dtype)
    return value if nan is None else value.masked_fill(nan, float("nan"))


def _replace(
    images: torch.Tensor, sample: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """``images[sample]`` with the pixels of ``mask`` ``[P, H·W]`` set to ``fill`` ``[P]``."""
    rows = images[sample]
    mask = mask.view(rows.shape[0], 1, *rows.shape[2:])
    return torch.where(mask, fill.to(rows.dtype).view(-1, 1, 1, 1), rows)


def _group_sums(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum of ``values`` ``[B, N]`` per group id ``groups`` ``[B, N]`` → ``[B, num_groups]``."""
    dtype = _work_dtype(values.device)
    sums = torch.zeros(values.shape[0], num_groups, dtype=dtype, device=values.device)
    return sums.scatter_add_(1, groups, values.to(dtype))


def _ascending_groups(values: torch.Tensor, indices: torch.Tensor, step: int) -> torch.Tensor:
    """Group id of every pixel when pixels go least attributed first, ``step`` per group
    (ties in random order keyed by ``indices``)."""
    descending = pixel_ranks(values, indices)
    return (values.shape[1] - 1 - descending) // step


def faithfulness_correlation(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    subset_size: int = 224,
    num_runs: int = 100,
    baseline: str | float = "black",
    softmax: bool = False,
    absolute: bool = False,
    batch_size: int = 256,
    seed: int = 0,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Faithfulness correlation ``[B]`` (module docstring): Pearson over ``num_runs`` random
    subsets of ``subset_size`` pixels (``1 ≤ subset_size < H·W``, as Quantus), each subset a
    pure function of ``(seed, indices[b], run)``
    (:func:`~contrastive_saliency.index_random.index_subsets`)."""
    flat, classes, indices = _check_inputs(images, maps, classes, indices)
    b, num_pixels = flat.shape
    if isinstance(subset_size, bool) or not isinstance(subset_size, int):
        raise ValueError(f"subset_size must be an integer number of pixels, got {subset_size!r}")
    if not 1 <= subset_size < num_pixels:
        raise ValueError(
            f"subset_size must lie in [1, {num_pixels - 1}] (fewer than the image's "
            f"{num_pixels} pixels), got {subset_size}"
        )
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 2:
        raise ValueError(f"num_runs must be an integer ≥ 2 (a correlation), got {num_runs!r}")
    values = flat.abs() if absolute else flat
    fills = _fill_values(images, baseline, indices, num_runs, seed)
    sums = torch.empty(b, num_runs, dtype=_work_dtype(flat.device), device=flat.device)

    def build(sample: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        subsets = index_subsets(indices[sample], run, num_pixels, subset_size, seed)
        sums[sample, run] = values[sample].gather(1, subsets).to(sums.dtype).sum(dim=1)
        mask = torch.zeros(len(sample), num_pixels, dtype=torch.bool, device=flat.device)
        mask.scatter_(1, subsets, True)
        return _replace(images, sample, mask, fills[sample, run.clamp(max=fills.shape[1] - 1)])

    original, perturbed = perturbed_scores(
        model, images, classes, num_runs, build, batch_size, softmax
    )
    drops = original[:, None].to(sums.dtype) - perturbed.to(sums.dtype)
    return _finish(pearson_rows(sums, drops), flat)


def faithfulness_estimate(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    pixels_per_step: int | None = None,
    baseline: str | float = "black",
    softmax: bool = False,
    absolute: bool = False,
    batch_size: int = 256,
    seed: int = 0,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Faithfulness estimate ``[B]`` (module docstring): Pearson over the ``H·W /
    pixels_per_step`` groups of pixels in descending order of the map (``None`` = the image
    width per group; Quantus' ``features_in_step`` default 1 = one pixel per group)."""
    flat, classes, indices = _check_inputs(images, maps, classes, indices)
    num_pixels = flat.shape[1]
    step = _check_step(pixels_per_step, num_pixels, images.shape[-1])
    num_groups = num_pixels // step
    values = flat.abs() if absolute else flat
    groups = pixel_ranks(values, indices) // step
    sums = _group_sums(values, groups, num_groups)
    fills = _fill_values(images, baseline, indices, num_groups, seed)

    def build(sample: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        mask = groups[sample] == group[:, None]
        return _replace(images, sample, mask, fills[sample, group.clamp(max=fills.shape[1] - 1)])

    original, perturbed = perturbed_scores(
        model, images, classes, num_groups, build, batch_size, softmax
    )
    drops = original[:, None].to(sums.dtype) - perturbed.to(sums.dtype)
    return _finish(pearson_rows(sums, drops), flat)


def monotonicity(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    pixels_per_step: int | None = None,
    baseline: str | float = "black",
    softmax: bool = True,
    absolute: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Arya et al.'s monotonicity ``[B]`` (1.0 or 0.0; module docstring): the class score after
    each of the ``S = H·W / pixels_per_step`` insertions (least attributed first, into the
    all-baseline image) never decreases. Step ``s`` (1 … S) shows the original pixels of the
    ``s`` first groups; step S is the image itself."""
    flat, classes, indices = _check_inputs(images, maps, classes, indices)
    num_pixels = flat.shape[1]
    step = _check_step(pixels_per_step, num_pixels, images.shape[-1])
    num_steps = num_pixels // step
    values = flat.abs() if absolute else flat
    groups = _ascending_groups(values, indices, step)
    fills = _fill_values(images, baseline, indices, 1, seed)[:, 0]

    def build(sample: torch.Tensor, job: torch.Tensor) -> torch.Tensor:
        hidden = groups[sample] > job[:, None]  # job j shows groups 0 … j
        return _replace(images, sample, hidden, fills[sample])

    _, scores = perturbed_scores(model, images, classes, num_steps, build, batch_size, softmax)
    monotone = (scores.diff(dim=1) >= 0).all(dim=1)
    return _finish(monotone.float(), flat)


def monotonicity_correlation(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    pixels_per_step: int | None = None,
    num_samples: int = 100,
    baseline: str | float = "uniform",
    softmax: bool = True,
    absolute: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    *,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Nguyen & Martínez's monotonicity correlation ``[B]`` (module docstring): Spearman (average
    ranks for ties) over the ``S = H·W / pixels_per_step`` groups (ascending ``|a|``) of the
    group's attribution sum and the mean over ``num_samples`` draws of ``(f(x̃) − f(x))²``, the
    group replaced by the ``baseline``; with ``"uniform"`` (the default, as Quantus) the value
    of draw ``d`` of group ``g`` is a function of ``(seed, indices[b], g · num_samples + d)``."""
    flat, classes, indices = _check_inputs(images, maps, classes, indices)
    num_pixels = flat.shape[1]
    step = _check_step(pixels_per_step, num_pixels, images.shape[-1])
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    num_groups = num_pixels // step
    values = flat.abs() if absolute else flat
    groups = _ascending_groups(values, indices, step)
    sums = _group_sums(values, groups, num_groups)
    fills = _fill_values(images, baseline, indices, num_groups * num_samples, seed)

    def build(sample: torch.Tensor, job: torch.Tensor) -> torch.Tensor:
        mask = groups[sample] == (job // num_samples)[:, None]
        return _replace(images, sample, mask, fills[sample, job.clamp(max=fills.shape[1] - 1)])

    original, perturbed = perturbed_scores(
        model, images, classes, num_groups * num_samples, build, batch_size, softmax
    )
    changes = perturbed.to(sums.dtype) - original[:, None].to(sums.dtype)
    variances = changes.square().view(-1, num_groups, num_samples).mean(dim=2)
    return _finish(spearman_rows(sums, variances), flat)
