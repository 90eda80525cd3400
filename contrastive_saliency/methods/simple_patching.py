"""CAAP's input-level baselines (``caap.md`` App. B.2, Tables 12–15): Simple Insertion and
Simple Deletion, the same patch selection and blank as CAAP but on the pixels instead of the
activations."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from contrastive_saliency.checks import check_batch_size
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import _check_classes
from contrastive_saliency.input_gradients import frozen_eval
from contrastive_saliency.masked_forward import COPIES_PER_PASS, chunked_class_scores, row_chunks
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.caap import SELECTIONS, BlankContext, BlankSpec, selection_matrix
from contrastive_saliency.methods.registry import register_method
from contrastive_saliency.vit_blocks import check_vision_transformer, patch_grid


class _SimplePatching(BlankContext, SaliencyMethod):
    """For every patch ``p`` of the ``h × w`` patch grid one image mixing the source ``x`` and
    the blank ``x_0`` on the pixels of ``S(p)`` (``_keep_source``), scored by the model.

    Patches: a timm ViT's own patch grid (``patch_size=None``), or squares of ``patch_size``
    pixels on any model (CAAP App. B.3 runs the baselines on CNNs), the image size a multiple of
    it. ``selection``: CAAP's ``S(p)`` (``box1``, the 3×3 patch region of App. B.2, default;
    ``none``, ``box2``, ``manhattan``). ``blank`` and its options: as :class:`~contrastive_saliency.methods.caap.CAAP`
    (default ``white``, in the images' normalisation, which ``evaluate.py`` passes).

    Cost: one forward of the images plus ``h·w`` patched copies per image, ``batch_size``
    copies per forward, under ``torch.no_grad`` in eval mode (restored); all K requested
    classes are read from the same forwards. The map is the ``[h, w]`` patch grid, upsampled
    bilinearly to the image by the base class. ``layer`` is accepted and must be ``None``.
    """

    blank_owner = "simple patching"

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        selection: str = "box1",
        blank: BlankSpec = "white",
        patch_size: int | None = None,
        batch_size: int = 64,
        normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
        noise_std: float = 1.0,
        noise_seed: int = 0,
    ) -> None:
        super().__init__(model)
        self.blank_owner = type(self).__name__
        if layer is not None:
            raise ConfigurationError(
                f"{self.blank_owner} perturbs the input image, it takes no layer; got "
                f"layer={layer!r}"
            )
        if selection not in SELECTIONS:
            raise ConfigurationError(
                f"{self.blank_owner} selection must be one of {', '.join(SELECTIONS)}, got "
                f"{selection!r}"
            )
        if patch_size is None:
            try:
                self.vit = check_vision_transformer(model, self.blank_owner)
            except ConfigurationError as error:
                raise ConfigurationError(
                    f"{self.blank_owner}: patch_size=None takes the patch grid of a timm ViT, "
                    f"and this model is not one ({error}); give patch_size (pixels per patch "
                    f"side, e.g. 16 or 32 for a CNN)"
                ) from error
        elif isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ConfigurationError(
                f"{self.blank_owner} patch_size must be a positive number of pixels or None "
                f"(a ViT's own patches), got {patch_size!r}"
            )
        self.selection = selection
        self.patch_size = patch_size
        self.batch_size = check_batch_size(batch_size, counts=COPIES_PER_PASS)
        self._init_blank(blank, normalisation, noise_std, noise_seed)

    @abstractmethod
    def _keep_source(self, selected: torch.Tensor) -> torch.Tensor:
        """``[N, N]`` bool: row ``p`` marks the patches whose pixels come from the source."""

    @abstractmethod
    def _score(self, original: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
        """The map value from the source's scores and the patched image's, both ``[·, K]``."""

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """``(h, w)`` patches of ``images`` ``[B, C, H, W]``."""
        height, width = images.shape[-2:]
        if self.patch_size is None:
            rows, cols = patch_grid(self.vit, images)
            fits = height % rows == 0 and width % cols == 0
        else:
            rows, cols = height // self.patch_size, width // self.patch_size
            fits = rows > 0 and height % self.patch_size == 0 and width % self.patch_size == 0
        if not fits:
            raise ConfigurationError(
                f"{self.blank_owner}: images of {height}x{width} pixels do not split into "
                f"equal patches of {self.patch_size or 'the ViT patch'} pixels; choose a "
                f"patch_size dividing both sides"
            )
        return rows, cols

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        rows, cols = self.grid(images)
        patches = rows * cols
        keep = self._keep_source(selection_matrix(self.selection, (rows, cols)))
        # pixel masks [N, H, W] of the source pixels of each patched image
        keep = keep.view(patches, rows, cols).to(images.device)
        keep = keep.repeat_interleave(height // rows, 1).repeat_interleave(width // cols, 2)
        blank = self._blank_image(images)
        classes = classes.to(images.device)
        with frozen_eval(self.model), torch.no_grad():
            logits = self.model(images)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ConfigurationError(
                    f"{self.blank_owner} needs a model returning logits [B, num_classes]; it "
                    f"returned {getattr(logits, 'shape', type(logits).__name__)}"
                )
            _check_classes(classes, logits.shape[1])
            dtype = torch.promote_types(logits.dtype, torch.float32)
            original = logits.to(dtype).gather(1, classes)  # [B, K]
            # Row r of the B·N patched images: patch r // B of image r % B (patch-major).
            patch_of_row = torch.arange(patches, device=images.device).repeat_interleave(batch)
            image_of_row = torch.arange(batch, device=images.device).repeat(patches)

            def patched_logits(chunk: slice) -> torch.Tensor:
                which = image_of_row[chunk]
                source = keep[patch_of_row[chunk]].unsqueeze(1)  # [n, 1, H, W]
                context = blank[which] if blank.shape[0] == batch else blank
                return self.model(torch.where(source, images[which], context)).to(dtype)

            scores = chunked_class_scores(
                patched_logits, row_chunks(batch * patches, self.batch_size), classes[image_of_row]
            )  # [N·B, K]
        values = self._score(original.repeat(patches, 1), scores)
        return values.view(rows, cols, batch, -1).permute(2, 3, 0, 1)  # [B, K, h, w]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(selection={self.selection!r}, blank={self.blank!r}, "
            f"patch_size={self.patch_size}, batch_size={self.batch_size})"
        )


@register_method("simple_insertion")
class SimpleInsertion(_SimplePatching):
    """Simple Insertion (CAAP App. B.2): "a selected source patch is inserted directly into a
    blank target image and the resulting class score is used as the attribution signal":
    ``A(p) = f(x ⊙ M_S(p) + x_0 ⊙ (1 − M_S(p)))_y``, ``M_S(p)`` the pixels of the patches
    ``S(p)`` (3×3 patch region by default), ``x_0`` CAAP's blank, ``f(·)_y`` the logit of the
    explained class (CAAP's score, Eq. 3). Options as :class:`_SimplePatching`."""

    def _keep_source(self, selected: torch.Tensor) -> torch.Tensor:
        return selected

    def _score(self, original: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
        return patched


@register_method("simple_deletion")
class SimpleDeletion(_SimplePatching):
    """Simple Deletion (CAAP App. B.2): "the selected patch is removed from the input image
    while all other pixels remain unchanged": ``A(p) = f(x)_y − f(x ⊙ (1 − M_S(p)) + x_0 ⊙
    M_S(p))_y``, the drop of the explained class's logit when the pixels of ``S(p)`` are
    replaced by CAAP's blank. The paper names neither the fill of the removed pixels nor the
    sign; the blank is CAAP's (white by default) and the sign makes a larger value a more
    important patch, as for every map here (docs/deviations.md). Options as
    :class:`_SimplePatching`."""

    def _keep_source(self, selected: torch.Tensor) -> torch.Tensor:
        return ~selected

    def _score(self, original: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
        return original - patched
