"""CAMs whose channel weights come from forward passes of perturbed copies, not gradients:
Score-CAM (masked inputs), Ablation-CAM (ablated channels) and the score-based Finer-CAM.

All three capture the layer's activations ``A`` (``[B, C, h, w]`` after
:mod:`contrastive_saliency.feature_layout`) in one plain forward, score ``B·C'`` perturbed copies
``batch_size`` per forward pass (:mod:`contrastive_saliency.masked_forward`), and keep of every copy's
logits the columns of all requested classes, so K classes cost the same forward passes as one.
Nothing needs autograd: the model runs in eval mode under ``torch.no_grad``, and its mode,
parameter flags and hooks are restored afterwards, also on error.

Channel subsampling (``max_channels``): only ``C' = min(max_channels, C)`` channels are scored
and summed. ``channel_selection="variance"`` keeps, per image, the channels whose activation
map has the largest spatial variance (ties to the lower channel index); ``"random"`` keeps the
same seeded uniform subset (``seed``) for every image. The other channels get no weight
(Ablation-CAM: weight 0, as pytorch-grad-cam's skipped channels; Score-CAM: the channel
softmax runs over the kept channels only).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from contrastive_saliency.checks import check_batch_size
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.feature_layout import FeatureLayout, check_layout, detect_layout
from contrastive_saliency.gradients import _check_classes
from contrastive_saliency.input_gradients import frozen_eval
from contrastive_saliency.layers import capture_layer, default_layer, resolve_layer
from contrastive_saliency.masked_forward import (
    COPIES_PER_PASS,
    chunked_class_scores,
    row_chunks,
    substitute_layer_output,
)
from contrastive_saliency.methods._contrastive import Selector, _check_selector_classes
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.gradient_cams import weighted_sum
from contrastive_saliency.methods.registry import register_method
from contrastive_saliency.targets import LogitNeighbours

ScoreKind = Literal["logit", "probability"]
ChannelSelection = Literal["variance", "random"]

MASK_EPS = 1e-8  # pytorch-grad-cam's min-max denominator: (A - min) / (max - min + 1e-8)
ABLATION_OFFSET = 1e7  # pytorch-grad-cam's AblationLayer: min(A) - 1e7 when min(A) != 0


class PerturbationCAM(SaliencyMethod):
    """Shared set-up of the perturbation CAMs: layer (``None`` → :func:`default_layer`,
    validated here), ``layout`` (``"nchw"``, ``"nhwc"``, ``"tokens"``, ``None`` = detect),
    ``batch_size`` (perturbed copies per forward pass) and channel subsampling (module
    docstring). ``ReLU(Σ_k w_k A_k)`` over the kept channels, ``w`` from :meth:`weights`."""

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        batch_size: int = 32,
        layout: str | None = None,
        max_channels: int | None = None,
        channel_selection: ChannelSelection = "variance",
        seed: int = 0,
    ) -> None:
        super().__init__(model)
        self.layer = layer if layer is not None else default_layer(model)
        resolve_layer(model, self.layer)  # fail at construction, not at the first batch
        self.layout = check_layout(layout)
        self.batch_size = check_batch_size(batch_size, counts=COPIES_PER_PASS)
        if max_channels is not None and (
            isinstance(max_channels, bool) or not isinstance(max_channels, int) or max_channels < 1
        ):
            raise ConfigurationError(
                f"max_channels must be a positive integer or None (all channels), got "
                f"{max_channels!r}"
            )
        if channel_selection not in ("variance", "random"):
            raise ConfigurationError(
                f"channel_selection must be 'variance' (largest spatial variance per image) or "
                f"'random' (one seeded subset), got {channel_selection!r}"
            )
        self.max_channels = max_channels
        self.channel_selection = channel_selection
        self.seed = seed

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        classes = classes.to(images.device)
        with frozen_eval(self.model), torch.no_grad():
            with capture_layer(self.model, self.layer, track_gradient=False) as capture:
                logits = self.model(images)
                output = capture.output()
            if logits.dim() != 2:
                raise ConfigurationError(
                    f"the model returns shape {tuple(logits.shape)}; perturbation CAMs need "
                    f"logits of shape [B, num_classes]"
                )
            _check_classes(classes, logits.shape[1])
            grid = detect_layout(
                self.model, self.layer, output, images.shape[-2:], self.layout, images.shape[0]
            )
            activations = grid.to_grid(output)
            channels = select_channels(
                activations, self.max_channels, self.channel_selection, self.seed
            )
            index = channels[:, :, None, None].expand(-1, -1, *activations.shape[2:])
            selected = activations.gather(1, index)  # [B, C', h, w]
            weights = self.weights(images, logits, output, grid, selected, channels, classes)
        return weighted_sum(weights.float(), selected.float()).relu()

    @abstractmethod
    def weights(
        self,
        images: torch.Tensor,
        logits: torch.Tensor,
        output: torch.Tensor,
        grid: FeatureLayout,
        selected: torch.Tensor,
        channels: torch.Tensor,
        classes: torch.Tensor,
    ) -> torch.Tensor:
        """Channel weights ``[B, K, C']`` for the kept ``channels`` ``[B, C']`` whose maps are
        ``selected`` ``[B, C', h, w]``; ``output`` is the layer's raw output in ``grid``'s
        layout and ``logits`` the unperturbed forward's."""


def select_channels(
    activations: torch.Tensor,
    max_channels: int | None,
    selection: ChannelSelection = "variance",
    seed: int = 0,
) -> torch.Tensor:
    """Indices ``[B, C']`` (ascending per row) of the channels kept for each image.

    ``C' = min(max_channels, C)``; all channels when ``max_channels`` is ``None`` or ``≥ C``.
    ``"variance"``: per image, the channels of largest spatial variance (population variance
    over ``h·w``; ties to the lower index). ``"random"``: one uniform subset drawn from a CPU
    generator seeded with ``seed``, the same for every image.
    """
    batch, num_channels = activations.shape[:2]
    device = activations.device
    if max_channels is None or max_channels >= num_channels:
        return torch.arange(num_channels, device=device).expand(batch, -1)
    if selection == "variance":
        variance = activations.flatten(2).float().var(dim=2, unbiased=False)
        kept = torch.sort(variance, dim=1, descending=True, stable=True).indices
        kept = kept[:, :max_channels]
    else:
        generator = torch.Generator().manual_seed(seed)
        subset = torch.randperm(num_channels, generator=generator)[:max_channels]
        kept = subset.to(device).expand(batch, -1)
    return kept.sort(dim=1).values


# --------------------------------------------------------------------------- Score-CAM family


class MaskedScoreCAM(PerturbationCAM):
    """Scores of the images masked by each kept channel's upsampled, min-max normalised map
    (Score-CAM Sec. 3: ``H_k = s(Up(A_k))``, ``x ∘ H_k``), shared by :class:`ScoreCAM` and
    :class:`FinerScoreCAM`.

    ``score``: ``"logit"`` (pytorch-grad-cam's ``ClassifierOutputTarget``; Finer-CAM's
    ``f(·)^c``) or ``"probability"`` (the softmax over classes, Score-CAM Alg. 1).
    ``channel_softmax``: the weights are the softmax over the kept channels of the scores
    (pytorch-grad-cam, Score-CAM Alg. 1); a baseline term, constant across channels, cancels
    there and is not computed. Without it the scores minus the baseline ``f(x_b)`` of the zero
    image ``x_b = 0`` (what a zero mask gives) are the weights (Score-CAM's increase of
    confidence; Finer-CAM Eqs. 3, 9). ``align_corners``: the bilinear upsampling of the maps;
    ``True`` as pytorch-grad-cam's ``UpsamplingBilinear2d``, ``False`` as the Score-CAM
    authors' ``F.interpolate``. Masks are ``(U - min) / (max - min + 1e-8)`` as pytorch-grad-cam;
    a constant channel's mask is exactly 0 (:func:`normalised_masks`), never NaN.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        batch_size: int = 32,
        layout: str | None = None,
        score: ScoreKind = "logit",
        channel_softmax: bool = True,
        align_corners: bool = True,
        max_channels: int | None = None,
        channel_selection: ChannelSelection = "variance",
        seed: int = 0,
    ) -> None:
        super().__init__(model, layer, batch_size, layout, max_channels, channel_selection, seed)
        if score not in ("logit", "probability"):
            raise ConfigurationError(
                f"score must be 'logit' (pytorch-grad-cam, Finer-CAM) or 'probability' (softmax "
                f"over classes, Score-CAM Alg. 1), got {score!r}"
            )
        self.score = score
        self.channel_softmax = bool(channel_softmax)
        self.align_corners = bool(align_corners)

    def weights(
        self,
        images: torch.Tensor,
        logits: torch.Tensor,
        output: torch.Tensor,
        grid: FeatureLayout,
        selected: torch.Tensor,
        channels: torch.Tensor,
        classes: torch.Tensor,
    ) -> torch.Tensor:
        requested = self.requested_classes(logits, classes)  # [B, M]
        scores = self.masked_scores(images, selected, requested)  # [B, C', M]
        num_targets = classes.shape[1]
        combined = self.combine(scores, num_targets)  # [B, C', K]
        if self.channel_softmax:
            return combined.transpose(1, 2).softmax(dim=-1)
        baseline = self.baseline_scores(images, requested[:, :num_targets])  # [B, K]
        return (combined - baseline[:, None, :]).transpose(1, 2)

    def requested_classes(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The ``[B, M]`` classes whose scores are kept from every masked forward; the first
        K columns are the targets ``classes``."""
        return classes

    def combine(self, scores: torch.Tensor, num_targets: int) -> torch.Tensor:
        """Masked-image scores ``[B, C', M]`` → per-target channel scores ``[B, C', K]``."""
        return scores[..., :num_targets]

    def scores_of(self, logits: torch.Tensor) -> torch.Tensor:
        """``f(·)`` over all classes: logits, or their softmax."""
        return logits.float().softmax(dim=1) if self.score == "probability" else logits.float()

    def masked_scores(
        self, images: torch.Tensor, selected: torch.Tensor, requested: torch.Tensor
    ) -> torch.Tensor:
        """``scores[b, k, m] = f(x_b ∘ H_k)[requested[b, m]]`` for the kept maps ``selected``
        ``[B, C', h, w]``: ``B·C'`` masked images, ``batch_size`` per forward, images mixed."""
        batch, kept = selected.shape[:2]
        image_of_row = torch.arange(batch, device=images.device).repeat_interleave(kept)
        maps = selected.flatten(0, 1)  # row r = image r // C', kept channel r % C'

        def run(chunk: slice) -> torch.Tensor:
            masks = normalised_masks(maps[chunk], images.shape[-2:], self.align_corners)
            return self.model(images[image_of_row[chunk]] * masks.to(images.dtype))

        scores = chunked_class_scores(
            run, row_chunks(batch * kept, self.batch_size), requested[image_of_row], self.scores_of
        )
        return scores.view(batch, kept, -1)

    def baseline_scores(self, images: torch.Tensor, requested: torch.Tensor) -> torch.Tensor:
        """``f(x_b)[requested]`` ``[B, M]`` for the zero image ``x_b`` (one forward of one image)."""
        baseline = self.scores_of(self.model(torch.zeros_like(images[:1])))
        return baseline.expand(images.shape[0], -1).gather(1, requested)


def normalised_masks(
    maps: torch.Tensor, size: tuple[int, int] | torch.Size, align_corners: bool = True
) -> torch.Tensor:
    """``[n, h, w]`` maps → ``[n, 1, H, W]`` masks ``s(Up(A))`` (Score-CAM Sec. 3): bilinear
    upsampling to ``size``, then ``(U − min U) / (max U − min U + 1e-8)`` per map (float32, as
    pytorch-grad-cam). A constant map gives an all-zero mask, as that formula does in exact
    arithmetic: its upsampled copy is constant only up to rounding, which the division would
    blow up into an arbitrary mask in [0, 1), so constant maps are detected before upsampling."""
    maps = maps.float()
    upsampled = F.interpolate(
        maps[:, None], size=tuple(size), mode="bilinear", align_corners=align_corners
    )
    flat = upsampled.flatten(1)
    low = flat.min(dim=1).values[:, None, None, None]
    high = flat.max(dim=1).values[:, None, None, None]
    masks = (upsampled - low) / (high - low + MASK_EPS)
    constant = (maps.amax(dim=(1, 2)) == maps.amin(dim=(1, 2)))[:, None, None, None]
    return masks.masked_fill(constant, 0.0)


@register_method("score_cam")
class ScoreCAM(MaskedScoreCAM):
    """Score-CAM (Wang et al., CVPR-W 2020, Sec. 3 and Alg. 1).

    ``H_k = s(Up(A_k))``; ``w_k^c = softmax_k(f(x ∘ H_k)^c)``; ``L^c = ReLU(Σ_k w_k^c A_k)``.

    Defaults reproduce pytorch-grad-cam's ``ScoreCAM``: ``f`` = the logit, a softmax over
    channels, ``align_corners=True`` upsampling. The paper's Alg. 1 scores the softmax
    probability of class c (``score="probability"``) and its authors' code upsamples with
    ``align_corners=False``; ``channel_softmax=False`` gives the raw increase of confidence
    ``w_k^c = f(x ∘ H_k)^c − f(x_b)^c`` with the zero image ``x_b`` (Finer-CAM Eq. 3).
    Options and channel subsampling: :class:`MaskedScoreCAM`, module docstring.
    """


@register_method("finer_score_cam")
class FinerScoreCAM(MaskedScoreCAM):
    """Score-based Finer-CAM (``finer_cam.md`` Sec. 3.2, Eq. 9, averaged as Eq. 8).

    For target c and references ``d_1..d_T`` (``references(logits, c)``, default the T = 3
    classes ranked just below the target, :class:`~contrastive_saliency.targets.LogitNeighbours`):
    ``α_k^{c,t} = f(x ∘ H_k)^c − γ f(x ∘ H_k)^{d_t} − f(x_b)^c`` with ``f`` the logit and
    ``x_b`` the zero image; the maps are averaged over the references before the ReLU, which
    for this linear combination is ``L^c = ReLU(Σ_k (1/T Σ_t α_k^{c,t}) A_k)``. ``γ = 0``
    gives Score-CAM's raw increase-of-confidence weights. One set of masked forwards serves
    targets and references (their scores are gathered from the same logits).

    Defaults are the paper's: ``gamma=0.6``, ``score="logit"``, ``channel_softmax=False``.
    Eq. 9 subtracts the baseline of the target only, not ``γ f(x_b)^d``: where the masked copies
    barely move the logits (e.g. untrained networks) every weight is close to ``−γ f(x_b)^d``
    and the map may be all zero.
    ``channel_softmax=True`` softmaxes the reference-averaged weights over channels (the
    reference code runs pytorch-grad-cam's ``ScoreCAM`` on a Finer target; the baseline term
    then cancels). ``references``: any selector ``(logits [R, N], targets [R]) -> [R, T]``
    (:mod:`contrastive_saliency.targets`), called once with the unperturbed logits repeated per target.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        batch_size: int = 32,
        layout: str | None = None,
        references: Selector | None = None,
        gamma: float = 0.6,
        score: ScoreKind = "logit",
        channel_softmax: bool = False,
        align_corners: bool = True,
        max_channels: int | None = None,
        channel_selection: ChannelSelection = "variance",
        seed: int = 0,
    ) -> None:
        super().__init__(
            model,
            layer,
            batch_size,
            layout,
            score,
            channel_softmax,
            align_corners,
            max_channels,
            channel_selection,
            seed,
        )
        self.references = references if references is not None else LogitNeighbours(3)
        self.gamma = float(gamma)

    def requested_classes(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        batch, num_targets = classes.shape
        _check_selector_classes(self.references, logits.shape[1])
        flat_targets = classes.reshape(-1)
        chosen = self.references(logits.repeat_interleave(num_targets, dim=0), flat_targets)
        if (
            not isinstance(chosen, torch.Tensor)
            or chosen.dim() != 2
            or chosen.shape[0] != flat_targets.shape[0]
            or chosen.shape[1] < 1
        ):
            raise ConfigurationError(
                f"the reference selector {self.references!r} must return LongTensor[R, T] with "
                f"T >= 1 for R = {flat_targets.shape[0]} targets; got "
                f"{getattr(chosen, 'shape', type(chosen).__name__)}"
            )
        chosen = chosen.long().to(classes.device)
        _check_classes(chosen, logits.shape[1])
        return torch.cat([classes, chosen.reshape(batch, -1)], dim=1)  # [B, K + K·T]

    def combine(self, scores: torch.Tensor, num_targets: int) -> torch.Tensor:
        target = scores[..., :num_targets]  # [B, C', K]
        references = scores[..., num_targets:].unflatten(-1, (num_targets, -1))  # [B, C', K, T]
        return target - self.gamma * references.mean(dim=-1)  # Eq. 9 averaged over t (Eq. 8)


# ------------------------------------------------------------------------------- Ablation-CAM


@register_method("ablation_cam")
class AblationCAM(PerturbationCAM):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020, Eq. 3).

    ``w_k^c = (y^c − y^c_k) / y^c``, where ``y^c_k`` is the score of class c with channel k of
    the layer's output ablated; ``L^c = ReLU(Σ_k w_k^c A_k)``. ``y`` is the logit; a class
    whose unablated logit is exactly 0 gets weights 0 (the division is undefined).

    ``ablation_value=None`` (default) is pytorch-grad-cam's ``AblationLayer``: 0 when the
    image's activation minimum is exactly 0 (ReLU layers), else that minimum − 1e7 (their loop
    recomputes the minimum after each write, lowering the value by a further 1e7 per copy within
    a forward batch; here every copy gets the same value, which equals theirs at their
    ``batch_size=1``). A float is used as is; ``0.0`` is the paper's "set to zero". The whole
    channel is ablated, ViT prefix tokens included (as pytorch-grad-cam's ``AblationLayerVit``).
    Beware −1e7 overflows float16: pass ``ablation_value`` for half-precision models.

    ``share_prefix=True`` (default): each forward pass holds the ablated copies of ONE image;
    the model runs on that single image and the layer returns the ``n`` ablated copies of its
    precomputed output, so everything before the layer runs once per forward instead of ``n``
    times (for a last-stage layer that is nearly the whole network). Tensors computed before the
    layer and used after it (residual streams) broadcast over the copies. Each image's first
    forward also carries one un-ablated copy whose scores must equal the plain forward's: a
    network that reuses a pre-layer tensor with its batch dimension (a concatenation, as in
    DenseNet blocks) fails that check or the broadcast, and raises a ConfigurationError asking
    for ``share_prefix=False``: every copy is then the repeated image through the whole
    network (images mixed in a forward), as pytorch-grad-cam does.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        batch_size: int = 32,
        layout: str | None = None,
        ablation_value: float | None = None,
        share_prefix: bool = True,
        max_channels: int | None = None,
        channel_selection: ChannelSelection = "variance",
        seed: int = 0,
    ) -> None:
        super().__init__(model, layer, batch_size, layout, max_channels, channel_selection, seed)
        if ablation_value is not None and not isinstance(ablation_value, int | float):
            raise ConfigurationError(
                f"ablation_value must be a number or None (pytorch-grad-cam's rule), got "
                f"{ablation_value!r}"
            )
        self.ablation_value = None if ablation_value is None else float(ablation_value)
        self.share_prefix = bool(share_prefix)

    def weights(
        self,
        images: torch.Tensor,
        logits: torch.Tensor,
        output: torch.Tensor,
        grid: FeatureLayout,
        selected: torch.Tensor,
        channels: torch.Tensor,
        classes: torch.Tensor,
    ) -> torch.Tensor:
        original = logits.float().gather(1, classes)  # y^c, [B, K]
        ablated = self.ablated_scores(images, output, grid, channels, classes, original)
        drop = original[:, :, None] - ablated.transpose(1, 2)  # [B, K, C']
        denominator = original[:, :, None]
        zero = denominator == 0
        return torch.where(zero, torch.zeros_like(drop), drop / denominator.masked_fill(zero, 1))

    def ablation_values(self, output: torch.Tensor) -> torch.Tensor:
        """The value an ablated channel takes, per image ``[B]``."""
        if self.ablation_value is not None:
            return output.new_full((output.shape[0],), self.ablation_value)
        low = output.flatten(1).min(dim=1).values
        return torch.where(low == 0, torch.zeros_like(low), low - ABLATION_OFFSET)

    def ablated_scores(
        self,
        images: torch.Tensor,
        output: torch.Tensor,
        grid: FeatureLayout,
        channels: torch.Tensor,
        classes: torch.Tensor,
        original: torch.Tensor,
    ) -> torch.Tensor:
        """``y^c_k`` ``[B, C', K]``: the logits of ``classes`` with kept channel k ablated."""
        batch = channels.shape[0]
        channel_dim = 1 if grid.kind == "nchw" else output.dim() - 1  # nhwc, tokens: last
        num_channels = output.shape[channel_dim]
        if self.share_prefix:  # one un-ablated check copy (channel −1) heads each image's rows
            channels = torch.cat([channels.new_full((batch, 1), -1), channels], dim=1)
        per_image = channels.shape[1]
        image_of_row = torch.arange(batch, device=images.device).repeat_interleave(per_image)
        channel_of_row = channels.reshape(-1)
        channel_axis = torch.arange(num_channels, device=output.device).view(
            [num_channels if d == channel_dim else 1 for d in range(output.dim())]
        )
        values = self.ablation_values(output)
        row_shape = (-1, *([1] * (output.dim() - 1)))

        with substitute_layer_output(self.model, self.layer) as swap:

            def run(chunk: slice) -> torch.Tensor:
                rows = image_of_row[chunk]
                hit = channel_axis == channel_of_row[chunk].view(row_shape)
                fill = values[rows].view(row_shape).to(output.dtype)
                swap.value = torch.where(hit, fill, output[rows])
                # Shared prefix: a chunk never mixes images, so its first row names the image.
                return self.model(images[rows[:1]] if self.share_prefix else images[rows])

            chunks = row_chunks(
                batch * per_image, self.batch_size, per_image if self.share_prefix else None
            )
            try:
                scores = chunked_class_scores(run, chunks, classes[image_of_row])
            except RuntimeError as error:
                if not self.share_prefix:
                    raise
                raise ConfigurationError(
                    self._prefix_hint(f"the forward failed ({error})")
                ) from error
        scores = scores.float().view(batch, per_image, -1)
        if self.share_prefix:
            check, scores = scores[:, 0], scores[:, 1:]
            tolerance = 1e-3 * (1 + original.abs().max())
            if not torch.allclose(check, original, rtol=1e-3, atol=float(tolerance)):
                raise ConfigurationError(
                    self._prefix_hint(
                        f"the un-ablated copies scored {check.tolist()} but the plain forward "
                        f"scored {original.tolist()}"
                    )
                )
        return scores

    def _prefix_hint(self, what: str) -> str:
        return (
            f"ablation_cam with share_prefix=True at layer {self.layer!r}: {what}. The layers "
            f"after this one use a tensor computed before it with its batch dimension (e.g. a "
            f"concatenation as in DenseNet blocks, or a reshape by an earlier batch size) or "
            f"couple the samples of a batch, so the layer's output cannot be swapped for a stack "
            f"of ablated copies of one image; pass share_prefix=False (a full forward per copy) "
            f"or choose another layer"
        )
