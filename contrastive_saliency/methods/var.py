"""VAR (Visualizing Actually Relevant features): a plug-in over any attribution method that
keeps the target's map where the target dominates a per-pixel softmax over a class set."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError, UnknownMethodError
from contrastive_saliency.gradients import as_class_matrix
from contrastive_saliency.methods.base import (
    SaliencyMethod,
    check_batch_fields,
    method_name,
    upsample,
)
from contrastive_saliency.methods.gradient_cams import GradientCAM
from contrastive_saliency.methods.registry import create_method, method_factory, register_method
from contrastive_saliency.targets import ClassSet

Mode = Literal["paper", "code"]
Normalise = Literal["none", "max_abs"]
TemperatureRole = Literal["divisor", "factor"]
ClassSetSelector = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


@register_method("var")
class VAR(SaliencyMethod):
    """VAR (``var.md`` Sec. 3.2–3.3, Eq. 2 and the refinement equation of Sec. 3.3; App. A.1).

    For each requested target ``c*`` the class set ``C′`` (``class_set(logits, c*)``, target
    first, K′ classes; :class:`~contrastive_saliency.targets.ClassSet`) is chosen, the ``base`` method
    gives the maps ``H_k`` of every ``k ∈ C′`` at input resolution, and

    ``mode="paper"`` (default; Sec. 3.3): ``q_k = mean_t softmax_{k∈C′}(H_k / t)`` per pixel
    (Eq. 2, averaged over ``temperatures`` t ∈ {1, 5, 100}) and
    ``H′_{c*} = H_{c*} ⊙ q_{c*} ⊙ 1[q_{c*} − 1/K′ > 0]`` (the unnumbered refinement equation
    of Sec. 3.3; ``H_c · q_c`` is the contrastive form derived in Sec. 3.2).

    ``mode="code"`` (the public reference code, PROTOCOLS.md): ``q = softmax_{k∈C′}(s·|H_k|)``
    with one ``sharpening`` factor s = 10, kept where ``q_{c*} − 1/K′ > tau`` (τ = 0.1 for
    class-specific maps; the code's demo uses 0.01). ASSUMPTION: PROTOCOLS gives only the
    softmax and the threshold of the code; the output is taken to have the paper's form
    ``H_{c*} ⊙ q_{c*} ⊙ mask`` with this q and mask (the closest reading). The absolute value
    makes strongly negative evidence (signed maps such as Input×Gradient) count as dominance.

    ``base_relu``: whether a gradient-CAM base (Grad-CAM, Grad-CAM++, LayerCAM, ...) enters
    with its final ReLU. ``None`` (default) follows the mode: ``paper`` keeps the base method's
    own map (ReLU'd); ``code`` uses the map before the ReLU, upsampled bilinearly, because the
    code wraps Captum's ``LayerGradCam``, whose default ``relu_attributions=False`` returns
    the signed Grad-CAM. ``False`` with a base that is not a gradient CAM is an error.

    Temperature: Eq. 2 DIVIDES the map by t (``exp(H/t)``), the default
    ``temperature_as="divisor"``; ``"factor"`` multiplies instead (``softmax(t·H)``, the
    reading in which larger t sharpens, as the code's factor 10 does). ASSUMPTION, scale:
    the paper applies the softmax to the raw maps and says nothing of their scale, so
    ``normalise="none"`` (default) uses them as the base method returns them. Then the
    temperatures act on the base method's own units (Grad-CAM values are O(1–10), gradient
    maps O(1e-3)): for small maps every temperature gives q ≈ 1/K′ + small, and the mask
    reduces to the sign of the linearised competition. ``normalise="max_abs"`` divides the K′
    maps of a set by their common ``max |H|`` (over classes and pixels, so relative class
    scales are kept) before the softmax; the output multiplies the RAW ``H_{c*}``.

    Numerics: softmax with the per-pixel maximum subtracted; the mask is computed from
    ``K′·e_c − Σ_k e_k`` (``e = exp(x − max)``), which is exactly 0 where all K′ maps are
    equal, so ties (e.g. all-zero maps, q = 1/K′) are never kept: their output is 0.

    Cost: the base method is called ONCE per batch with the distinct classes of all the
    targets' sets per image (at most K·K′ columns, padded to the widest row); a class set
    that reads the logits (``ClassSet('top_k_least')``, any selector without
    ``needs_logits = False``) costs one extra no-grad forward pass (model in eval mode,
    restored), since base methods do not expose their logits; fixed sets cost none.

    ``base``: a registered method name (built as ``create_method(base, model, layer,
    **base_kwargs)``) or an already built :class:`SaliencyMethod` (then ``layer`` and
    ``base_kwargs`` must be unset). ``class_set``: a :class:`ClassSet` (default
    ``ClassSet('top_k_least', k=3)``), any selector returning ``[B·K, K′]`` target-first
    sets, or a ``LongTensor[B, M]``/``[M]`` of fixed sets. A per-batch set (2×2 grid classes)
    can also be passed per call: ``var(images, classes, class_set=grid_labels)``.

    A base that reads batch fields (a reference map, :mod:`contrastive_saliency.methods.reference_maps`)
    gets them through VAR: ``var(images, classes, part_mask=...)``.

    A class-agnostic base (``class_agnostic = True`` on the method class: attention rollout,
    Eigen-CAM, the reference maps) is refused with a :class:`ConfigurationError`: every class
    of C′ would have the same map, so ``q = 1/K′`` everywhere and the output would be 0 at
    every pixel (the tie rule above) — a result that says nothing about the base.
    """

    base_option = "base"
    per_call_class_set = True

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        base: str | SaliencyMethod = "grad_cam",
        base_kwargs: Mapping[str, Any] | None = None,
        class_set: ClassSet | ClassSetSelector | torch.Tensor | None = None,
        mode: Mode = "paper",
        temperatures: Sequence[float] = (1.0, 5.0, 100.0),
        sharpening: float = 10.0,
        tau: float = 0.1,
        normalise: Normalise = "none",
        temperature_as: TemperatureRole = "divisor",
        base_relu: bool | None = None,
    ) -> None:
        super().__init__(model)
        check_var_options(mode, temperatures, sharpening, tau, normalise, temperature_as)
        self.base = _build_base(model, layer, base, base_kwargs)
        gradient_cam = isinstance(self.base, GradientCAM)
        if base_relu is None:
            base_relu = mode == "paper" or not gradient_cam
        if not base_relu and not gradient_cam:
            raise ConfigurationError(
                f"var base_relu=False takes the base map before its final ReLU, which only "
                f"gradient CAMs (grad_cam, grad_cam_pp, layer_cam, ...) separate; the base is "
                f"{type(self.base).__name__}: drop base_relu"
            )
        self.base_relu = bool(base_relu)
        self.class_set = _as_class_set(ClassSet() if class_set is None else class_set)
        self.mode = mode
        self.temperatures = tuple(float(t) for t in temperatures)
        self.sharpening = float(sharpening)
        self.tau = float(tau)
        self.normalise = normalise
        self.temperature_as = temperature_as

    @property
    def layer(self) -> str | None:
        """The layer the wrapped method explains (``None`` for methods of the input)."""
        return getattr(self.base, "layer", None)

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """The base method's batch fields, passed through to it (VAR itself reads none)."""
        return tuple(getattr(self.base, "batch_fields", ()))

    def __call__(
        self,
        images: torch.Tensor,
        classes: torch.Tensor,
        class_set: ClassSet | ClassSetSelector | torch.Tensor | None = None,
        **fields: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, K, H, W]``: the refined map of each requested class; ``class_set`` (optional)
        replaces the method's class set for this call only (e.g. this batch's grid classes);
        ``fields``: the base method's batch fields (:attr:`batch_fields`)."""
        if class_set is None:
            return super().__call__(images, classes, **fields)
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        classes = as_class_matrix(classes, images.shape[0])
        fields = check_batch_fields(self, fields, images)
        return self._refine(images, classes, _as_class_set(class_set), fields).float()

    def compute(self, images: torch.Tensor, classes: torch.Tensor, **fields) -> torch.Tensor:
        return self._refine(images, classes, self.class_set, fields)

    def _refine(
        self,
        images: torch.Tensor,
        classes: torch.Tensor,
        class_set: ClassSetSelector,
        fields: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, num_targets = classes.shape
        classes = classes.to(images.device)
        sets = self.class_sets(images, classes, class_set)  # [B, K, K′]
        set_size = sets.shape[2]
        unique, inverse = _unique_per_row(sets.reshape(batch, -1))
        maps = self._base_maps(images, unique, fields or {})  # ONE base call: [B, U, H, W]
        if maps.shape[-2:] != images.shape[-2:]:
            maps = upsample(maps, images.shape[-2:])
        rows = torch.arange(batch, device=maps.device)[:, None]
        class_maps = maps[rows, inverse.to(maps.device)]  # [B, K·K′, H, W]
        class_maps = class_maps.unflatten(1, (num_targets, set_size))
        return var_refine(
            class_maps,
            mode=self.mode,
            temperatures=self.temperatures,
            sharpening=self.sharpening,
            tau=self.tau,
            normalise=self.normalise,
            temperature_as=self.temperature_as,
        )

    def _base_maps(
        self, images: torch.Tensor, classes: torch.Tensor, fields: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        if self.base_relu:
            return self.base(images, classes, **fields)
        return self.base.signed_maps(images, classes)  # upsampled by the caller

    def class_sets(
        self,
        images: torch.Tensor,
        classes: torch.Tensor,
        class_set: ClassSetSelector | None = None,
    ) -> torch.Tensor:
        """The class set of every target, ``[B, K, K′]`` with the target at ``[:, :, 0]``."""
        class_set = self.class_set if class_set is None else class_set
        batch, num_targets = classes.shape
        expected_batch = getattr(class_set, "batch_size", None)
        if expected_batch is not None and expected_batch != batch:
            raise ConfigurationError(
                f"the class set {class_set!r} was built for a batch of {expected_batch} images "
                f"but this batch has {batch}; build the fixed sets from this batch (or pass "
                f"class_set=<this batch's sets> to the call)"
            )
        logits = None
        if getattr(class_set, "needs_logits", True):
            logits = _logits(self.model, images).repeat_interleave(num_targets, dim=0)
        flat_targets = classes.reshape(-1)
        sets = class_set(logits, flat_targets)
        if (
            not isinstance(sets, torch.Tensor)
            or sets.dim() != 2
            or sets.shape[0] != flat_targets.shape[0]
        ):
            raise ConfigurationError(
                f"the class set {class_set!r} must return LongTensor[B, K'] for B targets; got "
                f"{getattr(sets, 'shape', type(sets).__name__)} for {flat_targets.shape[0]} "
                f"targets"
            )
        sets = sets.long().to(classes.device)
        if sets.shape[1] < 2:
            raise ConfigurationError(
                f"the class set {class_set!r} has {sets.shape[1]} class; VAR needs the target "
                f"and at least one rival class (K' >= 2)"
            )
        if bool((sets[:, 0] != flat_targets).any()):
            raise ConfigurationError(
                f"the class set {class_set!r} must put the target class first (column 0); use "
                f"contrastive_saliency.targets.ClassSet, or prepend the target to each set"
            )
        ordered = sets.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ConfigurationError(
                f"the class set {class_set!r} lists a class twice in one set; each class of C' "
                f"must appear once"
            )
        return sets.reshape(batch, num_targets, -1)

    def __repr__(self) -> str:
        return (
            f"VAR(base={self.base!r}, class_set={self.class_set!r}, mode={self.mode!r}, "
            f"temperatures={self.temperatures}, sharpening={self.sharpening}, tau={self.tau}, "
            f"normalise={self.normalise!r}, temperature_as={self.temperature_as!r}, "
            f"base_relu={self.base_relu})"
        )


def var_refine(
    class_maps: torch.Tensor,
    *,
    mode: Mode = "paper",
    temperatures: Sequence[float] = (1.0, 5.0, 100.0),
    sharpening: float = 10.0,
    tau: float = 0.1,
    normalise: Normalise = "none",
    temperature_as: TemperatureRole = "divisor",
) -> torch.Tensor:
    """The VAR refinement of Sec. 3.3 on given maps: ``class_maps [..., K′, H, W]`` with the
    target's map at index 0 of the class dim → ``[..., H, W]``
    ``= H_0 ⊙ q_0 ⊙ mask`` (see :class:`VAR` for q and the mask in each mode)."""
    check_var_options(mode, temperatures, sharpening, tau, normalise, temperature_as)
    if class_maps.dim() < 3 or class_maps.shape[-3] < 2:
        raise ConfigurationError(
            f"var_refine needs maps [..., K', H, W] with K' >= 2 classes, got shape "
            f"{tuple(class_maps.shape)}"
        )
    maps = class_maps.float() if class_maps.dtype in (torch.float16, torch.bfloat16) else class_maps
    set_size = maps.shape[-3]
    scaled = normalise_set(maps, normalise)
    if mode == "paper":
        inputs = [scaled / t if temperature_as == "divisor" else scaled * t for t in temperatures]
    else:
        inputs = [sharpening * scaled.abs()]
    share = torch.zeros_like(maps[..., 0, :, :])  # Σ_t q_0
    excess = torch.zeros_like(share)  # Σ_t (K′ e_0 − Σ_k e_k) / Σ_k e_k = K′ Σ_t (q_0 − 1/K′)
    for logits in inputs:
        exponentials = (logits - logits.amax(dim=-3, keepdim=True)).exp()
        total = exponentials.sum(dim=-3)  # >= 1: the maximum contributes exp(0)
        target = exponentials[..., 0, :, :]
        share = share + target / total
        excess = excess + (set_size * target - total) / total
    q = share / len(inputs)
    # paper: mean_t q_0 − 1/K′ > 0;  code: q_0 − 1/K′ > τ
    keep = excess > 0 if mode == "paper" else excess / set_size > tau
    return maps[..., 0, :, :] * q * keep


def class_distribution(
    class_maps: torch.Tensor,
    *,
    mode: Mode = "paper",
    temperatures: Sequence[float] = (1.0, 5.0, 100.0),
    sharpening: float = 10.0,
    normalise: Normalise = "none",
    temperature_as: TemperatureRole = "divisor",
) -> torch.Tensor:
    """``q [..., K′, H, W]``: the per-pixel distribution over the class dim (Eq. 2, averaged
    over the temperatures in paper mode; ``softmax(s·|H|)`` in code mode). Sums to 1."""
    check_var_options(mode, temperatures, sharpening, 0.0, normalise, temperature_as)
    if class_maps.dtype in (torch.float16, torch.bfloat16):
        class_maps = class_maps.float()
    scaled = normalise_set(class_maps, normalise)
    if mode == "code":
        return torch.softmax(sharpening * scaled.abs(), dim=-3)
    factors = [1.0 / t if temperature_as == "divisor" else t for t in temperatures]
    return torch.stack([torch.softmax(scaled * f, dim=-3) for f in factors]).mean(dim=0)


def normalise_set(class_maps: torch.Tensor, normalise: Normalise) -> torch.Tensor:
    """``"none"``: unchanged; ``"max_abs"``: the K′ maps of each set divided by their common
    ``max |H|`` over classes and pixels (an all-zero set stays zero)."""
    if normalise == "none":
        return class_maps
    scale = class_maps.abs().amax(dim=(-3, -2, -1), keepdim=True)
    return class_maps / torch.where(scale > 0, scale, torch.ones_like(scale))


def check_var_options(
    mode: str,
    temperatures: Sequence[float],
    sharpening: float,
    tau: float,
    normalise: str,
    temperature_as: str,
) -> None:
    """Raise :class:`ConfigurationError` for a VAR option outside its domain."""
    if mode not in ("paper", "code"):
        raise ConfigurationError(
            f"var mode must be 'paper' (temperatures averaged, threshold 1/K') or 'code' "
            f"(softmax(sharpening*|H|), threshold tau), got {mode!r}"
        )
    if normalise not in ("none", "max_abs"):
        raise ConfigurationError(
            f"var normalise must be 'none' (raw maps, the paper) or 'max_abs', got {normalise!r}"
        )
    if temperature_as not in ("divisor", "factor"):
        raise ConfigurationError(
            f"var temperature_as must be 'divisor' (Eq. 2: exp(H/t)) or 'factor' (exp(t*H)), "
            f"got {temperature_as!r}"
        )
    if isinstance(temperatures, (str, bytes)) or not isinstance(temperatures, Sequence):
        raise ConfigurationError(
            f"var temperatures must be a sequence of positive numbers such as (1, 5, 100), got "
            f"{temperatures!r}"
        )
    if len(temperatures) == 0 or not all(_positive_finite(t) for t in temperatures):
        raise ConfigurationError(
            f"var temperatures must be a non-empty sequence of positive finite numbers such as "
            f"(1, 5, 100), got {tuple(temperatures)!r}"
        )
    if not _positive_finite(sharpening):
        raise ConfigurationError(
            f"var sharpening must be a positive finite number (the code uses 10), got "
            f"{sharpening!r}"
        )
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau < 1.0:
        raise ConfigurationError(
            f"var tau must lie in [0, 1) (q_c - 1/K' is below 1), got {tau!r}; the code uses "
            f"0.1 (0.01 in its demo)"
        )


def _positive_finite(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value > 0
    )


def _build_base(
    model: nn.Module,
    layer: str | None,
    base: str | SaliencyMethod,
    base_kwargs: Mapping[str, Any] | None,
) -> SaliencyMethod:
    if isinstance(base, SaliencyMethod):
        if layer is not None or base_kwargs:
            raise ConfigurationError(
                "var got a built base method together with layer= or base_kwargs=; pass "
                "either base=<method name> with layer/base_kwargs, or a built method alone"
            )
        return _class_dependent(base)
    if not isinstance(base, str):
        raise ConfigurationError(
            f"var base must be a registered method name such as 'grad_cam' or a built "
            f"SaliencyMethod, got {type(base).__name__}"
        )
    if base == "var":
        raise ConfigurationError("var cannot wrap itself; choose a base attribution method")
    kwargs = dict(base_kwargs or {})
    if "layer" in kwargs:
        raise ConfigurationError(
            "pass the base method's layer as var's own layer= argument, not in base_kwargs"
        )
    try:
        _class_dependent(method_factory(base), base)  # before building: its model checks
    except UnknownMethodError as error:
        raise UnknownMethodError(f"var base: {error}") from error
    return create_method(base, model, layer=layer, **kwargs)


def _class_dependent(base: object, name: str | None = None) -> Any:
    """``base`` (a method or its registered class), unless its class declares it class-agnostic
    (``class_agnostic = True``)."""
    if getattr(base, "class_agnostic", False):
        name = name or method_name(base)
        raise ConfigurationError(
            f"var base {name!r} is class-agnostic: it gives every class the same map, so VAR's "
            f"per-pixel softmax over the class set is uniform (q = 1/K') and the refined map is "
            f"0 everywhere; choose a class-dependent base such as grad_cam, "
            f"integrated_gradients, gradient_shap, deeplift or occlusion (for a ViT: "
            f"transition_attention, transformer_attribution, bidirectional_attention, "
            f"grad_rollout or inflow)"
        )
    return base


def _as_class_set(
    class_set: ClassSet | ClassSetSelector | torch.Tensor | Sequence[Sequence[int]],
) -> ClassSetSelector:
    if isinstance(class_set, torch.Tensor) or (
        isinstance(class_set, Sequence) and not isinstance(class_set, str)
    ):
        return ClassSet.fixed(class_set)
    if not callable(class_set):
        raise ConfigurationError(
            f"var class_set must be a ClassSet, a selector (logits, targets) -> [B, K'], or "
            f"fixed sets LongTensor[B, M]; got {type(class_set).__name__}"
        )
    return class_set


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """One no-grad forward in eval mode (the model's mode is restored)."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            logits = model(images)
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ConfigurationError(
            f"var's class set needs the model's logits [B, N]; the model returned "
            f"{getattr(logits, 'shape', type(logits).__name__)}"
        )
    return logits.detach()


def _unique_per_row(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``classes [B, M]`` → ``unique [B, U]`` (each row's distinct classes, ascending, padded
    with the row's smallest class to the widest row) and ``inverse [B, M]`` with
    ``unique[b, inverse[b, m]] == classes[b, m]``; no per-row Python loop."""
    ordered, order = classes.sort(dim=1)
    is_new = torch.ones_like(ordered, dtype=torch.bool)
    is_new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = is_new.long().cumsum(dim=1) - 1  # slot of each sorted entry
    width = int(rank[:, -1].max()) + 1
    unique = ordered[:, :1].expand(-1, width).clone()
    unique.scatter_(1, rank, ordered)
    inverse = torch.empty_like(classes).scatter_(1, order, rank)
    return unique, inverse
