"""GradientSHAP / Expected Gradients: input × gradient at random points between random baselines
and the (noisy) input, averaged; every draw a pure function of the sample ``index``."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from contrastive_saliency.checks import check_batch_size, check_positive_int
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.index_random import (
    STREAM_SHAP_ALPHA,
    STREAM_SHAP_BASELINE,
    STREAM_SHAP_NOISE,
    index_normal,
    index_uniform,
)
from contrastive_saliency.methods.gradient_attributions import (
    InputGradientMethod,
    Reduction,
    weighted_gradient_sum,
)
from contrastive_saliency.methods.registry import register_method

BaselineDistribution = Literal["normal"]


class ShapDraws(NamedTuple):
    """The draws of samples ``s`` of every image ``b``: ``baselines`` ``x'_bs`` and ``noise``
    ``σ ε_bs`` ``[B, S, C, H, W]``, path positions ``alphas`` ``α_bs`` ``[B, S]``."""

    baselines: torch.Tensor
    alphas: torch.Tensor
    noise: torch.Tensor


@register_method("gradient_shap")
class GradientSHAP(InputGradientMethod):
    """GradientSHAP (Captum's ``GradientShap``, after SHAP's ``GradientExplainer``; Lundberg &
    Lee, NeurIPS 2017), the Monte-Carlo estimate of Expected Gradients (Erion et al., Nature
    Machine Intelligence 2021: ``E_{x'∼D, α∼U(0,1)} [(x − x') ⊙ ∂S_c(x' + α(x − x'))/∂x]``)
    with SmoothGrad noise:

    ``φ_c(x) = 1/S Σ_s (x̃_s − x'_s) ⊙ ∂S_c(x'_s + α_s (x̃_s − x'_s))/∂x``,
    ``x̃_s = x + σ ε_s``, ``ε_s ∼ N(0, I)``, ``α_s ∼ U[0, 1)``, ``x'_s ∼ D``,

    ``S = n_samples`` (default 5, Captum's), ``σ = stdevs`` (default 0, Captum's; absolute, in
    the space the model sees). Its expectation satisfies completeness in expectation:
    ``E[Σ φ_c] = S_c(x) − E_{x'} S_c(x')`` for ``σ = 0``.

    ``baselines`` (the distribution D): ``"normal"`` (default; a fresh ``N(0, I)`` image per
    draw — for mean/std-normalised inputs, noise with the data's per-channel mean and std;
    neither Captum nor SHAP has a default, this is the project's), a tensor ``[M, C, H, W]``
    (``C, H, W`` broadcastable) of reference images drawn uniformly (Expected Gradients uses
    training images), or a number (one constant baseline; only α and the noise are random).

    Determinism (Captum #742: its draws come from the global NumPy / torch generators, so a
    map depends on the batch and on earlier calls): every draw of image b is a pure function
    of ``(seed, sample index[b], draw position)`` (:mod:`contrastive_saliency.index_random`, streams
    :data:`~contrastive_saliency.index_random.STREAM_SHAP_BASELINE` / ``_ALPHA`` / ``_NOISE``), so a map is
    the same on every rank, device and batch composition. :meth:`draws` returns them; given
    those draws Captum's ``GradientShap`` gives the same attributions (parity test).

    Cost: ``S × B`` gradient evaluations, at most ``batch_size`` images per forward pass
    (as :class:`~contrastive_saliency.methods.gradient_attributions.IntegratedGradients`); each forward serves
    all K classes with one backward per class. ``reduce="sum"`` (default) keeps the signed
    per-pixel sum over colour channels. ``layer`` is ignored (registry signature).
    """

    batch_fields = ("index",)

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        n_samples: int = 5,
        stdevs: float = 0.0,
        baselines: BaselineDistribution | float | torch.Tensor = "normal",
        seed: int = 0,
        batch_size: int = 32,
        reduce: Reduction = "sum",
    ) -> None:
        super().__init__(model, reduce)
        check_positive_int(n_samples, "gradient_shap n_samples")
        if isinstance(stdevs, bool) or not isinstance(stdevs, (int, float)) or not stdevs >= 0:
            raise ConfigurationError(
                f"gradient_shap stdevs (the noise's standard deviation) must be a number >= 0, "
                f"got {stdevs!r}"
            )
        self.baselines = _check_distribution(baselines)
        self.n_samples, self.stdevs, self.seed = n_samples, float(stdevs), int(seed)
        self.batch_size = check_batch_size(batch_size, "gradient_shap")

    def draws(self, images: torch.Tensor, index: torch.Tensor) -> ShapDraws:
        """Every draw of the images ``[B, C, H, W]`` with sample indices ``index`` ``[B]``."""
        baselines, alphas, noise = self._draws(images, index.to(images.device), 0, self.n_samples)
        return ShapDraws(baselines, alphas, noise)

    def _attributions(
        self, images: torch.Tensor, classes: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        index = index.reshape(-1)

        def path_points(samples: slice, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            baselines, alphas, noise = (
                draw.transpose(0, 1)  # [m, nb, ...]
                for draw in self._draws(images[rows], index[rows], samples.start, samples.stop)
            )
            difference = images[rows].unsqueeze(0) + noise - baselines  # x̃ − x'
            points = baselines + alphas[..., None, None, None] * difference
            return points, difference

        weights = torch.full((self.n_samples,), 1 / self.n_samples, dtype=torch.float64)
        return weighted_gradient_sum(
            self.model, classes, path_points, weights, images, self.batch_size
        )

    def _draws(
        self, images: torch.Tensor, index: torch.Tensor, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Baselines and noise ``[nb, m, C, H, W]`` and ``α`` ``[nb, m]`` of samples
        ``start … stop − 1`` (drawn in float32, returned in the images' dtype)."""
        count = stop - start
        shape = tuple(images.shape[1:])
        size = shape[0] * shape[1] * shape[2]
        dtype = images.dtype
        alphas = index_uniform(index, (count,), self.seed, STREAM_SHAP_ALPHA, start).to(dtype)
        if self.stdevs > 0:
            noise = index_normal(
                index, (count, *shape), self.seed, STREAM_SHAP_NOISE, start * size
            ).to(dtype)
            noise = noise * self.stdevs
        else:
            noise = images.new_zeros((images.shape[0], count, *shape))
        if isinstance(self.baselines, str):  # "normal"
            baselines = index_normal(
                index, (count, *shape), self.seed, STREAM_SHAP_BASELINE, start * size
            ).to(dtype)
        elif isinstance(self.baselines, torch.Tensor):
            distribution = _broadcast_distribution(self.baselines, images)
            uniform = index_uniform(index, (count,), self.seed, STREAM_SHAP_BASELINE, start)
            choice = (uniform.double() * distribution.shape[0]).long()
            baselines = distribution[choice.clamp(max=distribution.shape[0] - 1)]
        else:
            baselines = images.new_full((images.shape[0], count, *shape), self.baselines)
        return baselines, alphas, noise

    def __repr__(self) -> str:
        baselines = (
            f"tensor{tuple(self.baselines.shape)}"
            if isinstance(self.baselines, torch.Tensor)
            else repr(self.baselines)
        )
        return (
            f"GradientSHAP(n_samples={self.n_samples}, stdevs={self.stdevs}, "
            f"baselines={baselines}, seed={self.seed}, batch_size={self.batch_size}, "
            f"reduce={self.reduce!r})"
        )


def _check_distribution(
    baselines: BaselineDistribution | float | torch.Tensor,
) -> BaselineDistribution | float | torch.Tensor:
    if isinstance(baselines, str) and baselines == "normal":
        return baselines
    if isinstance(baselines, torch.Tensor):
        if baselines.dim() != 4 or baselines.shape[0] < 1:
            raise ConfigurationError(
                f"gradient_shap baselines as a tensor are the reference images [M, C, H, W] "
                f"(M >= 1) drawn from; got shape {tuple(baselines.shape)}"
            )
        return baselines
    if isinstance(baselines, (int, float)) and not isinstance(baselines, bool):
        return float(baselines)
    raise ConfigurationError(
        f"gradient_shap baselines must be 'normal' (N(0, I) images), reference images "
        f"[M, C, H, W], or a number; got {baselines!r}"
    )


def _broadcast_distribution(distribution: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    shape = (distribution.shape[0], *images.shape[1:])
    try:
        return distribution.to(device=images.device, dtype=images.dtype).broadcast_to(shape)
    except RuntimeError as error:
        raise ConfigurationError(
            f"gradient_shap reference images of shape {tuple(distribution.shape)} do not "
            f"broadcast to images of shape {tuple(images.shape[1:])}"
        ) from error
