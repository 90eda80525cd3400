"""Occlusion: the drop of a class score when a sliding window of the image is replaced by a
baseline, averaged over the windows that cover each pixel."""

from __future__ import annotations

import math

import torch
from torch import nn

from contrastive_saliency.checks import check_batch_size
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import _check_classes
from contrastive_saliency.input_gradients import frozen_eval
from contrastive_saliency.masked_forward import COPIES_PER_PASS, chunked_class_scores, row_chunks
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.gradient_attributions import broadcast_baseline, check_baseline
from contrastive_saliency.methods.registry import register_method


@register_method("occlusion")
class Occlusion(SaliencyMethod):
    """Occlusion (Zeiler & Fergus, ECCV 2014, Sec. 4.2, "occlusion sensitivity"), as Captum's
    ``Occlusion`` computes it:

    ``R_c(p) = 1/|W(p)| · Σ_{w ∈ W(p)} (S_c(x) − S_c(x ⊙ (1 − m_w) + x' ⊙ m_w))``

    where ``m_w`` is window w (``window`` = (h, w) pixels, every colour channel), the windows
    start at multiples of ``stride`` from the top-left corner until the image is covered (the
    last window of a row or column may be cut off by the border, as Captum's), ``W(p)`` are the
    windows containing pixel p and ``S_c`` is the logit of class c. ``baseline`` ``x'``: a
    number or a tensor broadcastable to ``[B, C, H, W]`` (default 0, in the space the model
    sees: the mean colour for mean/std-normalised inputs). Captum's
    ``Occlusion(model).attribute(x, sliding_window_shapes=(C, h, w), strides=(C, s_h, s_w),
    baselines=x', target=c)`` gives this map in every channel (parity test).

    Defaults ``window=15``, ``stride=8`` are the values of Captum's ImageNet tutorial (neither
    the paper nor Captum fixes them; zennit's ``Occlusion`` uses 8 / 8); ``stride`` may not
    exceed ``window`` (so every pixel is covered; Captum allows it where the window spans the
    whole image).

    Cost: one no-grad forward of the images plus ``N_windows × B`` occluded forwards,
    ``batch_size`` occluded images per pass (model in eval mode, restored); the scores of all
    K requested classes are read from the same forwards, so K classes cost what one does.
    ``layer`` is accepted for the registry's common signature and ignored.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        window: int | tuple[int, int] = 15,
        stride: int | tuple[int, int] = 8,
        baseline: float | torch.Tensor = 0.0,
        batch_size: int = 64,
    ) -> None:
        super().__init__(model)
        self.window = _pair(window, "window")
        self.stride = _pair(stride, "stride")
        for axis, size, step in zip(("height", "width"), self.window, self.stride, strict=True):
            if step > size:
                raise ConfigurationError(
                    f"occlusion stride {step} exceeds the window {size} along the {axis}, so "
                    f"some pixels would never be occluded; choose stride <= window"
                )
        self.baseline = check_baseline(baseline, "occlusion")
        self.batch_size = check_batch_size(batch_size, counts=COPIES_PER_PASS)

    def window_masks(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows as separable indicators: ``rows [n_h, H]`` and ``cols [n_w, W]`` (float),
        window ``(i, j)`` is ``rows[i]ᵀ cols[j]``."""
        return (
            _window_indicators(height, self.window[0], self.stride[0], "height"),
            _window_indicators(width, self.window[1], self.stride[1], "width"),
        )

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        rows, cols = (m.to(images.device) for m in self.window_masks(height, width))
        num_rows, num_cols = rows.shape[0], cols.shape[0]
        num_windows = num_rows * num_cols
        classes = classes.to(images.device)
        baseline = broadcast_baseline(self.baseline, images, "occlusion")
        with frozen_eval(self.model), torch.no_grad():
            logits = self.model(images)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ConfigurationError(
                    f"occlusion needs a model returning logits [B, num_classes]; it returned "
                    f"{getattr(logits, 'shape', type(logits).__name__)}"
                )
            _check_classes(classes, logits.shape[1])
            dtype = torch.promote_types(logits.dtype, torch.float32)
            original = logits.to(dtype).gather(1, classes)  # S_c(x), [B, K]
            # Row r of the B·N occluded copies: window r // B of image r % B (window-major).
            window_of_row = torch.arange(num_windows, device=images.device).repeat_interleave(batch)
            image_of_row = torch.arange(batch, device=images.device).repeat(num_windows)

            def occluded_logits(chunk: slice) -> torch.Tensor:
                windows, which = window_of_row[chunk], image_of_row[chunk]
                masks = rows[windows // num_cols, :, None] * cols[windows % num_cols, None, :]
                occluded = torch.where(masks[:, None] > 0, baseline[which], images[which])
                return self.model(occluded).to(dtype)

            scores = chunked_class_scores(
                occluded_logits, row_chunks(batch * num_windows, self.batch_size),
                classes[image_of_row],
            )  # fmt: skip
        drops = original.repeat(num_windows, 1) - scores  # [N·B, K]
        drops = drops.view(num_rows, num_cols, batch, -1).permute(2, 3, 0, 1)  # [B, K, n_h, n_w]
        rows, cols = rows.to(dtype), cols.to(dtype)
        total = torch.einsum("bkij,iy,jx->bkyx", drops, rows, cols)
        coverage = rows.sum(dim=0)[:, None] * cols.sum(dim=0)[None, :]  # windows per pixel, ≥ 1
        return total / coverage

    def __repr__(self) -> str:
        return (
            f"Occlusion(window={self.window}, stride={self.stride}, baseline={self.baseline!r}, "
            f"batch_size={self.batch_size})"
        )


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ConfigurationError(
            f"occlusion {name} must be a positive integer or a pair (height, width) of them, "
            f"got {value!r}"
        )
    return pair  # type: ignore[return-value]


def _window_indicators(size: int, window: int, stride: int, axis: str) -> torch.Tensor:
    """``[n, size]``: row i is 1 on ``[i·stride, min(i·stride + window, size))``, for the
    ``n = ⌈(size − window)/stride⌉ + 1`` window starts (Captum's shift count)."""
    if window > size:
        raise ConfigurationError(
            f"occlusion window {window} exceeds the image {axis} {size}; choose a window of at "
            f"most {size} pixels"
        )
    count = math.ceil((size - window) / stride) + 1
    starts = torch.arange(count)[:, None] * stride
    position = torch.arange(size)[None, :]
    return ((position >= starts) & (position < starts + window)).float()
