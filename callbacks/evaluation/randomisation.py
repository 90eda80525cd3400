"""Cascading model-parameter randomisation on a few samples (Adebayo et al., NeurIPS 2018,
Sec. 3.1; VAR Sec. 4.3, Fig. 6): how similar each method's map stays to the trained model's map
as layers are re-initialised from the logits towards the input. A method that explains the
model should drift away; one that stays similar is insensitive to the parameters.

Protocol (PROTOCOLS.md, "Sanity check"): the maps are compared by the Spearman rank correlation
with and without absolute value, SSIM of the [0, 1]-normalised maps and the Spearman
correlation of their HOG features (:mod:`contrastive_saliency.metrics.functional.map_similarity`;
Adebayo et al.'s four, the default); VAR App. Figs. 8–14 add the cosine similarity and the
Pearson correlation of the maps (``cosine``, ``pearson``). All requested measures are
computed from the same maps in one pass. The class explained on a
randomised model is that model's own argmax (``target="randomised_argmax"``, Adebayo et al.'s
reference code); ``target="original"`` keeps explaining the trained model's prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from contrastive_saliency.metrics.functional import (
    cascading_randomisation,
    cosine_similarity_maps,
    default_randomisation_order,
    hog_similarity,
    pearson_similarity,
    spearman_similarity,
    ssim_similarity,
)

DEFAULT_MEASURES = ("spearman_abs", "spearman", "ssim", "hog")  # Adebayo et al. Sec. 4
MEASURES = (*DEFAULT_MEASURES, "cosine", "pearson")  # + VAR App. Figs. 8–14
TARGETS = ("randomised_argmax", "original")
ROOT_STEP = "(root parameters)"  # the step label of the model's own parameters (name "")
MethodBuilder = Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def map_similarity(measure: str, original: torch.Tensor, randomised: torch.Tensor) -> torch.Tensor:
    """Per-sample similarity ``[B]`` of two ``[B, H, W]`` map batches by one of :data:`MEASURES`:
    ``spearman_abs`` / ``spearman`` (rank correlation with / without absolute value), ``ssim``
    (maps min-max normalised to [0, 1]), ``hog`` (rank correlation of HOG descriptors),
    ``cosine`` (cosine similarity of the maps as pixel vectors) and ``pearson`` (Pearson
    correlation of the maps)."""
    if measure == "spearman_abs":
        return spearman_similarity(original, randomised, absolute=True)
    if measure == "spearman":
        return spearman_similarity(original, randomised)
    if measure == "ssim":
        return ssim_similarity(original, randomised)
    if measure == "hog":
        return hog_similarity(original, randomised)
    if measure == "cosine":
        return cosine_similarity_maps(original, randomised)
    if measure == "pearson":
        return pearson_similarity(original, randomised)
    raise ValueError(f"unknown similarity measure {measure!r}; valid: {', '.join(MEASURES)}")


def check_measures(measures: Sequence[str]) -> tuple[str, ...]:
    """``measures`` as a tuple; unknown or repeated names and an empty list are errors."""
    if isinstance(measures, str):
        measures = [measures]
    measures = tuple(measures)
    if not measures:
        raise ValueError(f"measures is empty; list at least one of {', '.join(MEASURES)}")
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"unknown similarity measure(s) {unknown}; valid: {', '.join(MEASURES)}")
    if len(set(measures)) != len(measures):
        raise ValueError(f"measures lists a measure twice: {list(measures)}")
    return measures


def _rows(
    key: tuple[str, str], step: str, step_index: int, similarities: Mapping[str, torch.Tensor],
    changed: float,
) -> list[dict]:  # fmt: skip
    method, layer = key
    return [
        {
            "method": method,
            "layer": layer,
            "step": step,
            "step_index": step_index,
            "measure": measure,
            "similarity": float(values.double().mean()),
            "sd": float(values.double().std(correction=0)),
            "n": int(values.numel()),
            "changed_class": changed,
        }
        for measure, values in similarities.items()
    ]


@torch.no_grad()
def randomisation_curves(
    model: nn.Module,
    images: torch.Tensor,
    builders: Mapping[tuple[str, str], MethodBuilder],
    *,
    measures: Sequence[str] = DEFAULT_MEASURES,
    target: str = "randomised_argmax",
    classes: torch.Tensor | None = None,
    order: Sequence[str] | None = None,
    max_steps: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean similarity to the original maps after each cascading randomisation step.

    ``builders[(method, layer)](model)`` returns the method for (a randomised copy of) the
    model; each is called once per step on ``images`` ``[B, C, H, W]``. The original maps
    explain ``classes`` ``[B]`` (default: the trained model's argmax). On a randomised model the
    explained class is, with ``target="randomised_argmax"`` (default, the protocol), that
    model's own argmax, and with ``target="original"`` the same ``classes``. ``order`` (module
    names, logits first; default :func:`default_randomisation_order`) and ``max_steps`` (the
    first steps only) choose the layers; ``seed`` their random values.

    Returns one row per (method, layer, step, measure): ``step`` (the layer randomised last;
    ``"original"`` at step 0, where similarity is 1 by definition), ``step_index``,
    ``similarity`` (mean over the samples), ``sd`` (population standard deviation), ``n``,
    ``changed_class`` (fraction of samples whose explained class differs from the original
    one) and ``fraction`` (``step_index`` / number of steps, VAR Fig. 6's x axis).
    """
    measures = check_measures(measures)
    if target not in TARGETS:
        raise ValueError(f"unknown sanity-check target {target!r}; valid: {', '.join(TARGETS)}")
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if not builders:
        raise ValueError("builders is empty; give at least one (method, layer) builder")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be ≥ 1 or None, got {max_steps}")
    names = list(order) if order is not None else default_randomisation_order(model)
    names = names[:max_steps] if max_steps is not None else names
    if classes is None:
        classes = model(images).argmax(dim=1)
    classes = classes.to(images.device).long()
    originals = {key: build(model)(images, classes)[:, 0] for key, build in builders.items()}
    ones = torch.ones(images.shape[0], dtype=torch.float64)
    rows = [
        row
        for key in builders
        for row in _rows(key, "original", 0, dict.fromkeys(measures, ones), 0.0)
    ]
    steps = cascading_randomisation(model, names, seed=seed)
    for step_index, (name, randomised) in enumerate(steps, start=1):
        explained = classes
        if target == "randomised_argmax":
            explained = randomised(images).argmax(dim=1)
        changed = float((explained != classes).double().mean())
        for key, build in builders.items():
            maps = build(randomised)(images, explained)[:, 0]
            similarities = {m: map_similarity(m, originals[key], maps) for m in measures}
            rows += _rows(key, name or ROOT_STEP, step_index, similarities, changed)
    frame = pd.DataFrame(rows)
    return frame.assign(fraction=frame["step_index"] / len(names), target=target)
