"""Layer-wise Relevance Propagation for CNNs, with zennit's rule composites and canonizers.

zennit implements each LRP rule as a backward hook, so that the input "gradient" of a model
with a composite registered is the relevance. Here the composite (and the canonizers that fold
batch norms into the preceding layer and turn residual additions into hookable modules) is
registered for one forward pass, the K classes are explained by K backward passes of that one
graph, and everything is removed afterwards, also on error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
import torchvision
from torch import nn
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.composites import COMPOSITES
from zennit.core import Composite
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import _check_classes
from contrastive_saliency.methods.gradient_attributions import InputGradientMethod, Reduction
from contrastive_saliency.methods.registry import register_method

CompositeName = Literal[
    "epsilon_plus_flat",
    "epsilon_plus",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
]
OutputRelevance = Literal["logit", "one"]

# Leaf modules of a plain CNN that zennit's LRP composites handle: linear layers get a rule,
# batch norms are folded into the preceding layer, ReLU passes relevance through, average
# pools get the z-rule, max pools and shape/identity layers pass it by their gradient.
PLAIN_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Flatten,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
SUPPORTED = (
    "torchvision ResNets (zennit ResNetCanonizer), torchvision VGGs (VGGCanonizer), and plain "
    "CNNs whose submodules are nn.Sequential containers of Conv/Linear/BatchNorm/ReLU/pooling/"
    "Flatten/Dropout/Identity layers (SequentialMergeBatchNorm), such as SmallCNN"
)


def lrp_canonizers(model: nn.Module) -> list[Canonizer]:
    """The zennit canonizers for ``model``; :class:`ConfigurationError` for unsupported models.

    torchvision ``ResNet`` → ``ResNetCanonizer`` (folds batch norms, turns each block's residual
    addition into a ``Sum`` module the composites give the z-rule); torchvision ``VGG`` →
    ``VGGCanonizer``; any other model must be plain (:data:`SUPPORTED`) → ``SequentialMergeBatchNorm``.
    timm ResNets are refused: their blocks add the shortcut in ``forward()`` (``x += shortcut``),
    which no zennit canonizer rewrites, so relevance would be doubled at every block.
    Operations written in the root module's own ``forward()`` (``flatten``, ``mean``) are
    propagated by their plain gradient.
    """
    if isinstance(model, torchvision.models.ResNet):
        blocks = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
        for name, module in model.named_modules():
            if name.count(".") == 1 and name.startswith("layer") and not isinstance(module, blocks):
                raise ConfigurationError(
                    f"lrp: ResNet block {name!r} is a {type(module).__name__}, not a torchvision "
                    f"BasicBlock/Bottleneck, which zennit's ResNetCanonizer cannot rewrite; "
                    f"lrp supports {SUPPORTED}"
                )
        return [ResNetCanonizer()]
    if isinstance(model, torchvision.models.VGG):
        _check_plain(model)
        return [VGGCanonizer()]
    if type(model).__module__.startswith("timm.") and type(model).__name__ == "ResNet":
        raise ConfigurationError(
            "lrp does not support timm ResNets: their residual additions happen inside the "
            "blocks' forward() (x += shortcut) and zennit has no canonizer turning them into "
            "modules, so LRP rules would double relevance at every block; use a torchvision "
            f"ResNet (backbone 'torchvision:resnet18' or similar). lrp supports {SUPPORTED}"
        )
    _check_plain(model)
    return [SequentialMergeBatchNorm()]


def _check_plain(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if not name:
            continue
        has_children = next(module.children(), None) is not None
        if has_children and type(module).forward is not nn.Sequential.forward:
            raise ConfigurationError(
                f"lrp does not support {type(model).__name__}: its submodule {name!r} "
                f"({type(module).__name__}) computes its own forward(), whose operations (residual "
                f"additions, attention, ...) LRP rules cannot see; lrp supports {SUPPORTED}"
            )
        if not has_children and not isinstance(module, PLAIN_LEAVES):
            raise ConfigurationError(
                f"lrp does not support {type(model).__name__}: its layer {name!r} "
                f"({type(module).__name__}) has no LRP rule here; lrp supports {SUPPORTED}"
            )


@register_method("lrp")
class LRP(InputGradientMethod):
    """Layer-wise Relevance Propagation (Bach et al., PLOS ONE 2015; rules as in Montavon et al.,
    "Layer-Wise Relevance Propagation: An Overview", 2019, Sec. 10.2), with zennit composites.

    Relevance ``R_k`` of a layer's outputs is redistributed to its inputs ``a_j`` by
    ``R_j = Σ_k a_j w⁺_jk / (Σ_j a_j w⁺_jk) · R_k`` (z⁺) in convolutions,
    ``R_j = Σ_k a_j w_jk / (ε + Σ_j a_j w_jk) · R_k`` (ε) in dense layers, and by the rule of the
    first layer chosen by ``composite`` (a zennit name):

    - ``"epsilon_plus_flat"`` (default; Kohlbrenner et al., IJCNN 2020): flat rule in the first
      layer (``R_j = Σ_k R_k / #inputs_k``), z⁺ in other convolutions, ε in dense layers;
    - ``"epsilon_plus"``: z⁺ in all convolutions, ε in dense layers;
    - ``"epsilon_gamma_box"``: z^B box rule in the first convolution (needs
      ``composite_kwargs={"low": ..., "high": ...}``, the lowest/highest input values, numbers
      or tensors broadcastable to ``[1, C, 1, 1]``), γ rule in other convolutions, ε in dense;
    - ``"epsilon_alpha2_beta1"`` / ``"epsilon_alpha2_beta1_flat"``: α=2, β=1 in convolutions.

    ``composite_kwargs`` go to the zennit composite (``epsilon``, ``stabilizer``, ``gamma``,
    ...). Canonizers are chosen from the model (:func:`lrp_canonizers`).

    Output relevance: ``R_out = y_c · e_c`` (``output_relevance="logit"``, default), so
    ``Σ_pixels R = y_c`` where the rules conserve relevance (no biases, no ε absorption), or
    ``R_out = e_c`` (``"one"``). One forward pass with the composite registered, then one
    backward pass per requested class; the map is the relevance reduced over input channels,
    ``reduce="sum"`` by default (signed, conserving). ``layer`` is accepted for the registry's
    common signature and ignored.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        composite: CompositeName = "epsilon_plus_flat",
        composite_kwargs: Mapping[str, Any] | None = None,
        output_relevance: OutputRelevance = "logit",
        reduce: Reduction = "sum",
    ) -> None:
        super().__init__(model, reduce)
        if composite not in get_args(CompositeName):
            raise ConfigurationError(
                f"lrp composite {composite!r} is not an LRP composite; choose one of "
                f"{', '.join(get_args(CompositeName))}"
            )
        if output_relevance not in get_args(OutputRelevance):
            raise ConfigurationError(
                f"lrp output_relevance must be 'logit' (R = y_c at class c) or 'one' "
                f"(R = 1 at class c), got {output_relevance!r}"
            )
        self.composite_name: CompositeName = composite
        self.composite_kwargs = dict(composite_kwargs or {})
        if composite == "epsilon_gamma_box" and not {"low", "high"} <= self.composite_kwargs.keys():
            raise ConfigurationError(
                "lrp composite 'epsilon_gamma_box' needs composite_kwargs with 'low' and 'high', "
                "the lowest and highest input values (numbers or tensors broadcastable to "
                "[1, C, 1, 1], in the space the model sees)"
            )
        self.output_relevance: OutputRelevance = output_relevance
        lrp_canonizers(model)  # fail at construction, not at the first batch
        self.build_composite()  # and for composite_kwargs the composite does not take

    def build_composite(self) -> Composite:
        """A fresh zennit composite with this model's canonizers (one per call: it holds the
        hook handles)."""
        try:
            return COMPOSITES[self.composite_name](
                canonizers=lrp_canonizers(self.model), **self.composite_kwargs
            )
        except TypeError as error:
            raise ConfigurationError(
                f"lrp composite {self.composite_name!r} does not take composite_kwargs "
                f"{sorted(self.composite_kwargs)}: {error}"
            ) from error

    def _attributions(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        composite = self.build_composite()
        inputs = images.detach().clone().requires_grad_(True)
        try:
            composite.register(self.model)
            logits = self.model(inputs)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ConfigurationError(
                    f"lrp needs a model returning logits [B, num_classes]; it returned "
                    f"{getattr(logits, 'shape', type(logits).__name__)}"
                )
            _check_classes(classes, logits.shape[1])
            num_classes = classes.shape[1]
            relevance = []
            for k in range(num_classes):
                column = classes[:, k : k + 1]
                value = logits.detach().gather(1, column)
                if self.output_relevance == "one":
                    value = torch.ones_like(value)
                seed = torch.zeros_like(logits).scatter_(1, column, value)
                (gradient,) = torch.autograd.grad(
                    logits, inputs, grad_outputs=seed, retain_graph=k < num_classes - 1
                )
                relevance.append(gradient)
        finally:
            composite.remove()
        if not relevance:
            return inputs.new_zeros((inputs.shape[0], 0, *inputs.shape[1:]))
        return torch.stack(relevance, dim=1).detach()

    def __repr__(self) -> str:
        return (
            f"LRP(composite={self.composite_name!r}, composite_kwargs={self.composite_kwargs!r}, "
            f"output_relevance={self.output_relevance!r}, reduce={self.reduce!r})"
        )
