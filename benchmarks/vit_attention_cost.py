"""K-class cost of the ViT attention attributions of VAR's Table 1 (Grad-Rollout, T-attn,
Bi-attn, T-LRP, InFlow; class-agnostic attention rollout for scale), in one run.

The methods' table of ``saliency_throughput.py`` on a random-init timm ViT (speed does not
depend on the weights), each method with its paper defaults: seconds for maps of 1 class and
of K classes per image, ``k_over_1`` = their ratio (K separate calls would cost K×; the
methods share their forward passes between the classes), cost in forward equivalents, host
round trips per call.

    uv run python benchmarks/saliency_throughput.py vit_attention          # ViT-Ti 224², batch 4, K = 5
    uv run python benchmarks/saliency_throughput.py vit_attention --device cuda --batch-size 16

Any option of ``saliency_throughput.py`` may follow (``--model``, ``--classes``, ...). Writes
JSON (default ``benchmarks/results/vit_attention_cost_<device>.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = (
    "attention_rollout",
    "grad_rollout",
    "transition_attention",
    "bidirectional_attention",
    "transformer_attribution",
    "inflow",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.saliency_throughput import gradient_cam_suite

    argv = sys.argv[1:] if argv is None else list(argv)
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    known.add_argument("--output", default=None)
    options, _ = known.parse_known_args(argv)
    output = options.output or f"benchmarks/results/vit_attention_cost_{options.device}.json"
    defaults = [
        "--model", "timm:vit_tiny_patch16_224", "--layer", "blocks.11.norm1",
        "--batch-size", "4", "--classes", "5", "--no-library", "--methods", *METHODS,
    ]  # fmt: skip
    return gradient_cam_suite([*defaults, *argv, "--output", output])


if __name__ == "__main__":
    main()
