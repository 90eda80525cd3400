"""ClusCAM hyper-parameter selection from validation data (``cluscam.md`` Sec. 3.4, App. B).

- K: elbow of the proxy ``P(K)`` (Eq. 8) by maximum discrete curvature (Alg. 2);
- r: mean posterior of the non-salient component of a two-component 1-D Gaussian mixture
  fitted to the group scores (Eq. 9, Alg. 3);
- τ = 1 / ln(1 + rK) (Eq. 10).

The pure functions (:func:`curvature_elbow`, :func:`fit_two_gaussians`,
:func:`gmm_discard_ratio`, :func:`temperature_from`) work on tensors; :func:`score_matrix`,
:func:`select_num_clusters` and :func:`select_hyperparameters` run ClusCAM over a dataloader
whose batches are dicts with ``"image"`` and ``"label"`` (``datamodules.base.collate_samples``)
or ``(image, label, ...)`` tuples. Not a hot path: the EM runs in float64 on the CPU.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods.cluscam import ClusCAM, temperature_from

Target = Literal["label", "prediction"]

__all__ = [
    "ClusCAMSelection",
    "ClusterCountSelection",
    "TwoGaussianMixture",
    "curvature_elbow",
    "fit_two_gaussians",
    "gmm_discard_ratio",
    "score_matrix",
    "select_hyperparameters",
    "select_num_clusters",
    "selection_from_scores",
    "temperature_from",
]


# ------------------------------------------------------------------------------ pure functions


def curvature_elbow(
    candidates: Sequence[int], proxy: Sequence[float] | torch.Tensor
) -> tuple[int, torch.Tensor]:
    """ClusCAM Alg. 2 on a computed proxy: ``(K*, C)`` for ascending ``candidates`` K_1..K_M.

    For j = 2..M: ``S(K_j) = (P(K_j) − P(K_{j−1})) / (K_j − K_{j−1})``; for j = 3..M:
    ``C(K_j) = (S(K_j) − S(K_{j−1})) / (K_j − K_{j−1})``; ``K* = K_{argmax_j C(K_j)}`` (first
    on ties). ``C`` is returned as a float64 tensor ``[M]`` with NaN at j = 1, 2. As written,
    ``C(K_j)`` measures the change of slope around ``K_{j−1}`` yet names ``K_j``, and the
    maximum is the sharpest bend of a decreasing, flattening (convex) curve; this function
    implements the algorithm exactly as the paper states it.
    """
    ks = _check_candidates(candidates)
    values = torch.as_tensor(proxy, dtype=torch.float64).flatten().cpu()
    if values.numel() != ks.numel():
        raise ConfigurationError(
            f"proxy has {values.numel()} values for {ks.numel()} candidates; give one per K"
        )
    if not bool(torch.isfinite(values).all()):
        raise ConfigurationError(f"proxy values must be finite, got {values.tolist()}")
    spacing = ks[1:] - ks[:-1]  # ΔK(K_j), j = 2..M
    slope = (values[1:] - values[:-1]) / spacing  # S(K_j), j = 2..M
    curvature = torch.full_like(values, math.nan)
    curvature[2:] = (slope[1:] - slope[:-1]) / spacing[1:]
    best = 2 + int(torch.argmax(curvature[2:]))
    return int(ks[best]), curvature


@dataclass(frozen=True)
class TwoGaussianMixture:
    """``p(s) = Σ_c π_c N(s | μ_c, σ_c²)`` with components ordered by mean: index 0 is the
    non-salient component (lower mean, Alg. 3 line 4), index 1 the salient one."""

    weights: torch.Tensor
    means: torch.Tensor
    variances: torch.Tensor
    iterations: int
    log_likelihood: float

    def posterior(self, scores: torch.Tensor) -> torch.Tensor:
        """``P(z = c | s)`` ``[n, 2]`` for each score (Bayes' rule, App. B)."""
        return _log_joint(_as_scores(scores), self).softmax(dim=1)


def fit_two_gaussians(
    scores: torch.Tensor | Sequence[float],
    iterations: int = 1000,
    tol: float = 1e-10,
    reg_variance: float = 1e-6,
) -> TwoGaussianMixture:
    """Maximum-likelihood two-component 1-D Gaussian mixture by EM (Alg. 3 line 2).

    Deterministic start: the lower and upper halves of the sorted scores give the initial
    means, variances and weights. E-step: responsibilities ``γ_ic ∝ π_c N(s_i | μ_c, σ_c²)``;
    M-step: ``π_c = Σ_i γ_ic / n``, ``μ_c = Σ_i γ_ic s_i / Σ_i γ_ic``,
    ``σ_c² = Σ_i γ_ic (s_i − μ_c)² / Σ_i γ_ic + reg_variance`` (scikit-learn's ``reg_covar``);
    stops when the mean log-likelihood improves by less than ``tol``. Needs at least two
    distinct finite scores.
    """
    values = _as_scores(scores)
    if torch.unique(values).numel() < 2:
        raise ConfigurationError(
            f"a two-component mixture needs at least two distinct scores, got "
            f"{values.numel()} score(s) with {torch.unique(values).numel()} distinct value(s)"
        )
    ordered = values.sort().values
    halves = (ordered[: values.numel() // 2], ordered[values.numel() // 2 :])
    mixture = TwoGaussianMixture(
        weights=torch.tensor([half.numel() / values.numel() for half in halves]),
        means=torch.stack([half.mean() for half in halves]),
        variances=torch.stack([half.var(unbiased=False) + reg_variance for half in halves]),
        iterations=0,
        log_likelihood=-math.inf,
    )
    previous = -math.inf
    for step in range(1, iterations + 1):
        joint = _log_joint(values, mixture)
        log_likelihood = float(joint.logsumexp(dim=1).mean())
        responsibility = joint.softmax(dim=1)  # [n, 2]
        mass = responsibility.sum(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
        means = (responsibility * values[:, None]).sum(dim=0) / mass
        variances = (responsibility * (values[:, None] - means).pow(2)).sum(dim=0) / mass
        mixture = TwoGaussianMixture(
            mass / values.numel(), means, variances + reg_variance, step, log_likelihood
        )
        if abs(log_likelihood - previous) < tol:
            break
        previous = log_likelihood
    order = mixture.means.argsort()
    final = float(_log_joint(values, mixture).logsumexp(dim=1).mean())
    return TwoGaussianMixture(
        mixture.weights[order],
        mixture.means[order],
        mixture.variances[order],
        mixture.iterations,
        final,
    )


def gmm_discard_ratio(
    scores: torch.Tensor | Sequence[float], mixture: TwoGaussianMixture | None = None
) -> float:
    """ClusCAM Eq. 9 / Alg. 3: ``r = mean_i P(z_i = non-salient | s_i)`` over the flattened
    score matrix ``[N, K]``, the non-salient component being the lower-mean one of the
    two-Gaussian fit (:func:`fit_two_gaussians`, or ``mixture`` if given)."""
    values = _as_scores(scores)
    mixture = mixture if mixture is not None else fit_two_gaussians(values)
    return float(mixture.posterior(values)[:, 0].mean())


# --------------------------------------------------------------------- over a validation set


def score_matrix(
    model: nn.Module,
    dataloader: Iterable[Any],
    num_clusters: int,
    layer: str | None = None,
    target: Target = "label",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    **cluscam_kwargs: Any,
) -> torch.Tensor:
    """``S`` ``[N, K]``: the group scores ``s_j^c = logit_c(x ⊙ M_j) − logit_c(x)`` (Eq. 5) of
    every validation image for K = ``num_clusters`` groups, c the image's label
    (``target="label"``) or its predicted class (``"prediction"``, as the reference code's
    validation script). ``cluscam_kwargs`` go to :class:`ClusCAM` (``seed``, ``batch_size``,
    ``layout``, ...); images go to ``device`` (default: the model's)."""
    if target not in ("label", "prediction"):
        raise ConfigurationError(f"target must be 'label' or 'prediction', got {target!r}")
    for reserved in ("num_clusters", "discard_ratio", "temperature", "preset"):
        if reserved in cluscam_kwargs:
            raise ConfigurationError(
                f"{reserved!r} is chosen by the selection, not passed to it; remove it"
            )
    # r and τ play no part in the scores (Eqs. 5, 8, 9); fixed values keep ClusCAM's checks.
    method = ClusCAM(
        model, layer, num_clusters=num_clusters, discard_ratio=0.0, temperature=1.0,
        **cluscam_kwargs,
    )  # fmt: skip
    device = torch.device(device) if device is not None else _model_device(model)
    rows = []
    for index, batch in enumerate(dataloader):
        if max_batches is not None and index >= max_batches:
            break
        images, labels = _images_and_labels(batch)
        images = images.to(device)
        maps, _, logits = method.cluster(images)
        if target == "label":
            classes = labels.to(device).long()[:, None]
        else:
            classes = logits.argmax(dim=1, keepdim=True)
        if int(classes.min()) < 0 or int(classes.max()) >= logits.shape[1]:
            raise ConfigurationError(
                f"labels must lie in [0, {logits.shape[1] - 1}] for a model with "
                f"{logits.shape[1]} outputs; got {classes.min().item()}..{classes.max().item()}"
            )
        rows.append(method.score(images, maps, classes, logits)[:, 0].cpu())
    if not rows:
        raise ConfigurationError("the dataloader yielded no batches; give validation data")
    return torch.cat(rows).double()


@dataclass(frozen=True)
class ClusterCountSelection:
    """Alg. 2's result: the chosen ``num_clusters`` K*, the ``candidates``, ``proxy`` P(K)
    (Eq. 8) and ``curvature`` C(K) per candidate, and each candidate's score matrix."""

    num_clusters: int
    candidates: tuple[int, ...]
    proxy: torch.Tensor
    curvature: torch.Tensor
    scores: dict[int, torch.Tensor]


def select_num_clusters(
    model: nn.Module,
    dataloader: Iterable[Any],
    candidates: Sequence[int],
    layer: str | None = None,
    target: Target = "label",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    **cluscam_kwargs: Any,
) -> ClusterCountSelection:
    """ClusCAM Alg. 2: ``P(K) = 1/(K|V|) Σ_x Σ_i s_i`` (Eq. 8, the mean of :func:`score_matrix`)
    for each candidate K, then :func:`curvature_elbow`. The dataloader is iterated once per
    candidate (the same images each time if it does not shuffle)."""
    ks = tuple(int(k) for k in _check_candidates(candidates).tolist())
    scores = {
        k: score_matrix(model, dataloader, k, layer, target, max_batches, device, **cluscam_kwargs)
        for k in ks
    }
    proxy = torch.stack([scores[k].mean() for k in ks])
    chosen, curvature = curvature_elbow(ks, proxy)
    return ClusterCountSelection(chosen, ks, proxy, curvature, scores)


@dataclass(frozen=True)
class ClusCAMSelection:
    """The selected ``num_clusters`` K (Alg. 2), ``discard_ratio`` r (Alg. 3) and
    ``temperature`` τ (Eq. 10), with the curves they came from: ``candidates``, ``proxy``
    P(K), ``curvature`` C(K), the score matrix ``scores`` ``[N, K]`` at the chosen K and the
    fitted ``mixture``. ``ClusCAM(model, layer, **selection.as_kwargs())`` uses them."""

    num_clusters: int
    discard_ratio: float
    temperature: float
    candidates: tuple[int, ...]
    proxy: torch.Tensor
    curvature: torch.Tensor
    scores: torch.Tensor
    mixture: TwoGaussianMixture

    def as_kwargs(self) -> dict[str, float | int]:
        return {
            "num_clusters": self.num_clusters,
            "discard_ratio": self.discard_ratio,
            "temperature": self.temperature,
        }


def select_hyperparameters(
    model: nn.Module,
    dataloader: Iterable[Any],
    candidates: Sequence[int],
    layer: str | None = None,
    target: Target = "label",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    **cluscam_kwargs: Any,
) -> ClusCAMSelection:
    """ClusCAM Sec. 3.4: K by Alg. 2 over ``candidates``, r by Alg. 3 on the score matrix of
    the chosen K (reused from Alg. 2, no extra forwards), τ = 1/ln(1 + rK) (Eq. 10)."""
    count = select_num_clusters(
        model, dataloader, candidates, layer, target, max_batches, device, **cluscam_kwargs
    )
    return selection_from_scores(count.scores)


def selection_from_scores(scores: dict[int, torch.Tensor]) -> ClusCAMSelection:
    """Alg. 2, Alg. 3 and Eq. 10 on the score matrices ``{K: [N, K]}`` of every candidate
    (in float64): the selection step of :func:`select_hyperparameters`, for scores gathered
    elsewhere (e.g. batch by batch in an evaluation)."""
    candidates = tuple(sorted(scores))
    proxy = torch.stack([scores[k].double().mean() for k in candidates])  # Eq. 8
    chosen, curvature = curvature_elbow(candidates, proxy)  # Alg. 2
    chosen_scores = scores[chosen].double()
    mixture = fit_two_gaussians(chosen_scores)  # Alg. 3
    ratio = gmm_discard_ratio(chosen_scores, mixture)  # Eq. 9
    return ClusCAMSelection(
        num_clusters=chosen,
        discard_ratio=ratio,
        temperature=temperature_from(ratio, chosen),  # Eq. 10
        candidates=candidates,
        proxy=proxy,
        curvature=curvature,
        scores=chosen_scores,
        mixture=mixture,
    )


# ---------------------------------------------------------------------------------- helpers


def _log_joint(values: torch.Tensor, mixture: TwoGaussianMixture) -> torch.Tensor:
    """``log π_c + log N(s_i | μ_c, σ_c²)`` ``[n, 2]``."""
    variances = mixture.variances.to(values)
    squared = (values[:, None] - mixture.means.to(values)).pow(2)
    log_normal = -0.5 * (squared / variances + torch.log(2 * math.pi * variances))
    return torch.log(mixture.weights.to(values)) + log_normal


def _as_scores(scores: torch.Tensor | Sequence[float]) -> torch.Tensor:
    values = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()
    if values.numel() == 0 or not bool(torch.isfinite(values).all()):
        raise ConfigurationError(
            f"scores must be a non-empty set of finite values, got {values.numel()} value(s) "
            f"with {int((~torch.isfinite(values)).sum())} non-finite"
        )
    return values


def _check_candidates(candidates: Sequence[int]) -> torch.Tensor:
    values = list(candidates)
    if (
        len(values) < 3
        or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in values)
        or any(b <= a for a, b in itertools.pairwise(values))
    ):
        raise ConfigurationError(
            f"candidates must be at least 3 strictly increasing positive ints (Alg. 2 needs "
            f"two differences), got {values}"
        )
    return torch.tensor([int(k) for k in values], dtype=torch.float64)


def _images_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        missing = [key for key in ("image", "label") if key not in batch]
        if missing:
            raise ConfigurationError(
                f"a batch dict needs keys 'image' and 'label'; missing {missing}, has "
                f"{sorted(batch)}"
            )
        images, labels = batch["image"], batch["label"]
    elif isinstance(batch, Sequence) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    else:
        raise ConfigurationError(
            f"batches must be dicts with 'image' and 'label' or (image, label) tuples, got "
            f"{type(batch).__name__}"
        )
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ConfigurationError(
            f"batch images must be a tensor [B, C, H, W], got {getattr(images, 'shape', images)}"
        )
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise ConfigurationError(
            f"batch labels must be integer class ids [B] = [{images.shape[0]}], got dtype "
            f"{labels.dtype} shape {tuple(labels.shape)}"
        )
    return images, labels


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
