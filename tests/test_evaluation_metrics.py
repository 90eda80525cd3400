"""The evaluation's metric adapters hand the batch's sample ``index`` to every tie-broken
metric, so a sample's value does not depend on the batch it came in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from callbacks.evaluation_metrics import METRICS, MetricContext
from saliency.errors import ConfigurationError
from saliency.metrics import functional as M

TIE_BROKEN = ("confidence_drop", "relative_drop", "deletion_auc", "insertion_auc")


def _context(rows: torch.Tensor, with_index: bool = True) -> MetricContext:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 8, 8, generator=generator)
    maps = (torch.rand(4, 1, 8, 8, generator=generator) * 2).floor()  # half the pixels tie
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    batch = {"image": images[rows]}
    if with_index:
        batch["index"] = torch.tensor([40, 41, 42, 43])[rows]
    with torch.no_grad():
        logits = model(images[rows])
    return MetricContext(
        model=model.eval(), images=images[rows], maps=maps[rows],
        classes=logits.argmax(dim=1, keepdim=True), logits=logits, batch=batch,
    )  # fmt: skip


def _values(context: MetricContext) -> dict[str, torch.Tensor]:
    return {
        name: METRICS[name].compute(context, METRICS[name].options({}))[0][""]
        for name in TIE_BROKEN
    }


def test_adapters_pass_the_sample_index_to_tie_broken_metrics():
    context = _context(torch.arange(4))
    values = _values(context)
    maps, classes = context.maps[:, 0], context.classes[:, 0]
    direct = M.confidence_drop(
        context.model, context.images, maps, classes, 0.05, indices=context.batch["index"]
    )
    torch.testing.assert_close(values["confidence_drop"], direct)
    other = M.confidence_drop(
        context.model, context.images, maps, classes, 0.05, indices=context.batch["index"] + 4
    )
    assert not torch.allclose(other, direct)  # the index decides the ties: it must be passed
    # The same samples in another order and another batch: the same per-sample values.
    reordered = _values(_context(torch.tensor([2, 0, 3, 1])))
    alone = _values(_context(torch.tensor([3])))
    for name in TIE_BROKEN:
        torch.testing.assert_close(reordered[name], values[name][[2, 0, 3, 1]], msg=name)
        torch.testing.assert_close(alone[name], values[name][[3]], msg=name)
    with pytest.raises(ConfigurationError, match="index"):
        _values(_context(torch.arange(4), with_index=False))
