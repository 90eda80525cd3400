"""Sorted cosine similarity of a classifier's class weights (Finer-CAM Fig. 1 left, App. A.1).

``S_pq = w^p · w^q / (‖w^p‖ ‖w^q‖)`` over the rows of the final linear layer's weight
``[N, D]`` (Eq. 11); each class's similarities to the other classes sorted in descending order
(Eq. 12); averaged over classes rank by rank, with the standard deviation over classes as the
shaded band. The leftmost point is the mean similarity between a class and its most similar
other class. The matrix and the sorting are
:func:`contrastive_saliency.metrics.functional.representation.classifier_weight_similarity`; this module
finds the linear layer of a classifier (:func:`find_classifier_head`) and summarises the curve
(:func:`similarity_curve`) and each class's nearest classes (:func:`nearest_classes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.layers import resolve_layer
from contrastive_saliency.metrics.functional.representation import (
    classifier_weight_similarity,
    cosine_similarity_matrix,
)

SelfSimilarity = Literal["exclude", "zero"]
# Conventional names of the classifier, checked when the model has no timm get_classifier():
# torchvision ResNet/RegNet ``fc``; DenseNet/VGG/EfficientNet/MobileNet/ConvNeXt and SmallCNN
# ``classifier``; a ProbeClassifier's / Swin's ``head``; torchvision ViT ``heads``.
HEAD_NAMES = ("fc", "classifier", "head", "heads")


@dataclass(frozen=True)
class ClassifierHead:
    """The final linear layer of a classifier: its dotted ``path`` and the ``nn.Linear``;
    ``reason`` says how it was found."""

    path: str
    linear: nn.Linear
    reason: str

    @property
    def weight(self) -> torch.Tensor:
        """The class weights ``[N, D]`` (detached)."""
        return self.linear.weight.detach()


def _path_of(model: nn.Module, module: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def _last_linear(model: nn.Module, root: nn.Module, prefix: str) -> tuple[str, nn.Linear] | None:
    """``root`` itself if it is a Linear, else its last ``nn.Linear`` submodule (the output
    layer of a classifier ``Sequential`` such as VGG's or torchvision ViT's ``heads``)."""
    if isinstance(root, nn.Linear):
        return prefix, root
    linears = [(name, m) for name, m in root.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    name, linear = linears[-1]
    return (f"{prefix}.{name}" if prefix else name), linear


def find_classifier_head(
    model: nn.Module, head: str | None = None, num_classes: int | None = None
) -> ClassifierHead:
    """The linear layer whose rows are the class weights of ``model``.

    Order: ``head`` (a dotted path; its last ``nn.Linear`` if it is a container) when given;
    else timm's ``get_classifier()``; else the one of the conventional attributes
    :data:`HEAD_NAMES` that holds a linear layer (its last ``nn.Linear``); else the model's only
    ``nn.Linear``. With ``num_classes``, the layer must have that many outputs. Raises
    :class:`ConfigurationError` when none is found, when several conventional attributes
    qualify, when the only candidates are several unnamed ``nn.Linear`` layers, or on a class
    count mismatch — pass ``head=`` then.
    """
    if head is not None:
        module = resolve_layer(model, head)  # lists close names when unknown
        found = _last_linear(model, module, head)
        if found is None:
            raise ConfigurationError(
                f"head {head!r} is a {type(module).__name__} without an nn.Linear; name the "
                f"classifier's linear layer"
            )
        result = ClassifierHead(found[0], found[1], f"given as head={head!r}")
    else:
        result = _detect_head(model)
    if num_classes is not None and result.linear.out_features != num_classes:
        raise ConfigurationError(
            f"classifier layer {result.path!r} ({result.reason}) has "
            f"{result.linear.out_features} outputs but the model predicts {num_classes} "
            f"classes; pass head='<dotted path of the final linear layer>'"
        )
    return result


def _detect_head(model: nn.Module) -> ClassifierHead:
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # timm
        module = get_classifier()
        path = _path_of(model, module) if isinstance(module, nn.Module) else None
        found = None if path is None else _last_linear(model, module, path)
        if found is not None:
            return ClassifierHead(found[0], found[1], "timm get_classifier()")
        raise ConfigurationError(
            f"{type(model).__name__}.get_classifier() returns {type(module).__name__}, not a "
            f"linear classifier (a model built with num_classes=0?); pass head='<dotted path>'"
        )
    candidates = []
    for name in HEAD_NAMES:
        module = model._modules.get(name)
        found = None if module is None else _last_linear(model, module, name)
        if found is not None:
            candidates.append(found)
    if len(candidates) == 1:
        path, linear = candidates[0]
        return ClassifierHead(path, linear, f"the model's {path.split('.')[0]!r} attribute")
    if len(candidates) > 1:
        raise ConfigurationError(
            f"ambiguous classifier in {type(model).__name__}: "
            f"{', '.join(repr(path) for path, _ in candidates)} are all linear layers; pass "
            f"head='<dotted path>'"
        )
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) == 1:
        path, linear = linears[0]
        return ClassifierHead(path, linear, "the model's only nn.Linear")
    if not linears:
        raise ConfigurationError(
            f"{type(model).__name__} has no nn.Linear classifier (a 1x1 convolution head?); "
            f"Finer-CAM Fig. 1 needs a linear layer's class weights: pass head='<dotted path>'"
        )
    names = ", ".join(repr(name) for name, _ in linears[-5:])
    raise ConfigurationError(
        f"cannot tell which of the {len(linears)} nn.Linear layers of {type(model).__name__} is "
        f"the classifier (the last ones: {names}); pass head='<dotted path>'"
    )


@dataclass(frozen=True)
class SimilarityCurve:
    """Per rank ``r = 1..R`` (1 = each class's most similar other class), over classes: the
    ``mean`` (Fig. 1's curve), ``sd`` (population standard deviation, its band), ``min`` and
    ``max``, all ``[R]``; ``sorted`` ``[N, R]`` are the rows before averaging."""

    mean: torch.Tensor
    sd: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    sorted: torch.Tensor

    @property
    def ranks(self) -> torch.Tensor:
        return torch.arange(1, self.mean.numel() + 1)


def similarity_curve(
    weight: torch.Tensor,
    max_rank: int | None = None,
    self_similarity: SelfSimilarity = "exclude",
) -> SimilarityCurve:
    """Finer-CAM Fig. 1's sorted similarity curve of class weights ``[N, D]`` (Eqs. 11–12),
    cut at ``max_rank`` ranks. ``self_similarity="exclude"`` ranks the ``N − 1`` other
    classes; ``"zero"`` keeps the paper's literal diagonal (``S_pp − 1 = 0``) in each row."""
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1
    ):
        raise ConfigurationError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    result = classifier_weight_similarity(weight.detach().double(), self_similarity)
    ordered = result.sorted[:, :max_rank]
    return SimilarityCurve(
        mean=ordered.mean(dim=0),
        sd=ordered.std(dim=0, correction=0),
        min=ordered.min(dim=0).values,
        max=ordered.max(dim=0).values,
        sorted=ordered,
    )


def nearest_classes(weight: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's ``k`` most similar other classes by weight cosine similarity: ``(classes
    [N, k], similarities [N, k])``, most similar first; ties go to the lower class index."""
    similarity = cosine_similarity_matrix(weight.detach().double())
    num_classes = similarity.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < num_classes:
        raise ConfigurationError(
            f"k must be an integer in [1, {num_classes - 1}] (the other classes), got {k!r}"
        )
    similarity.fill_diagonal_(-torch.inf)
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :k]
    return order, similarity.gather(1, order)
