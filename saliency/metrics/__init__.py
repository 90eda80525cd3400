"""Metrics: torchmetrics classes over per-sample values; pure functions in ``functional``.

Every class keeps per-sample scalars plus the sample index (``dist_reduce_fx="cat"``),
de-duplicated by index, so padded duplicates from a ``DistributedSampler`` never count twice;
``compute()`` returns summary statistics and ``per_sample()`` the values for tests between
methods (see :class:`~saliency.metrics.per_sample.SampleMetric`).
"""

from saliency.metrics.confidence import ConfidenceDrop, DropIncreaseGain, RelativeDrop
from saliency.metrics.feature_agreement import FeatureAgreement
from saliency.metrics.localisation import (
    AUPR,
    EnergyPointingGame,
    GridPointingGame,
    GridRegionScores,
    LocalisationError,
    PointingGame,
    RegionScores,
    TopKIntersection,
)
from saliency.metrics.per_sample import (
    PerSampleValues,
    SampleMetric,
    summary_statistics,
    unique_by_index,
)
from saliency.metrics.perturbation_curves import DeletionAUC, DeletionInsertion, InsertionAUC
from saliency.metrics.pic import PerformanceInformationCurves
from saliency.metrics.random_logit import RandomLogit
from saliency.metrics.representation import ChannelActivity
from saliency.metrics.sanity_checks import MapSimilarity

__all__ = [
    "AUPR",
    "ChannelActivity",
    "ConfidenceDrop",
    "DeletionAUC",
    "DeletionInsertion",
    "DropIncreaseGain",
    "EnergyPointingGame",
    "FeatureAgreement",
    "GridPointingGame",
    "GridRegionScores",
    "InsertionAUC",
    "LocalisationError",
    "MapSimilarity",
    "PerSampleValues",
    "PerformanceInformationCurves",
    "PointingGame",
    "RandomLogit",
    "RegionScores",
    "RelativeDrop",
    "SampleMetric",
    "TopKIntersection",
    "summary_statistics",
    "unique_by_index",
]
