"""The one-forward, many-classes gradient w.r.t. the input image: the primitive every
input-space method (gradient, Input×Gradient, Integrated Gradients, SmoothGrad, guided
backprop) is built on, as :func:`contrastive_saliency.gradients.class_gradients` is for the CAMs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import _check_classes, as_class_matrix


class InputGradients(NamedTuple):
    """Detached ``logits`` ``[B, N]`` and ``gradients[b, k] = d logits[b, classes[b, k]] /
    d images[b]`` as ``[B, K, C, H, W]``."""

    logits: torch.Tensor
    gradients: torch.Tensor


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block: eval mode, every parameter frozen, autograd on (also for callers under
    ``torch.no_grad`` or ``torch.inference_mode``). On exit, also on error, the train/eval mode
    and each parameter's ``requires_grad`` flag are restored. Blocks may nest."""
    was_training = model.training
    grad_flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        model.eval()
        for parameter, _ in grad_flags:
            parameter.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            yield model
    finally:
        for parameter, flag in grad_flags:
            parameter.requires_grad_(flag)
        model.train(was_training)


def input_class_gradients(
    model: nn.Module, images: torch.Tensor, classes: torch.Tensor
) -> InputGradients:
    """One forward pass of ``images`` ``[B, C, H, W]``, then K backward passes, one per column
    of ``classes`` (``LongTensor[B]`` or ``[B, K]``): the gradient of
    ``logits.gather(1, classes)[:, k].sum()`` w.r.t. the input. In eval mode the samples are
    independent, so that sum's gradient holds every sample's own ``∂y_{c_bk}/∂x_b``.

    No parameter gradients are computed (parameters are frozen during the call and restored
    after, see :func:`frozen_eval`). Any backward hooks present on the model (e.g. guided
    backprop's) act on every one of the K backward passes. Inference tensors are accepted.
    """
    classes = as_class_matrix(classes, images.shape[0]).to(images.device)
    with frozen_eval(model):
        # A copy: an inference tensor cannot enter autograd, and the caller's tensor stays
        # untouched by in-place operations inside forward().
        inputs = images.detach().clone().requires_grad_(True)
        logits = model(inputs)
        if logits.dim() != 2:
            raise ConfigurationError(
                f"the model returns shape {tuple(logits.shape)}; input-gradient methods need "
                f"logits of shape [B, num_classes]"
            )
        _check_classes(classes, logits.shape[1])
        if not logits.requires_grad:
            raise ConfigurationError(
                "the model's logits do not depend on its input through autograd (a "
                "torch.no_grad() or .detach() inside forward()?); input gradients need a "
                "differentiable forward"
            )
        scores = logits.gather(1, classes)
        num_classes = classes.shape[1]
        gradients = []
        for k in range(num_classes):
            (gradient,) = torch.autograd.grad(
                scores[:, k].sum(), inputs, retain_graph=k < num_classes - 1, allow_unused=True
            )
            gradients.append(torch.zeros_like(inputs) if gradient is None else gradient)
    stacked = (
        torch.stack(gradients, dim=1)
        if gradients
        else inputs.new_zeros((inputs.shape[0], 0, *inputs.shape[1:]))
    )
    return InputGradients(logits=logits.detach(), gradients=stacked.detach())
