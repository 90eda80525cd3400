"""Lightning callbacks: confusion matrix, the saliency evaluation (:mod:`callbacks.evaluation`)
and the papers' analyses (:mod:`callbacks.analyses`)."""

from callbacks.confusion_matrix import ConfusionMatrixCallback

__all__ = ["ConfusionMatrixCallback"]
