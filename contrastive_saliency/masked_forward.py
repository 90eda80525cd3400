"""Many modified copies of a batch through a model, ``batch_size`` copies per forward pass.

Perturbation CAMs (Score-CAM, Ablation-CAM, the score-based Finer-CAM) score ``R`` modified
copies ("rows") of a batch of images: row ``r`` is image ``b_r`` with a change that depends on
the row (the image masked by one channel's map, or one channel of a layer's output ablated).
The rows go through the model in chunks of ``batch_size``; of each row's logits only the class
columns requested for that row are kept (one gather), so scoring K classes costs the same
forward passes as scoring one.

Two ways of changing a row: build the chunk's inputs (:func:`chunked_class_scores` with a
``run`` that masks images), or replace a layer's output by a precomputed stack of modified
activations (:func:`substitute_layer_output`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from contrastive_saliency.checks import check_batch_size
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.layers import resolve_layer

COPIES_PER_PASS = "modified copies per forward pass"
"""What a ``batch_size`` counts here (for :func:`~contrastive_saliency.checks.check_batch_size`)."""


def row_chunks(num_rows: int, batch_size: int, group_size: int | None = None) -> list[slice]:
    """Consecutive slices covering ``range(num_rows)`` with at most ``batch_size`` rows each.

    With ``group_size``, rows come in groups of that many (``num_rows`` must be a multiple) and
    no slice crosses a group boundary: every forward pass then holds rows of one group only.
    """
    check_batch_size(batch_size, counts=COPIES_PER_PASS)
    if group_size is None:
        return [
            slice(start, min(start + batch_size, num_rows))
            for start in range(0, num_rows, batch_size)
        ]
    if group_size < 1 or num_rows % group_size:
        raise ValueError(f"{num_rows} rows do not split into groups of {group_size}")
    return [
        slice(group + start, group + min(start + batch_size, group_size))
        for group in range(0, num_rows, group_size)
        for start in range(0, group_size, batch_size)
    ]


def chunked_class_scores(
    run: Callable[[slice], torch.Tensor],
    chunks: Sequence[slice],
    classes: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``scores[r, m] = transform(logits_r)[classes[r, m]]`` for every row, one forward per chunk.

    ``run(chunk)`` returns the logits ``[n, N]`` of the chunk's ``n`` rows; ``classes`` is
    ``LongTensor[R, M]`` (the columns kept for each row); ``transform`` maps logits to scores
    over all N classes (e.g. a softmax) before the gather. Returns ``[R, M]``. Call it under
    ``torch.no_grad()``: nothing here needs autograd.
    """
    kept = []
    for chunk in chunks:
        logits = run(chunk)
        rows = classes[chunk]
        if logits.dim() != 2 or logits.shape[0] != rows.shape[0]:
            raise ConfigurationError(
                f"the model returned shape {tuple(logits.shape)} for a batch of {rows.shape[0]} "
                f"modified copies; perturbation CAMs need logits of shape [batch, num_classes]"
            )
        scores = transform(logits) if transform is not None else logits
        kept.append(scores.gather(1, rows))
    if not kept:
        return classes.new_zeros(classes.shape, dtype=torch.float32)
    return torch.cat(kept)


@dataclass
class OutputSwap:
    """The tensor a layer returns in place of its own output (see
    :func:`substitute_layer_output`); set ``value`` before each forward pass."""

    path: str
    value: torch.Tensor | None = None


@contextmanager
def substitute_layer_output(model: nn.Module, path: str) -> Iterator[OutputSwap]:
    """Inside the block, layer ``path`` returns ``swap.value`` instead of its output.

    The layer and everything before it still run (a forward hook cannot skip them); the value
    may have another batch size than the layer's own output, which is how Ablation-CAM runs the
    layers before ``path`` on one image while those after it see a stack of ablated copies.
    The hook is removed on exit, also on error; ``swap.value`` is cleared after each forward.
    """
    swap = OutputSwap(path)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if swap.value is None:
            raise RuntimeError(f"no substitute output was set for layer {path!r}")
        value, swap.value = swap.value, None
        return value

    handle = resolve_layer(model, path).register_forward_hook(hook)
    try:
        yield swap
    finally:
        handle.remove()
