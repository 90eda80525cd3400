"""Metrics: torchmetrics classes over per-sample values; pure functions in ``functional``."""

from saliency.metrics.per_sample import PerSampleValues, unique_by_index

__all__ = ["PerSampleValues", "unique_by_index"]
