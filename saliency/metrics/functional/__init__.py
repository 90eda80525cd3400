"""Pure, batched metric functions: tensors in, per-sample tensors out."""

from saliency.metrics.functional.feature_agreement import feature_agreement
from saliency.metrics.functional.perturbation_curves import (
    curve_auc,
    deletion_auc,
    deletion_curve,
    insertion_curve,
    perturbation_curve,
)

__all__ = [
    "curve_auc",
    "deletion_auc",
    "deletion_curve",
    "feature_agreement",
    "insertion_curve",
    "perturbation_curve",
]
