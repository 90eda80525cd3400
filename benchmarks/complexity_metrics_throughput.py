"""Maps/s of ``sparseness`` and ``complexity`` against Quantus' own ``Sparseness`` /
``Complexity`` on the same maps, side by side in one run (calls interleaved, so a change of
load on a shared machine hits both alike; the ratio is the figure to read).

Both metrics read the map alone (no model), so the figure is the cost of the metric itself:
ours batched in torch on ``--device``, Quantus' NumPy path with its defaults (``abs``,
``normalise``) on the same maps as arrays.

    uv run python benchmarks/complexity_metrics_throughput.py                 # 64 maps at 224²
    uv run python benchmarks/complexity_metrics_throughput.py --device cuda --maps 256

Writes JSON (default ``benchmarks/results/complexity_metrics_throughput_<device>.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._map_metric_comparison import compare_map_metrics
from contrastive_saliency.metrics.functional import complexity, sparseness

PAIRS = (("sparseness", sparseness, "Sparseness"), ("complexity", complexity, "Complexity"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return compare_map_metrics(
        "complexity_metrics_throughput", __doc__.split("\n\n")[0], PAIRS, argv
    )


if __name__ == "__main__":
    main()
