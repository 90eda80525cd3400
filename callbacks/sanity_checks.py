"""Cascading model-parameter randomisation on a few samples (Adebayo et al., NeurIPS 2018,
Sec. 3.1; VAR Fig. 6): how similar each method's map stays to the trained model's map as layers
are re-initialised from the logits towards the input. A method that explains the model should
drift away; one that stays similar is insensitive to the parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from saliency.metrics.functional import (
    cascading_randomisation,
    default_randomisation_order,
    spearman_similarity,
    ssim_similarity,
)

MEASURES = ("spearman_abs", "spearman", "ssim")
MethodBuilder = Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def _similarity(measure: str, original: torch.Tensor, randomised: torch.Tensor) -> torch.Tensor:
    if measure == "ssim":
        return ssim_similarity(original, randomised)
    return spearman_similarity(original, randomised, absolute=measure == "spearman_abs")


@torch.no_grad()
def randomisation_curves(
    model: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor,
    builders: dict[tuple[str, str], MethodBuilder],
    measure: str = "spearman_abs",
    order: Sequence[str] | None = None,
    max_steps: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean similarity to the original map after each cascading randomisation step.

    ``builders[(method, layer)](model)`` returns the method for a (randomised copy of the)
    model; ``classes`` ``[B]`` are explained on the original and on every randomised model.
    Returns ``method, layer, step, step_index, similarity, measure``; step 0 ("original") has
    similarity 1 by definition. ``max_steps`` limits the layers randomised (from the logits).
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown similarity measure {measure!r}; valid: {', '.join(MEASURES)}")
    names = list(order) if order is not None else default_randomisation_order(model)
    names = names[:max_steps] if max_steps is not None else names
    originals = {key: build(model)(images, classes)[:, 0] for key, build in builders.items()}
    rows = [
        {"method": m, "layer": layer, "step": "original", "step_index": 0, "similarity": 1.0}
        for m, layer in builders
    ]
    for step_index, (name, randomised) in enumerate(
        cascading_randomisation(model, names, seed=seed), start=1
    ):
        for (method, layer), build in builders.items():
            maps = build(randomised)(images, classes)[:, 0]
            similarity = _similarity(measure, originals[(method, layer)], maps)
            rows.append(
                {
                    "method": method,
                    "layer": layer,
                    "step": name,
                    "step_index": step_index,
                    "similarity": float(similarity.float().mean()),
                }
            )
    return pd.DataFrame(rows).assign(measure=measure)
