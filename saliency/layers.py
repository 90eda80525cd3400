"""Finding a layer by dotted path and capturing its output for one forward pass.

Hooks exist only inside :func:`capture_layer`; on exit they are removed and the model's
train/eval mode and every parameter's ``requires_grad`` flag are restored, also on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from saliency.errors import ConfigurationError, UnknownLayerError, closest


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (e.g. ``"features.3"``, ``"layer4.2.conv3"``).

    Raises :class:`UnknownLayerError` naming the nearest valid paths when there is none.
    """
    names = [name for name, _ in model.named_modules() if name]
    if path in names:
        return model.get_submodule(path)
    suggestions = closest(path, names)
    raise UnknownLayerError(
        f"layer {path!r} is not a submodule of {type(model).__name__}; "
        f"nearest valid names: {', '.join(suggestions) or '(none)'}; "
        f"list them all with [n for n, _ in model.named_modules()]"
    )


def default_layer(model: nn.Module) -> str:
    """The layer explained when ``layer=None``: the model's own declaration, else timm's last
    feature stage, else the last module of a known torchvision family."""
    declared = getattr(model, "default_saliency_layer", None)
    if isinstance(declared, str):
        return declared
    feature_info = getattr(model, "feature_info", None)  # timm models
    if feature_info is not None:
        info = feature_info[-1] if isinstance(feature_info, list) else feature_info.info[-1]
        return info["module"]
    names = {name for name, _ in model.named_modules()}
    for candidate in ("layer4", "features"):  # torchvision ResNet family; VGG/DenseNet/ConvNeXt
        if candidate in names:
            return candidate
    raise ConfigurationError(
        f"no default saliency layer is known for {type(model).__name__}: pass layer='<dotted path>'"
    )


@dataclass
class LayerCapture:
    """What :func:`capture_layer` recorded: the layer's output during the forward pass."""

    path: str
    activation: torch.Tensor | None = None
    calls: int = field(default=0)

    def output(self) -> torch.Tensor:
        if self.activation is None:
            raise RuntimeError(
                f"layer {self.path!r} was not called during the forward pass: "
                f"choose a layer on the path from the input to the logits"
            )
        if self.calls > 1:
            raise ConfigurationError(
                f"layer {self.path!r} ran {self.calls} times in one forward pass (a shared "
                f"module); choose a layer that runs once per forward"
            )
        return self.activation


@contextmanager
def capture_layer(
    model: nn.Module, path: str, track_gradient: bool = True
) -> Iterator[LayerCapture]:
    """Record the output of layer ``path`` during forward passes inside the block.

    With ``track_gradient`` the recorded activation is a fresh leaf that requires grad and the
    network continues from a copy of it, so ``torch.autograd.grad(score, capture.output())``
    gives d score / d activation while nothing before the layer is traced. Parameters are
    frozen and the model is in eval mode inside the block (batch statistics would couple the
    samples of a batch); both are restored on exit.
    """
    layer = resolve_layer(model, path)
    capture = LayerCapture(path)
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            raise ConfigurationError(
                f"layer {path!r} returns {type(output).__name__}, not a tensor; choose a layer "
                f"whose output is a feature map"
            )
        capture.calls += 1
        if not track_gradient:
            capture.activation = output.detach()
            return None
        leaf = output.detach().requires_grad_(True)
        capture.activation = leaf
        # A clone lets later in-place ops (ReLU(inplace=True)) run without touching the leaf.
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        for parameter, _ in grad_flags:
            parameter.requires_grad_(False)
        yield capture
    finally:
        handle.remove()
        for parameter, flag in grad_flags:
            parameter.requires_grad_(flag)
        model.train(was_training)
