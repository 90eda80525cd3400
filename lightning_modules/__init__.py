"""Lightning modules: classifier training and saliency evaluation."""

from lightning_modules.classifier import ClassifierModule
from lightning_modules.linear_probe import LinearProbeModule

__all__ = ["ClassifierModule", "LinearProbeModule"]
