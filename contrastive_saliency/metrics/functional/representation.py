"""Representation diagnostics: channel activity (CASE ablation) and classifier-weight
similarity (Finer-CAM Fig. 1).

- **Channel activity** (`papers/case.md`, Sec. V-B "Ablation Study: Channel Sparsity and
  Discriminative Structure", Eq. 10): the spatially pooled activation of channel ``c`` is
  ``â_c = (1 / HW) Σ_i Σ_j A_c(i, j)``; the channel is *active* iff ``â_c > τ`` (τ = 0.001).
  For each class the paper reports the mean number of active channels over the correctly
  predicted validation images, and a KDE of these per-class means across classes (Figs. 5–6).
- **Classifier-weight similarity** (`papers/finer_cam.md`, Fig. 1 left, App. A.1, Eqs. 11–12):
  the cosine similarity matrix ``S_pq = w^p · w^q / (‖w^p‖ ‖w^q‖)`` of the linear classifier's
  class weights, each row sorted in descending order, averaged over classes rank by rank (the
  shaded band of Fig. 1 is the standard deviation over classes).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch


def _check_activations(activations: torch.Tensor) -> None:
    if activations.dim() not in (3, 4):
        raise ValueError(
            "activations must be [B, C, h, w] (or [B, C, L]) with channels in dimension 1, got "
            f"shape {tuple(activations.shape)}"
        )


def pooled_activations(activations: torch.Tensor) -> torch.Tensor:
    """``â_c = (1 / HW) Σ_{i,j} A_c(i, j)`` per sample and channel (CASE Eq. 10), ``[B, C]``."""
    _check_activations(activations)
    return activations.flatten(2).mean(dim=2)


def active_channel_mask(activations: torch.Tensor, tau: float = 0.001) -> torch.Tensor:
    """Bool ``[B, C]``: channel ``c`` of sample ``b`` is active iff ``â_c > τ`` (CASE Eq. 10;
    strict inequality, τ = 0.001 in the paper's ablation)."""
    return pooled_activations(activations) > tau


def channel_activity(activations: torch.Tensor, tau: float = 0.001) -> torch.Tensor:
    """Number of active channels per sample, ``[B]`` (int64): ``Σ_c 1[â_c > τ]`` (CASE Eq. 10).

    ``activations`` are the target layer's ``[B, C, h, w]`` activations (``[B, C, L]`` is
    accepted too; the mean runs over every dimension after the channels).
    """
    return active_channel_mask(activations, tau).sum(dim=1)


class ClassChannelActivity(NamedTuple):
    """Per-class accumulation of active-channel counts, ``[num_classes]`` each.

    ``total``: sum of the active-channel counts of the class's selected images (float64);
    ``num_images``: how many images of the class were selected (int64). Partial results of
    several batches combine with :meth:`merge`. ``mean`` is ``total / num_images`` where
    ``present`` (at least one image), and 0 elsewhere — never NaN; use ``mean[present]`` for
    the KDE across classes.
    """

    total: torch.Tensor
    num_images: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        """Bool ``[num_classes]``: the class had at least one selected image."""
        return self.num_images > 0

    @property
    def mean(self) -> torch.Tensor:
        """Mean active channels per class (0 for classes without images; see ``present``)."""
        present = self.present
        return torch.where(present, self.total / self.num_images.where(present, 1), 0.0)

    def merge(self, other: ClassChannelActivity) -> ClassChannelActivity:
        """Sum of two accumulations (e.g. of two batches)."""
        if self.total.shape != other.total.shape:
            raise ValueError(
                f"cannot merge accumulations over {self.total.numel()} and "
                f"{other.total.numel()} classes"
            )
        return ClassChannelActivity(self.total + other.total, self.num_images + other.num_images)


def class_channel_activity(
    counts: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    correct: torch.Tensor | None = None,
) -> ClassChannelActivity:
    """Accumulate per-sample active-channel ``counts`` ``[B]`` by class (CASE Sec. V-B).

    ``labels`` ``[B]`` are the ground-truth classes (int, in ``[0, num_classes)``); ``correct``
    ``[B]`` bool selects the images that count — the paper averages over *correctly predicted*
    images, so pass ``predictions == labels`` (``None`` keeps every image). Returns totals and
    image counts per class; ``.mean`` gives the per-class mean number of active channels.
    """
    if counts.dim() != 1 or labels.shape != counts.shape:
        raise ValueError(
            f"counts and labels must both be [B], got {tuple(counts.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    if correct is None:
        weights = torch.ones_like(labels, dtype=torch.float64)
    else:
        if correct.shape != labels.shape or correct.dtype != torch.bool:
            raise ValueError(
                f"correct must be a bool [B] mask, got {correct.dtype} {tuple(correct.shape)}; "
                "use predictions == labels"
            )
        weights = correct.to(torch.float64)
    total = torch.zeros(num_classes, dtype=torch.float64, device=counts.device)
    total.index_add_(0, labels, counts.to(torch.float64) * weights)
    num_images = torch.zeros(num_classes, dtype=torch.int64, device=counts.device)
    num_images.index_add_(0, labels, weights.to(torch.int64))
    return ClassChannelActivity(total, num_images)


class WeightSimilarityCurve(NamedTuple):
    """Finer-CAM App. A.1 curve: ``curve`` and ``std`` ``[R]`` (mean and population standard
    deviation over classes at each rank), ``sorted`` ``[N, R]`` (each class's similarities in
    descending order); ``R = N − 1`` (self excluded) or ``N`` (paper's zeroed diagonal kept)."""

    curve: torch.Tensor
    std: torch.Tensor
    sorted: torch.Tensor


def cosine_similarity_matrix(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``S_pq = w^p · w^q / (‖w^p‖₂ ‖w^q‖₂)`` for ``[N, D]`` class weights (Finer-CAM Eq. 11),
    ``[N, N]``. Norms are clamped at ``eps``, so an all-zero weight row has similarity 0."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, D] (classes × features), got {tuple(weight.shape)}")
    unit = weight / weight.norm(dim=1, keepdim=True).clamp_min(eps)
    return unit @ unit.T


def classifier_weight_similarity(
    weight: torch.Tensor,
    self_similarity: Literal["exclude", "zero"] = "exclude",
) -> WeightSimilarityCurve:
    """Sorted classifier-weight cosine similarity curve (Finer-CAM Fig. 1, App. A.1).

    ``S`` = :func:`cosine_similarity_matrix` of the ``[N, D]`` linear-classifier weight (Eq. 11);
    each row sorted in descending order (Eq. 12, ``S_sorted = sort_rows(S)``); the curve is the
    class-wise average at each rank, so its first point is the mean similarity between a class
    and its most similar other class. Self-similarity: ``"exclude"`` (default) drops the
    diagonal, leaving the ``N − 1`` other classes; ``"zero"`` follows the paper's text literally
    ("the diagonal elements are subtracted by 1"), keeping a 0 for the class itself in each
    sorted row of length ``N``.
    """
    if self_similarity not in ("exclude", "zero"):
        raise ValueError(f"self_similarity must be 'exclude' or 'zero', got {self_similarity!r}")
    num_classes = weight.shape[0] if weight.dim() == 2 else 0
    if num_classes < 2:
        raise ValueError(f"weight must be [N, D] with N ≥ 2 classes, got {tuple(weight.shape)}")
    similarity = cosine_similarity_matrix(weight)
    diagonal = torch.eye(num_classes, dtype=torch.bool, device=weight.device)
    if self_similarity == "exclude":
        rows = similarity[~diagonal].view(num_classes, num_classes - 1)
    else:
        rows = similarity - diagonal.to(similarity.dtype)
    ordered = torch.sort(rows, dim=1, descending=True).values
    return WeightSimilarityCurve(
        curve=ordered.mean(dim=0),
        std=ordered.std(dim=0, correction=0),
        sorted=ordered,
    )
