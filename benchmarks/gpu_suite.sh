#!/usr/bin/env bash
# GPU verification in one call: correctness tests, throughput, one full study (JSON + a table).
#
#   bash benchmarks/gpu_suite.sh                        # CUDA, full (estimated <= 8 min on one H100)
#   bash benchmarks/gpu_suite.sh --quick                # CUDA, estimated <= 3 min
#   bash benchmarks/gpu_suite.sh --device cpu --quick   # CI-sized run of the same code paths
#   bash benchmarks/gpu_suite.sh --help                 # options (--output DIR, --steps ...)
#
# Runs benchmarks/gpu_suite.py from the repository root with the project's environment (uv if
# present, else the python on PATH, which must have the project installed).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v uv >/dev/null 2>&1; then
    exec uv run --frozen python -m benchmarks.gpu_suite "$@"
fi
exec python -m benchmarks.gpu_suite "$@"
