"""Lightning modules: classifier training and saliency evaluation."""

from lightning_modules.classifier import ClassifierModule

__all__ = ["ClassifierModule"]
