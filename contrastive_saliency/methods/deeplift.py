"""DeepLIFT with the Rescale rule (and Captum's max-pool rule), all K classes from one forward
pass of the images and their baselines."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import _check_classes
from contrastive_saliency.methods.gradient_attributions import (
    InputGradientMethod,
    Reduction,
    broadcast_baseline,
    check_baseline,
)
from contrastive_saliency.methods.registry import register_method

# Element-wise nonlinearities whose derivative the Rescale rule replaces by Δy/Δx. Captum's
# DeepLift hooks the first six; GELU and SiLU are element-wise too (the Rescale rule is stated
# for any element-wise nonlinearity), where Captum would back-propagate their gradient.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.GELU,
    nn.SiLU,
)
MAX_POOLS: dict[type[nn.Module], Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    nn.MaxPool1d: F.max_pool1d,
    nn.MaxPool2d: F.max_pool2d,
    nn.MaxPool3d: F.max_pool3d,
}
# Layers that are linear (affine) in their input in eval mode: their gradient is exact.
LINEAR_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Flatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
)
# Containers whose forward() holds only their submodules and additions (residual sums).
TRUSTED_BLOCKS = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
SUPPORTED = (
    "models built from nn.Sequential containers and torchvision ResNet blocks (BasicBlock, "
    "Bottleneck) whose layers are Conv/Linear/BatchNorm/AvgPool/Flatten/Dropout/Identity and the "
    "nonlinearities ReLU, LeakyReLU, ELU, Sigmoid, Tanh, Softplus, GELU, SiLU and MaxPool1d/2d/3d "
    "(torchvision ResNets and VGGs, SmallCNN); operations in the root module's own forward() "
    "must be linear (flatten, mean, reshape)"
)


@register_method("deeplift")
class DeepLIFT(InputGradientMethod):
    """DeepLIFT (Shrikumar et al., ICML 2017) with the Rescale rule, as Captum's ``DeepLift``:
    ``R_c = (x − x') ⊙ m_c``, where ``m_c`` is the gradient of ``S_c`` with the derivative of
    every nonlinearity replaced by its multiplier (the paper's chain rule for multipliers):

    - element-wise ``y = f(z)``: ``m = Δy / Δz = (f(z) − f(z')) / (z − z')``, the local
      derivative where ``|Δz| < eps`` (Captum's ``eps=1e-10``);
    - max pooling (Captum's rule; not in the paper): the change ``max(o, o') − o'`` of each
      window goes to the input's arg-max position and ``o − max(o, o')`` to the baseline's,
      divided by ``Δz`` there (the plain gradient where ``|Δz| < eps``).

    ``z'``, ``o'`` are the layers' values on the baseline ``x'``. Summation-to-delta:
    ``Σ R_c = S_c(x) − S_c(x')`` exactly (up to rounding); for a linear model ``R_c`` is
    gradient × (x − x'). ``baseline`` ``x'``: a number or a tensor broadcastable to
    ``[B, C, H, W]`` (default 0, Captum's, in the space the model sees).

    Supported models (checked at construction, :func:`check_deeplift_model`): every
    nonlinearity must be a module of a supported type, since a hook can only act on modules;
    :data:`SUPPORTED`. An unsupported layer or container is refused naming it. Unlike
    Captum's, a module may be used more than once in a forward pass (torchvision ResNets reuse
    one ReLU per block; Captum raises): each call gets its own multipliers.

    Cost: ONE forward pass of the 2B images ``[x; x']`` (the multipliers do not depend on the
    class) and one backward per requested class; no parameter gradients. Overlapping
    max-pool windows: each window's share is added (Captum's ``max_unpool`` keeps one of
    them). ``reduce="sum"`` (default) keeps summation-to-delta per pixel; ``layer`` is
    ignored (registry signature).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        baseline: float | torch.Tensor = 0.0,
        eps: float = 1e-10,
        reduce: Reduction = "sum",
    ) -> None:
        super().__init__(model, reduce)
        check_deeplift_model(model)
        self.baseline = check_baseline(baseline, "deeplift")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ConfigurationError(f"deeplift eps must be a number >= 0, got {eps!r}")
        self.eps = float(eps)

    def _attributions(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        baseline = broadcast_baseline(self.baseline, images, "deeplift").detach()
        inputs = images.clone().requires_grad_(True)
        with rescale_rule(self.model, self.eps):
            logits = self.model(torch.cat([inputs, baseline]))
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ConfigurationError(
                    f"deeplift needs a model returning logits [B, num_classes]; it returned "
                    f"{getattr(logits, 'shape', type(logits).__name__)}"
                )
            _check_classes(classes, logits.shape[1])
            scores = logits[: images.shape[0]].gather(1, classes)
            num_classes = classes.shape[1]
            multipliers = [
                torch.autograd.grad(scores[:, k].sum(), inputs, retain_graph=k < num_classes - 1)[0]
                for k in range(num_classes)
            ]
        if not multipliers:
            return images.new_zeros((images.shape[0], 0, *images.shape[1:]))
        return (images - baseline).unsqueeze(1) * torch.stack(multipliers, dim=1)

    def __repr__(self) -> str:
        return f"DeepLIFT(baseline={self.baseline!r}, eps={self.eps}, reduce={self.reduce!r})"


def check_deeplift_model(model: nn.Module) -> None:
    """:class:`ConfigurationError` naming the first submodule DeepLIFT cannot handle."""
    for name, module in model.named_modules():
        if not name:
            continue
        has_children = next(module.children(), None) is not None
        if has_children:
            sequential = isinstance(module, nn.Sequential) and (
                type(module).forward is nn.Sequential.forward
            )
            if not sequential and not isinstance(module, TRUSTED_BLOCKS):
                raise ConfigurationError(
                    f"deeplift does not support {type(model).__name__}: its submodule {name!r} "
                    f"({type(module).__name__}) computes its own forward(), whose nonlinear "
                    f"operations no hook can rescale; deeplift supports {SUPPORTED}"
                )
        elif not isinstance(module, (*LINEAR_LEAVES, *ELEMENTWISE, *MAX_POOLS)):
            raise ConfigurationError(
                f"deeplift does not support {type(model).__name__}: its layer {name!r} "
                f"({type(module).__name__}) has no DeepLIFT rule here; deeplift supports "
                f"{SUPPORTED}"
            )
        elif isinstance(module, tuple(MAX_POOLS)) and module.return_indices:
            raise ConfigurationError(
                f"deeplift: max-pool layer {name!r} returns indices; it supports max pools "
                f"that return values only"
            )


@contextmanager
def rescale_rule(model: nn.Module, eps: float) -> Iterator[None]:
    """Inside the block, every supported nonlinearity of ``model``, run on a batch ``[x; x']``
    (the input rows first, then as many baseline rows), returns its usual values, with the
    derivative of the input rows replaced by its DeepLIFT multiplier; the baseline rows are
    detached. ``inplace`` modules run out of place (the rule needs their input). Hooks are
    removed and ``inplace`` flags restored on exit, also on error."""
    hooked = [m for m in model.modules() if isinstance(m, (*ELEMENTWISE, *MAX_POOLS))]
    inplace_flags = [getattr(module, "inplace", None) for module in hooked]
    handles = []
    try:
        for module in hooked:
            if getattr(module, "inplace", False):
                module.inplace = False
            rule = _max_pool_rule if isinstance(module, tuple(MAX_POOLS)) else _rescale_rule
            handles.append(module.register_forward_hook(_with_eps(rule, eps)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in zip(hooked, inplace_flags, strict=True):
            if flag is not None:
                module.inplace = flag


def _with_eps(rule: Callable[..., torch.Tensor], eps: float) -> Callable[..., torch.Tensor]:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return rule(module, args[0], output, eps)

    return hook


def _halves(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if tensor.shape[0] % 2:
        raise ConfigurationError(
            "deeplift runs the images and their baselines as one batch [x; x'], but a layer saw "
            f"{tensor.shape[0]} rows (an odd number); the batch dimension must come first"
        )
    return tensor.chunk(2)


def _rescale_rule(
    module: nn.Module, inputs: torch.Tensor, output: torch.Tensor, eps: float
) -> torch.Tensor:
    """``y`` of the input rows with ``∂y/∂z = Δy/Δz`` (the module's own derivative where
    ``|Δz| < eps``): ``y.detach() + (z − z.detach()) · m`` has the value of ``y`` exactly."""
    z, z_ref = _halves(inputs)
    y, y_ref = _halves(output)
    delta_in = (z - z_ref).detach()
    small = _negligible(delta_in, eps)
    slope = torch.where(small, 0.0, (y - y_ref).detach() / torch.where(small, 1.0, delta_in))
    rescaled = torch.where(small, y, y.detach() + (z - z.detach()) * slope)
    return torch.cat([rescaled, y_ref.detach()])


def _max_pool_rule(
    module: nn.Module, inputs: torch.Tensor, output: torch.Tensor, eps: float
) -> torch.Tensor:
    """Captum's max-pool multipliers as the derivative of the pooled input rows: window w
    sends ``(max(o_w, o'_w) − o'_w) / Δz_p`` to the input's arg-max p and
    ``(o_w − max(o_w, o'_w)) / Δz_q`` to the baseline's arg-max q (the plain gradient where
    ``|Δz| < eps``); a gather of zero-valued carriers, so the values stay ``o``."""
    z, z_ref = _halves(inputs)
    o, o_ref = (half.detach() for half in _halves(output))
    pool = _pool_of(module)
    options = (module.kernel_size, module.stride, module.padding, module.dilation)
    _, arg_max = pool(z.detach(), *options, module.ceil_mode, True)
    _, arg_max_ref = pool(z_ref.detach(), *options, module.ceil_mode, True)
    top = torch.maximum(o, o_ref)
    delta_in = (z - z_ref).detach()
    small = _negligible(delta_in, eps)
    carrier = z - z.detach()  # zero values, derivative 1
    scaled = torch.where(small, 0.0, carrier / torch.where(small, 1.0, delta_in))
    plain = torch.where(small, carrier, 0.0)

    def at(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return values.flatten(2).gather(2, positions.flatten(2)).view_as(o)

    pooled = (
        o
        + at(scaled, arg_max) * (top - o_ref)
        + at(scaled, arg_max_ref) * (o - top)
        + at(plain, arg_max)
    )
    return torch.cat([pooled, o_ref])


def _negligible(delta_in: torch.Tensor, eps: float) -> torch.Tensor:
    """Where ``|Δz| < eps`` (the module's own derivative is used there), and where ``Δz`` is
    exactly 0 (an ``eps`` below the dtype's resolution, e.g. 1e-10 in float16, rounds to 0)."""
    return (delta_in == 0) | (delta_in.abs() < eps)


def _pool_of(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    for kind, pool in MAX_POOLS.items():
        if isinstance(module, kind):
            return pool
    raise TypeError(f"{type(module).__name__} is not a max pool")
