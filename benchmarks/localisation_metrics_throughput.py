"""Maps/s of ``relevance_rank_accuracy`` and ``pointing_game`` against Quantus' own
``RelevanceRankAccuracy`` / ``PointingGame`` on the same maps and masks, side by side in one run
(calls interleaved, so a change of load on a shared machine hits both alike; the ratio is the
figure to read).

Both read the map and a ground-truth mask (no model), so the figure is the cost of the metric
itself: ours batched in torch on ``--device``, Quantus' NumPy path with its defaults on the
same maps and masks as arrays. Maps are continuous random values (no ties), where the two
definitions agree exactly (tests/test_localisation_metrics.py); the JSON records the largest
difference of the values.

    uv run python benchmarks/localisation_metrics_throughput.py                 # 64 maps at 224²
    uv run python benchmarks/localisation_metrics_throughput.py --device cuda --maps 256

Writes JSON (default ``benchmarks/results/localisation_metrics_throughput_<device>.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._map_metric_comparison import compare_map_metrics
from contrastive_saliency.metrics.functional import pointing_game, relevance_rank_accuracy

PAIRS = (
    ("relevance_rank_accuracy", relevance_rank_accuracy, "RelevanceRankAccuracy"),
    # ties="any" is Quantus' rule; on maps without ties every rule gives the same hit
    ("pointing_game", lambda maps, masks: pointing_game(maps, masks, "any"), "PointingGame"),
)


def _object_masks(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, size, size]`` boolean discs of random centre and radius (10–30 % of the side)."""
    centres = torch.rand(count, 2, generator=generator) * size
    radii = (0.1 + 0.2 * torch.rand(count, generator=generator)) * size
    coordinates = torch.arange(size, dtype=torch.float32)
    dy = coordinates[None, :, None] - centres[:, 0, None, None]
    dx = coordinates[None, None, :] - centres[:, 1, None, None]
    return dy**2 + dx**2 <= radii[:, None, None] ** 2


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return compare_map_metrics(
        "localisation_metrics_throughput",
        __doc__.split("\n\n")[0],
        PAIRS,
        argv,
        masks=_object_masks,
    )


if __name__ == "__main__":
    main()
