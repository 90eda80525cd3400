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

Each explained class is a :class:`TargetColumn` (``kind`` and, for a prediction rank or a grid
cell, ``position``), written ``top1``, ``top2``, ``ground_truth``, ``random_other``, ``cell0``…
(:attr:`TargetColumn.name`; :meth:`TargetColumn.parse` reads a name back). Policies sharing a
column share its map, so ``top1`` and ``top1_vs_top2`` cost one top-1 map, not two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from contrastive_saliency.errors import ConfigurationError, closest
from contrastive_saliency.index_random import random_other_classes

PolicyKind = Literal["single", "pair", "grid", "random_pair"]
ColumnKind = Literal["top", "ground_truth", "random_other", "cell"]
RANDOM_OTHER_SEED = 0
_NUMBERED: tuple[ColumnKind, ...] = ("top", "cell")  # kinds whose name ends in their position


@dataclass(frozen=True)
class TargetColumn:
    """One explained class of a sample: ``top`` (the ``position``-th prediction, from 1),
    ``ground_truth`` (the label), ``random_other`` (a seeded other class than the top-1) or
    ``cell`` (the class of grid cell ``position``, from 0)."""

    kind: ColumnKind
    position: int = 0

    @property
    def name(self) -> str:
        """``top1``, ``cell3``, ``ground_truth``, ...: the column's name in galleries."""
        return f"{self.kind}{self.position}" if self.kind in _NUMBERED else self.kind

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> TargetColumn:
        """The column called ``name`` (the inverse of :attr:`name`)."""
        match = re.fullmatch(r"(top|cell)(\d+)", name)
        if match:
            return cls(match[1], int(match[2]))  # type: ignore[arg-type]
        if name in ("ground_truth", "random_other"):
            return cls(name)  # type: ignore[arg-type]
        raise ValueError(
            f"unknown target column {name!r}; valid: top<rank>, ground_truth, random_other, "
            f"cell<index>"
        )


TOP1, TOP2 = TargetColumn("top", 1), TargetColumn("top", 2)
GROUND_TRUTH, RANDOM_OTHER = TargetColumn("ground_truth"), TargetColumn("random_other")


@dataclass(frozen=True)
class TargetPolicy:
    """``name``; ``kind``; ``needs``: batch keys it reads besides the logits; ``targets``:
    its columns (a ``grid`` policy has one per cell of the batch's ``grid_labels``)."""

    name: str
    kind: PolicyKind
    needs: tuple[str, ...] = ()
    targets: tuple[TargetColumn, ...] = ()

    def columns(self, batch: dict[str, torch.Tensor]) -> tuple[TargetColumn, ...]:
        """The explained classes, in order."""
        if self.kind == "grid":
            return tuple(TargetColumn("cell", i) for i in range(batch["grid_labels"].shape[1]))
        return self.targets


POLICIES: dict[str, TargetPolicy] = {
    "top1": TargetPolicy("top1", "single", targets=(TOP1,)),
    "top2": TargetPolicy("top2", "single", targets=(TOP2,)),
    "top1_vs_top2": TargetPolicy("top1_vs_top2", "pair", targets=(TOP1, TOP2)),
    "ground_truth": TargetPolicy("ground_truth", "single", ("label",), (GROUND_TRUTH,)),
    "grid_cells": TargetPolicy("grid_cells", "grid", ("grid_labels",)),
    "top1_vs_random_other": TargetPolicy(
        "top1_vs_random_other", "random_pair", ("index",), (TOP1, RANDOM_OTHER)
    ),
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
    column: TargetColumn, logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``LongTensor[B]``: the class explained in ``column`` for each sample."""
    if column.kind == "top":
        return logits.topk(max(2, column.position), dim=1).indices[:, column.position - 1]
    if column.kind == "ground_truth":
        return batch["label"].long()
    if column.kind == "random_other":
        top1 = column_classes(TOP1, logits, batch)
        indices = batch["index"].to(logits.device)
        return random_other_classes(indices, top1, logits.shape[1], RANDOM_OTHER_SEED)
    if column.kind == "cell":
        return batch["grid_labels"][:, column.position].long()
    raise ValueError(f"unknown target column {column!r}")


def correct_rows(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Samples whose top-1 prediction equals the label (for a grid image: its first cell's
    class, the ``label`` the grid datamodule sets), ``BoolTensor[B]``."""
    return logits.argmax(dim=1) == batch["label"].to(logits.device)
