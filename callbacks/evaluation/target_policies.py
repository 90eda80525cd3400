"""Target policies: which classes an evaluation explains for each sample.

| policy | explained classes | kind |
|---|---|---|
| ``top1`` | the predicted class | single |
| ``top2`` | the runner-up prediction | single |
| ``top1_vs_top2`` | both (CASE RQ1: are the two maps different?) | pair |
| ``ground_truth`` | the label | single |
| ``grid_cells`` | each of the classes of a 2×2 grid image (``grid_labels``; VAR Sec. 4.1) | grid |
| ``top1_vs_random_other`` | the predicted class and a uniformly drawn other class, seeded by the sample ``index`` (Random Logit, Sixt et al. 2020) | random_pair |

``random_pair`` is its own kind so that metrics of a pair of predicted classes (feature
agreement) do not run on it; ``random_logit`` runs only there. The other class is
:func:`contrastive_saliency.index_random.random_other_classes` (seed :data:`RANDOM_OTHER_SEED`): the same
class for a sample on every rank and in every batch.

Columns are named (``top1``, ``top2``, ``ground_truth``, ``cell0``…): policies sharing a column
share its map, so ``top1`` and ``top1_vs_top2`` cost one top-1 map, not two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from contrastive_saliency.errors import ConfigurationError, closest
from contrastive_saliency.index_random import random_other_classes

PolicyKind = Literal["single", "pair", "grid", "random_pair"]
RANDOM_OTHER_SEED = 0


@dataclass(frozen=True)
class TargetPolicy:
    """``name``; ``kind``; ``needs``: batch keys it reads besides the logits."""

    name: str
    kind: PolicyKind
    needs: tuple[str, ...] = ()

    def columns(self, batch: dict[str, torch.Tensor]) -> tuple[str, ...]:
        """Names of the explained classes, in order."""
        if self.name == "top1_vs_top2":
            return ("top1", "top2")
        if self.name == "top1_vs_random_other":
            return ("top1", "random_other")
        if self.name == "grid_cells":
            return tuple(f"cell{i}" for i in range(batch["grid_labels"].shape[1]))
        return (self.name,)


POLICIES: dict[str, TargetPolicy] = {
    "top1": TargetPolicy("top1", "single"),
    "top2": TargetPolicy("top2", "single"),
    "top1_vs_top2": TargetPolicy("top1_vs_top2", "pair"),
    "ground_truth": TargetPolicy("ground_truth", "single", ("label",)),
    "grid_cells": TargetPolicy("grid_cells", "grid", ("grid_labels",)),
    "top1_vs_random_other": TargetPolicy("top1_vs_random_other", "random_pair", ("index",)),
}


def parse_policies(names: list[str]) -> list[TargetPolicy]:
    if not names:
        raise ConfigurationError("evaluation.targets is empty; valid: " + ", ".join(POLICIES))
    policies = []
    for name in names:
        if name not in POLICIES:
            hint = closest(name, POLICIES)
            raise ConfigurationError(
                f"unknown target policy {name!r}; "
                f"{'did you mean ' + ', '.join(hint) + '? ' if hint else ''}"
                f"valid: {', '.join(POLICIES)}"
            )
        policies.append(POLICIES[name])
    if len({p.name for p in policies}) != len(policies):
        raise ConfigurationError(f"evaluation.targets lists a policy twice: {names}")
    return policies


def column_classes(
    column: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``LongTensor[B]``: the class explained in ``column`` for each sample."""
    if column in ("top1", "top2"):
        return logits.topk(2, dim=1).indices[:, 0 if column == "top1" else 1]
    if column == "ground_truth":
        return batch["label"].long()
    if column == "random_other":
        top1 = column_classes("top1", logits, batch)
        indices = batch["index"].to(logits.device)
        return random_other_classes(indices, top1, logits.shape[1], RANDOM_OTHER_SEED)
    if column.startswith("cell"):
        return batch["grid_labels"][:, int(column.removeprefix("cell"))].long()
    raise ValueError(f"unknown target column {column!r}")


def correct_rows(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Samples whose top-1 prediction equals the label (for a grid image: its first cell's
    class, the ``label`` the grid datamodule sets), ``BoolTensor[B]``."""
    return logits.argmax(dim=1) == batch["label"].to(logits.device)
