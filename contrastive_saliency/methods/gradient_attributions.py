"""Input-space attribution: gradient, Input×Gradient, Integrated Gradients, SmoothGrad, guided
backprop and guided Grad-CAM.

Every method explains all K requested classes from one forward pass per (perturbed) input batch
and K gradient calls w.r.t. the input (:func:`contrastive_saliency.input_gradients.input_class_gradients`),
never K forward passes and never parameter gradients. The raw attribution ``[B, K, C, H, W]``
is reduced over channels to the ``[B, K, H, W]`` contract by :func:`reduce_channels`:

- ``"sum"``: ``Σ_c a_c``, signed (Captum's visualisation; keeps IG completeness per pixel);
- ``"abs_sum"``: ``Σ_c |a_c|``;
- ``"max_abs"``: ``max_c |a_c|`` (Simonyan et al. 2014, Sec. 3.1).

Each method's default and the reason are in its docstring. Methods that work in input space
accept ``layer`` only for the registry's common signature and ignore it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

import contrastive_saliency.methods.gradient_cams  # noqa: F401  (registers "grad_cam", used below)
from contrastive_saliency.checks import check_batch_size, check_positive_int
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import as_class_matrix
from contrastive_saliency.input_gradients import frozen_eval, input_class_gradients
from contrastive_saliency.methods.base import SaliencyMethod, check_batch_fields
from contrastive_saliency.methods.registry import create_method, register_method

Reduction = Literal["sum", "abs_sum", "max_abs"]
Quadrature = Literal[
    "gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"
]


def reduce_channels(attributions: torch.Tensor, reduce: Reduction) -> torch.Tensor:
    """``[B, K, C, H, W]`` → ``[B, K, H, W]``: ``"sum"`` ``Σ_c a_c``, ``"abs_sum"`` ``Σ_c |a_c|``,
    ``"max_abs"`` ``max_c |a_c|``."""
    if reduce == "sum":
        return attributions.sum(dim=2)
    if reduce == "abs_sum":
        return attributions.abs().sum(dim=2)
    if reduce == "max_abs":
        return attributions.abs().amax(dim=2)
    raise ConfigurationError(
        f"unknown channel reduction {reduce!r}; choose one of {', '.join(get_args(Reduction))}"
    )


def quadrature(
    steps: int, method: Quadrature = "gausslegendre"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``α_s ∈ [0, 1]`` and weights ``w_s`` (float64, ``Σ_s w_s = 1``) such that
    ``∫_0^1 g(α) dα ≈ Σ_s w_s g(α_s)``.

    ``"gausslegendre"``: Gauss–Legendre nodes/weights mapped from [-1, 1] (Captum's default).
    ``"riemann_left"``/``"riemann_right"``/``"riemann_middle"``: ``α_s = s/m``, ``(s+1)/m``,
    ``(s+½)/m`` with ``w_s = 1/m`` (``riemann_right`` is Sundararajan et al. Sec. 5).
    ``"riemann_trapezoid"``: ``α_s = s/(m−1)``, ``w_s = 1/(m−1)`` halved at both ends. Captum's
    ``riemann_trapezoid`` uses the same nodes but ``w_s = 1/m`` (halved ends), which sum to
    ``(m−1)/m``; its integrals are these times ``(m−1)/m``.
    """
    if method not in get_args(Quadrature):
        raise ConfigurationError(
            f"unknown integration method {method!r}; choose one of "
            f"{', '.join(get_args(Quadrature))}"
        )
    minimum = 2 if method == "riemann_trapezoid" else 1
    if not isinstance(steps, int) or steps < minimum:
        raise ConfigurationError(f"{method} needs an integer steps >= {minimum}, got {steps!r}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy(0.5 * (nodes + 1)), torch.from_numpy(0.5 * weights)
    index = torch.arange(steps, dtype=torch.float64)
    weights = torch.full((steps,), 1 / steps, dtype=torch.float64)
    if method == "riemann_left":
        return index / steps, weights
    if method == "riemann_right":
        return (index + 1) / steps, weights
    if method == "riemann_middle":
        return (index + 0.5) / steps, weights
    weights = torch.full((steps,), 1 / (steps - 1), dtype=torch.float64)
    weights[0] /= 2
    weights[-1] /= 2
    return index / (steps - 1), weights


class InputGradientMethod(SaliencyMethod):
    """A method whose raw attribution ``[B, K, C, H, W]`` lives in input space; the map is its
    channel reduction (:func:`reduce_channels`)."""

    def __init__(self, model: nn.Module, reduce: Reduction) -> None:
        super().__init__(model)
        if reduce not in get_args(Reduction):
            raise ConfigurationError(
                f"{type(self).__name__}: unknown reduce={reduce!r}; choose one of "
                f"{', '.join(get_args(Reduction))}"
            )
        self.reduce: Reduction = reduce

    def compute(self, images: torch.Tensor, classes: torch.Tensor, **fields) -> torch.Tensor:
        return reduce_channels(self.attributions(images, classes, **fields), self.reduce)

    def attributions(
        self, images: torch.Tensor, classes: torch.Tensor, **fields: torch.Tensor
    ) -> torch.Tensor:
        """The raw attribution ``[B, K, C, H, W]`` for ``classes`` ``[B]`` or ``[B, K]`` (and the
        method's batch fields, e.g. GradientSHAP's ``index``)."""
        classes = as_class_matrix(classes, images.shape[0])
        fields = check_batch_fields(self, fields, images)
        with frozen_eval(self.model):
            if images.is_inference():
                images = images.clone()
            return self._attributions(images.detach(), classes.to(images.device), **fields)

    @abstractmethod
    def _attributions(self, images: torch.Tensor, classes: torch.Tensor, **fields) -> torch.Tensor:
        """Runs inside :func:`frozen_eval` on a normal (non-inference) tensor."""


@register_method("saliency")
class Saliency(InputGradientMethod):
    """Gradient saliency (Simonyan et al., ICLR-W 2014, Sec. 3.1): ``w = ∂S_c/∂x`` at ``x``.

    Default ``reduce="max_abs"``, the paper's map ``M_ij = max_c |w_{c,ij}|``.
    """

    def __init__(
        self, model: nn.Module, layer: str | None = None, *, reduce: Reduction = "max_abs"
    ) -> None:
        super().__init__(model, reduce)

    def _attributions(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return input_class_gradients(self.model, images, classes).gradients


@register_method("input_x_gradient")
class InputXGradient(InputGradientMethod):
    """Input×Gradient (Shrikumar et al., 2016; compared in Ancona et al., ICLR 2018):
    ``R = x ⊙ ∂S_c/∂x``.

    Default ``reduce="sum"``: the signed first-order contribution of each pixel, summed over its
    colour channels (for a linear model ``Σ R = S_c(x) − bias``).
    """

    def __init__(
        self, model: nn.Module, layer: str | None = None, *, reduce: Reduction = "sum"
    ) -> None:
        super().__init__(model, reduce)

    def _attributions(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        gradients = input_class_gradients(self.model, images, classes).gradients
        return images.unsqueeze(1) * gradients


@register_method("integrated_gradients")
class IntegratedGradients(InputGradientMethod):
    """Integrated Gradients (Sundararajan et al., ICML 2017, Eq. 1; approximation Sec. 5):

    ``IG(x) = (x − x') ⊙ ∫_0^1 ∂S_c(x' + α(x − x'))/∂x dα ≈ (x − x') ⊙ Σ_s w_s ∂S_c(x'_s)/∂x``
    with ``x'_s = x' + α_s (x − x')`` and nodes/weights from :func:`quadrature`.

    ``method="gausslegendre"`` (default) is Captum's default, which VAR uses; it is exact for
    integrands polynomial of degree < 2·steps in α. ``"riemann_right"`` is the paper's
    Riemann sum; ``"riemann_trapezoid"`` is a true trapezoid rule (Captum's differs by the
    factor ``(steps−1)/steps``, see :func:`quadrature`). ``steps=50`` as Captum.

    ``baseline`` ``x'``: a number or a tensor broadcastable to ``[B, C, H, W]`` (default 0, in
    the space the model sees: for mean/std-normalised inputs that is the mean colour).
    ``batch_size`` bounds the images per forward pass: the ``steps × B`` path points are run
    ``max(1, batch_size // B)`` steps at a time (and ``batch_size`` images of one step at a
    time when ``B > batch_size``).

    Default ``reduce="sum"``: completeness (Prop. 1), ``Σ IG = S_c(x) − S_c(x')`` up to the
    quadrature error, then holds for the map as well.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        steps: int = 50,
        method: Quadrature = "gausslegendre",
        baseline: float | torch.Tensor = 0.0,
        batch_size: int = 32,
        reduce: Reduction = "sum",
    ) -> None:
        super().__init__(model, reduce)
        self.alphas, self.weights = quadrature(steps, method)
        self.steps, self.method = steps, method
        self.baseline = check_baseline(baseline, "integrated_gradients")
        self.batch_size = check_batch_size(batch_size, "integrated_gradients")

    def _attributions(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        baseline = broadcast_baseline(self.baseline, images, "integrated_gradients")
        alphas = self.alphas.to(device=images.device, dtype=images.dtype)
        difference = images - baseline

        def path_points(steps: slice, rows: slice) -> tuple[torch.Tensor, None]:
            start = baseline[rows].unsqueeze(0)
            points = start + alphas[steps].view(-1, 1, 1, 1, 1) * difference[rows].unsqueeze(0)
            return points, None

        integral = weighted_gradient_sum(
            self.model, classes, path_points, self.weights, images, self.batch_size
        )
        return difference.unsqueeze(1) * integral


@register_method("smoothgrad")
class SmoothGrad(InputGradientMethod):
    """SmoothGrad (Smilkov et al., 2017, Sec. 3): ``M̂_c(x) = 1/n Σ_s ∂S_c(x + σ ε_s)/∂x``,
    ``ε_s ~ N(0, I)``; the raw gradients are averaged, then reduced over channels.

    Noise: ``sigma`` (absolute, in the space the model sees) when given, else
    ``σ_b = noise_level · (max x_b − min x_b)`` per image (the paper's noise level
    ``σ / (x_max − x_min)``, 10–20 % recommended; default 0.15). ``n_samples=50``.

    Determinism: at every call, ``ε`` ``[n, C, H, W]`` is drawn in one ``torch.randn`` from a
    generator seeded with ``seed``, and the same ``ε_s`` perturbs every image of the batch, so a
    map does not depend on the other images in the batch. With ``torch.manual_seed(seed)``
    before it, Captum's ``NoiseTunnel(Saliency)`` on one image (CPU, all samples in one
    partition) draws exactly this noise; on a batch Captum draws independent noise per image.

    Default ``reduce="max_abs"``, as :class:`Saliency` (so ``sigma=0`` gives ``saliency``).
    ``batch_size`` bounds the images per forward pass as in :class:`IntegratedGradients`.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        n_samples: int = 50,
        noise_level: float = 0.15,
        sigma: float | None = None,
        seed: int = 0,
        batch_size: int = 32,
        reduce: Reduction = "max_abs",
    ) -> None:
        super().__init__(model, reduce)
        check_positive_int(n_samples, "smoothgrad n_samples")
        if not noise_level >= 0:
            raise ConfigurationError(f"smoothgrad noise_level must be >= 0, got {noise_level!r}")
        if sigma is not None and not sigma >= 0:
            raise ConfigurationError(f"smoothgrad sigma must be >= 0 or None, got {sigma!r}")
        self.n_samples, self.noise_level, self.sigma, self.seed = (
            n_samples,
            noise_level,
            sigma,
            seed,
        )
        self.batch_size = check_batch_size(batch_size, "smoothgrad")

    def _attributions(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if self.sigma is not None:
            sigma = torch.full((images.shape[0],), float(self.sigma), dtype=images.dtype)
        else:
            value_range = images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3))
            sigma = self.noise_level * value_range
        sigma = sigma.to(images.device).view(-1, 1, 1, 1)
        generator = torch.Generator(device=images.device).manual_seed(self.seed)
        noise = torch.randn(
            (self.n_samples, *images.shape[1:]),
            generator=generator,
            dtype=images.dtype,
            device=images.device,
        )

        def noisy_copies(samples: slice, rows: slice) -> tuple[torch.Tensor, None]:
            noisy = images[rows].unsqueeze(0) + sigma[rows].unsqueeze(0) * noise[samples, None]
            return noisy, None

        weights = torch.full((self.n_samples,), 1 / self.n_samples, dtype=torch.float64)
        return weighted_gradient_sum(
            self.model, classes, noisy_copies, weights, images, self.batch_size
        )


@register_method("guided_backprop")
class GuidedBackprop(InputGradientMethod):
    """Guided backpropagation (Springenberg et al., ICLR-W 2015, Sec. 3.4): the input gradient
    with each ReLU's backward ``R_in = 1[x_in > 0] · max(R_out, 0)``: only positive gradients
    pass, and only where the ReLU's input was positive (see :func:`guided_relu_hooks`).

    Default ``reduce="sum"`` (signed channel sum, Captum's visualisation; the grid pointing
    game then keeps the positive part).
    """

    def __init__(
        self, model: nn.Module, layer: str | None = None, *, reduce: Reduction = "sum"
    ) -> None:
        super().__init__(model, reduce)
        relu_modules(model)  # fail at construction, not at the first batch

    def _attributions(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        with guided_relu_hooks(self.model):
            return input_class_gradients(self.model, images, classes).gradients


@register_method("guided_grad_cam")
class GuidedGradCAM(SaliencyMethod):
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017, Sec. 3): guided backprop ⊙ Grad-CAM
    upsampled to the input.

    Map: ``reduce(GB) · L^c`` with ``L^c`` the ``grad_cam`` map of ``layer`` (``None``:
    :func:`contrastive_saliency.layers.default_layer`), upsampled bilinearly (align_corners=False). As
    ``L^c ≥ 0`` is shared by the channels, this equals ``reduce(GB ⊙ L^c)`` for every reduction.
    Captum's ``GuidedGradCam`` upsamples with ``interpolate_mode="nearest"`` by default;
    ``"bilinear"`` gives these maps. Two forward passes per call (the guided backward cannot
    share a graph with Grad-CAM's plain one), K gradient calls after each.
    Default ``reduce="sum"`` as :class:`GuidedBackprop`.
    """

    def __init__(
        self, model: nn.Module, layer: str | None = None, *, reduce: Reduction = "sum"
    ) -> None:
        super().__init__(model)
        self.guided_backprop = GuidedBackprop(model, reduce=reduce)
        self.grad_cam = create_method("grad_cam", model, layer=layer)
        self.layer: str = self.grad_cam.layer
        self.reduce = reduce

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        guided = self.guided_backprop.compute(images, classes)
        return guided * self.grad_cam(images, classes).to(guided.dtype)


def relu_modules(model: nn.Module) -> list[nn.ReLU]:
    """Every ``nn.ReLU`` module of ``model``; :class:`ConfigurationError` when there is none."""
    relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
    if not relus:
        raise ConfigurationError(
            f"guided backprop needs nn.ReLU modules, and {type(model).__name__} has none "
            f"(F.relu/torch.relu calls inside forward() cannot be hooked); use a model built "
            f"from nn.ReLU modules or another method (saliency, input_x_gradient, ...)"
        )
    return relus


@contextmanager
def guided_relu_hooks(model: nn.Module) -> Iterator[list[nn.ReLU]]:
    """Inside the block every ``nn.ReLU`` module of ``model`` back-propagates guidedly.

    A temporary forward hook registers, on each ReLU output, a gradient hook ``max(R_out, 0)``;
    the ReLU's own backward then multiplies by ``1[x_in > 0]``. ``ReLU(inplace=True)`` runs
    out of place inside the block. Hooks are removed and ``inplace`` flags restored on exit,
    also on error. Functional relus (``F.relu``, ``torch.relu``, ``x.clamp(min=0)``) inside
    ``forward()`` are not covered: their gradients stay plain.
    """
    relus = relu_modules(model)
    inplace_flags = [relu.inplace for relu in relus]
    handles = []
    try:
        for relu in relus:
            relu.inplace = False
            handles.append(relu.register_forward_hook(_guide_output_gradient))
        yield relus
    finally:
        for handle in handles:
            handle.remove()
        for relu, flag in zip(relus, inplace_flags, strict=True):
            relu.inplace = flag


def _guide_output_gradient(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    if isinstance(output, torch.Tensor) and output.requires_grad:
        output.register_hook(_positive_part)


def _positive_part(gradient: torch.Tensor) -> torch.Tensor:
    return gradient.clamp(min=0)


def weighted_gradient_sum(
    model: nn.Module,
    classes: torch.Tensor,
    make_inputs: Callable[[slice, slice], tuple[torch.Tensor, torch.Tensor | None]],
    weights: torch.Tensor,
    images: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """``Σ_s w_s f_s ⊙ ∂S_{c_bk}/∂x`` evaluated at the points of ``make_inputs(steps, rows)``,
    ``[B, K, C, H, W]``. ``make_inputs`` returns the points ``[m, nb, C, H, W]`` of steps
    ``steps`` for images ``rows`` and their factors ``f_s`` (same shape; ``None``: 1), which
    multiply each point's gradient before the sum (GradientSHAP's ``x − x'_s``).

    At most ``batch_size`` images per forward pass: ``max(1, batch_size // B)`` steps of all
    images at a time, or ``batch_size`` images of one step when ``B > batch_size``.
    """
    num_images, num_steps = images.shape[0], weights.shape[0]
    weights = weights.to(device=images.device, dtype=images.dtype)
    steps_per_chunk = max(1, batch_size // num_images)
    images_per_chunk = min(num_images, batch_size)
    total = images.new_zeros((num_images, classes.shape[1], *images.shape[1:]))
    if num_images == 0:
        return total
    for first_step in range(0, num_steps, steps_per_chunk):
        steps = slice(first_step, min(first_step + steps_per_chunk, num_steps))
        for first_image in range(0, num_images, images_per_chunk):
            rows = slice(first_image, first_image + images_per_chunk)
            inputs, factors = make_inputs(steps, rows)  # [m, nb, C, H, W]
            m, nb = inputs.shape[:2]
            gradients = input_class_gradients(
                model, inputs.flatten(0, 1), classes[rows].repeat(m, 1)
            ).gradients.unflatten(0, (m, nb))
            if factors is not None:
                gradients = gradients * factors.unsqueeze(2)  # [m, nb, K, C, H, W]
            total[rows] += (gradients * weights[steps].view(-1, 1, 1, 1, 1, 1)).sum(dim=0)
    return total


def check_baseline(baseline: float | torch.Tensor, method: str) -> float | torch.Tensor:
    """``baseline`` (a number or a tensor of at most 4 dims) if it can broadcast to images."""
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float, torch.Tensor)):
        raise ConfigurationError(
            f"{method} baseline must be a number or a tensor broadcastable to [B, C, H, W], "
            f"got {type(baseline).__name__}"
        )
    if isinstance(baseline, torch.Tensor) and baseline.dim() > 4:
        raise ConfigurationError(
            f"{method} baseline has shape {tuple(baseline.shape)}; pass a number or a tensor "
            f"broadcastable to [B, C, H, W]"
        )
    return baseline


def broadcast_baseline(
    baseline: float | torch.Tensor, images: torch.Tensor, method: str
) -> torch.Tensor:
    """``baseline`` as a ``[B, C, H, W]`` tensor (a broadcast view) on the images' device and
    in their dtype; a :class:`ConfigurationError` when the shapes do not broadcast."""
    value = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
    try:
        return value.broadcast_to(images.shape)
    except RuntimeError as error:
        raise ConfigurationError(
            f"{method} baseline of shape {tuple(value.shape)} does not broadcast to the images' "
            f"shape {tuple(images.shape)}; pass a number, a [C, H, W] or a [B, C, H, W] tensor"
        ) from error
