"""Lightning callbacks: confusion matrix, saliency evaluation."""

from callbacks.confusion_matrix import ConfusionMatrixCallback

__all__ = ["ConfusionMatrixCallback"]
