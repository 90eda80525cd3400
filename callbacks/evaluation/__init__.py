"""Saliency evaluation: :class:`SaliencyEvaluationCallback` (the Lightning hooks) over a
Lightning-free engine (:mod:`.engine`), what a config asks for (:mod:`.spec`,
:mod:`.target_policies`), config checks (:mod:`.checks`), the sanity check (:mod:`.sanity`
over :mod:`.randomisation`), per-sample results (:mod:`.results`) and their tables
(:mod:`.tables`), output writing (:mod:`.outputs`), W&B logging (:mod:`.wandb_logging`) and
the evaluation's test sample (:mod:`.test_subset`)."""

from callbacks.evaluation.callback import SaliencyEvaluationCallback
from callbacks.evaluation.engine import (
    CONFUSION_FROM_HOLDOUT,
    CONFUSION_FROM_VALIDATION,
    CONTRASTS_FROM_MATRIX,
    INPUT_LAYER,
)

__all__ = [
    "CONFUSION_FROM_HOLDOUT",
    "CONFUSION_FROM_VALIDATION",
    "CONTRASTS_FROM_MATRIX",
    "INPUT_LAYER",
    "SaliencyEvaluationCallback",
]
