"""Metrics: torchmetrics classes over per-sample values; pure functions in ``functional``.

The metrics the evaluation offers register themselves by name with their metadata
(:mod:`contrastive_saliency.metrics.registry`: ``create_metric``, ``metric_class``, ``list_metrics``).
Every class keeps per-sample scalars plus the sample index (``dist_reduce_fx="cat"``),
de-duplicated by index, so padded duplicates from a ``DistributedSampler`` never count twice;
``compute()`` returns summary statistics and ``per_sample()`` the values for tests between
methods (see :class:`~contrastive_saliency.metrics.per_sample.SampleMetric`).
"""

from contrastive_saliency.metrics.aopc import IROF, PixelFlipping, RegionPerturbation
from contrastive_saliency.metrics.complexity import Complexity, Sparseness
from contrastive_saliency.metrics.confidence import (
    AverageDrop,
    AverageGain,
    ConfidenceDrop,
    IncreaseInConfidence,
    RelativeDrop,
)
from contrastive_saliency.metrics.faithfulness import (
    FaithfulnessCorrelation,
    FaithfulnessEstimate,
    Monotonicity,
    MonotonicityCorrelation,
)
from contrastive_saliency.metrics.feature_agreement import FeatureAgreement
from contrastive_saliency.metrics.localisation import (
    AUPR,
    EnergyPointingGame,
    GridPointingGame,
    GridRegionScores,
    LocalisationError,
    PointingGame,
    RegionScores,
    RelevanceRankAccuracy,
    TopKIntersection,
)
from contrastive_saliency.metrics.per_sample import (
    PerSampleValues,
    SampleMetric,
    summary_statistics,
    unique_by_index,
)
from contrastive_saliency.metrics.perturbation_curves import (
    DeletionAUC,
    InsertionAUC,
    InsertionMinusDeletion,
)
from contrastive_saliency.metrics.pic import PerformanceInformationCurves
from contrastive_saliency.metrics.random_logit import RandomLogit
from contrastive_saliency.metrics.registry import (
    CurveInfo,
    MetricInputs,
    RegisteredMetric,
    create_metric,
    curve_info,
    list_metrics,
    metric_class,
    register_curves,
    register_metric,
)
from contrastive_saliency.metrics.representation import ChannelActivity
from contrastive_saliency.metrics.road import Road, RoadLeRF, RoadMoRF
from contrastive_saliency.metrics.sanity_checks import MapSimilarity
from contrastive_saliency.metrics.sensitivity import AvgSensitivity, MaxSensitivity

__all__ = [
    "AUPR",
    "IROF",
    "AverageDrop",
    "AverageGain",
    "AvgSensitivity",
    "ChannelActivity",
    "Complexity",
    "ConfidenceDrop",
    "CurveInfo",
    "DeletionAUC",
    "EnergyPointingGame",
    "FaithfulnessCorrelation",
    "FaithfulnessEstimate",
    "FeatureAgreement",
    "GridPointingGame",
    "GridRegionScores",
    "IncreaseInConfidence",
    "InsertionAUC",
    "InsertionMinusDeletion",
    "LocalisationError",
    "MapSimilarity",
    "MaxSensitivity",
    "MetricInputs",
    "Monotonicity",
    "MonotonicityCorrelation",
    "PerSampleValues",
    "PerformanceInformationCurves",
    "PixelFlipping",
    "PointingGame",
    "RandomLogit",
    "RegionPerturbation",
    "RegionScores",
    "RegisteredMetric",
    "RelativeDrop",
    "RelevanceRankAccuracy",
    "Road",
    "RoadLeRF",
    "RoadMoRF",
    "SampleMetric",
    "Sparseness",
    "TopKIntersection",
    "create_metric",
    "curve_info",
    "list_metrics",
    "metric_class",
    "register_curves",
    "register_metric",
    "summary_statistics",
    "unique_by_index",
]
