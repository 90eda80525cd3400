"""Which data a split is drawn from, so a confusion matrix is never computed on the split it
then explains (CASE Sec. III-C: the matrix comes from held-out data).

Every datamodule of this package has ``split_source(split) -> str``: the dataset and the
official partition (file, folder, generated split) whose samples ``split`` is drawn from, e.g.
``"CIFAR-100/test"``, ``"CUB-200-2011/train"``, ``"ImageNet-1k/val"``,
``"shapes(ShapesConfig(...))/val"``. The rule: two splits with **different** sources share no
sample; two splits with the **same** source may (``val`` = ``test`` when ``val_fraction`` is 0;
a hold-out of train and train itself). A hold-out is named by its partition (``…/train``): the
check below compares sources, not sample lists, so it also holds for a sample of a split
(``evaluation.sample_size``) and for subsets such as the ImageNet-S images of the val set.

Sources name the data, not its location (no root path), so a matrix a training run computed on
one machine is checked against an evaluation on another. ``ImageFolderDataModule`` names its
dataset by the root folder's name.
"""

from __future__ import annotations

from typing import Any

__all__ = ["split_source"]


def split_source(datamodule: Any, split: str) -> str | None:
    """``datamodule.split_source(split)``, or None for a datamodule that does not declare its
    sources (then nothing can be checked)."""
    declared = getattr(datamodule, "split_source", None)
    return declared(split) if callable(declared) else None
