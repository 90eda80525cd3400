"""FullGrad: input-gradient × input plus the bias-gradients of every convolution and batch norm,
each post-processed and summed into one map."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import _at_least_float32, _check_classes
from contrastive_saliency.input_gradients import frozen_eval
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.registry import register_method

Rescale = Literal["channel", "layer"]


@register_method("full_grad")
class FullGrad(SaliencyMethod):
    """FullGrad (Srinivas & Fleuret, NeurIPS 2019, Sec. 4, "FullGrad saliency"), as
    pytorch-grad-cam's ``FullGrad`` (the paper's text is not among this project's sources; the
    per-channel ψ below is pytorch-grad-cam's reading of it, the authors' code rescales per
    layer, see ``rescale``):

    ``S_c(x) = ψ(∇_x y_c ⊙ x) + Σ_l Σ_{k ∈ channels(l)} ψ(b_{l,k} · ∇_{z_l} y_c[k])``

    over every ``nn.Conv2d`` with a bias and every ``nn.BatchNorm2d`` (eval-mode bias
    ``β − μγ/√(σ² + ε)``; ``−μ/√(σ² + ε)`` without affine parameters), where ``z_l`` is the
    layer's output and ``y_c`` the logit. ``ψ`` is ``|·|``, a min-max rescale to ``[0, 1]`` and a
    bilinear resize to the input (``align_corners=False``, as ``cv2.resize``), per ``rescale``:

    - ``"channel"`` (default; pytorch-grad-cam): every channel
      of every term (each colour channel of the input term, each channel of each layer) is
      rescaled on its own, then the channels are summed;
    - ``"layer"`` (the authors' code, ``idiap/fullgrad-saliency``): each term is rescaled over
      all its channels and positions at once, then summed over channels and resized with
      ``align_corners=True``.

    A constant channel or term rescales to 0 (pytorch-grad-cam divides by ``max + 1e-7``, the
    authors' code by ``max + 1e-6``: the same up to that ε). The map is the raw sum; pytorch-
    grad-cam also min-max rescales the sum of each image for display (not done here:
    maps are raw, the common contract; the parity test compares after that rescale).

    Layers: pytorch-grad-cam takes modules whose type is exactly ``Conv2d`` / ``BatchNorm2d``;
    here every ``nn.Conv2d`` subclass counts too (timm's ``Conv2dSame``, ``StdConv2d`` add
    their bias last), while a ``BatchNorm2d`` subclass with its own ``forward()`` (timm's
    ``BatchNormAct2d``, which applies its activation inside) is refused: the gradient at its
    bias is not observable by a hook. A batch norm without running statistics is refused (it
    normalises by batch statistics even in eval mode, so it has no fixed bias). Each layer's
    output gradient comes from a zero-valued probe added to it, so in-place operations after
    the layer (``ReLU(inplace=True)``) do not change it.

    Cost: one forward pass and one backward per requested class (gradients w.r.t. the input
    and every bias layer's output in the same call), no parameter gradients. ``layer`` is
    ignored (every bias layer is used).
    """

    def __init__(
        self, model: nn.Module, layer: str | None = None, *, rescale: Rescale = "channel"
    ) -> None:
        super().__init__(model)
        if rescale not in get_args(Rescale):
            raise ConfigurationError(
                f"full_grad rescale must be 'channel' (pytorch-grad-cam) or 'layer' (the authors' "
                f"code), got {rescale!r}"
            )
        self.rescale: Rescale = rescale
        self.bias_layers = bias_layers(model)

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        maps = []
        # closing(): the hooks go at once, also when post-processing raises mid-way
        with closing(self._class_terms(images, classes.to(images.device))) as terms:
            for input_term, bias_terms in terms:
                total = self._post_process(input_term.abs(), size)
                for term in bias_terms:
                    total = total + self._post_process(term.abs(), size)
                maps.append(total)
        if not maps:
            return images.new_zeros((images.shape[0], 0, *size))
        return torch.stack(maps, dim=1)

    def decomposition(
        self, images: torch.Tensor, classes: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The signed full-gradient terms (Eq. 3) for ``classes`` ``[B, K]``: input-gradient ×
        input ``[B, K, C, H, W]`` and, per call of each bias layer (forward order), bias ×
        output-gradient ``[B, K, C_l, h_l, w_l]``. For a ReLU network their sum plus the
        biases of the other layers (the head's) is the logit (completeness)."""
        terms = list(self._class_terms(images, classes.to(images.device)))
        inputs = torch.stack([input_term for input_term, _ in terms], dim=1)
        per_layer = zip(*(bias_terms for _, bias_terms in terms), strict=True)
        layers = [torch.stack(per_class, dim=1) for per_class in per_layer]
        return inputs, layers

    def _class_terms(
        self, images: torch.Tensor, classes: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Per requested class (one backward each after one forward): ``x ⊙ ∇_x y_c``
        ``[B, C, H, W]`` and ``b_l ⊙ ∇_{z_l} y_c`` of every bias-layer call."""
        with frozen_eval(self.model), _output_probes(self.bias_layers) as probes:
            inputs = images.detach().clone().requires_grad_(True)
            logits = self.model(inputs)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ConfigurationError(
                    f"full_grad needs a model returning logits [B, num_classes]; it returned "
                    f"{getattr(logits, 'shape', type(logits).__name__)}"
                )
            _check_classes(classes, logits.shape[1])
            scores = logits.gather(1, classes)
            outputs = [probe for probe, _ in probes]
            dtype = torch.promote_types(inputs.dtype, torch.float32)
            biases = [bias_of(layer).to(dtype).view(1, -1, 1, 1) for _, layer in probes]
            num_classes = classes.shape[1]
            for k in range(num_classes):
                input_gradient, *gradients = torch.autograd.grad(
                    scores[:, k].sum(),
                    [inputs, *outputs],
                    retain_graph=k < num_classes - 1,
                    materialize_grads=True,
                )
                # float32 at least: autocast leaves float16 gradients, whose products underflow
                bias_terms = [
                    _at_least_float32(g) * b for g, b in zip(gradients, biases, strict=True)
                ]
                yield _at_least_float32(input_gradient) * inputs.detach(), bias_terms

    def _post_process(self, term: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """ψ of a non-negative term ``[B, C, h, w]`` summed over channels, ``[B, H, W]``."""
        dims = (2, 3) if self.rescale == "channel" else (1, 2, 3)
        low = term.amin(dim=dims, keepdim=True)
        spread = term.amax(dim=dims, keepdim=True) - low
        scaled = torch.where(spread > 0, (term - low) / spread.clamp_min(1e-30), 0.0)
        summed = scaled.sum(dim=1, keepdim=True)
        if summed.shape[-2:] != size:
            summed = F.interpolate(
                summed, size=tuple(size), mode="bilinear", align_corners=self.rescale == "layer"
            )
        return summed[:, 0]

    def __repr__(self) -> str:
        return f"FullGrad(rescale={self.rescale!r}, bias_layers={len(self.bias_layers)})"


def bias_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose bias-gradients FullGrad uses, in forward-definition order: every
    ``nn.Conv2d`` with a bias and every ``nn.BatchNorm2d``; :class:`ConfigurationError` for a
    batch norm FullGrad cannot read (see :class:`FullGrad`)."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            layers.append(module)
        elif isinstance(module, nn.BatchNorm2d):
            if type(module).forward is not nn.BatchNorm2d.forward:
                raise ConfigurationError(
                    f"full_grad: layer {name!r} ({type(module).__name__}) is a batch norm with "
                    f"its own forward() (an activation applied inside), so the gradient at its "
                    f"bias cannot be observed; full_grad supports plain nn.Conv2d and "
                    f"nn.BatchNorm2d layers"
                )
            if module.running_mean is None or module.running_var is None:
                raise ConfigurationError(
                    f"full_grad: batch norm {name!r} has no running statistics "
                    f"(track_running_stats=False), so it normalises by batch statistics and has "
                    f"no fixed bias; full_grad needs batch norms with running statistics"
                )
            layers.append(module)
    return layers


def bias_of(layer: nn.Module) -> torch.Tensor:
    """The bias ``[C]`` a layer adds to each output channel (eval mode), detached."""
    if isinstance(layer, nn.BatchNorm2d):
        scale = torch.rsqrt(layer.running_var + layer.eps)
        if layer.weight is not None:
            scale = scale * layer.weight
        shift = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        return (shift - layer.running_mean * scale).detach()
    return layer.bias.detach()


@contextmanager
def _output_probes(layers: list[nn.Module]) -> Iterator[list[tuple[torch.Tensor, nn.Module]]]:
    """Inside the block, each call of a layer adds a zero tensor that requires grad to the
    layer's output and records ``(probe, layer)``: the gradient w.r.t. the probe is the gradient
    w.r.t. the layer's output (a module called twice gets two probes)."""
    probes: list[tuple[torch.Tensor, nn.Module]] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            return None
        probe = torch.zeros_like(output, requires_grad=True)
        probes.append((probe, module))
        return output + probe

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield probes
    finally:
        for handle in handles:
            handle.remove()
