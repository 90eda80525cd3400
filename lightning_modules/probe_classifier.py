"""A linear probe: a frozen feature backbone and a linear head, ``logits = W φ(x) + b``
(Finer-CAM Sec. 4.1 and App. B.3: a linear classifier on a frozen CLIP / DINOv2 encoder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.layers import default_layer
from lightning_modules.backbones import build_backbone, load_weights
from lightning_modules.torch_files import load_torch_file

Pooling = Literal["default", "cls", "mean_patch"]
# timm's global_pool values: the class token, or the mean of the patch tokens (prefix tokens,
# i.e. class and register tokens, excluded), both taken after the final norm.
_TIMM_GLOBAL_POOL = {"cls": "token", "mean_patch": "avg"}
HEAD_KEYS = (("weight", "bias"), ("head.weight", "head.bias"))
LAYOUT_ATTRIBUTES = (
    "num_prefix_tokens",  # timm ViTs
    "patch_embed",
    "output_fmt",  # timm channels-last models (Swin)
    "class_token",  # torchvision ViTs
    "conv_proj",
    "patch_size",
    "image_size",
)


class ProbeClassifier(nn.Module):
    """``forward(x) = head(backbone(x)) = W φ(x) + b`` with ``φ`` the backbone's pooled
    features ``[B, D]`` and ``W`` ``[N, D]``. The backbone is frozen (only a head would ever be
    trained). Saliency layer paths are ``backbone.<name>``; the backbone's default layer and
    layout attributes (``LAYOUT_ATTRIBUTES``) are the probe's, so token maps lay out as for the
    backbone alone."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, feature_dim: int) -> None:
        super().__init__()
        if head.in_features != feature_dim:
            raise ConfigurationError(
                f"the linear head takes {head.in_features} input features but the backbone "
                f"({type(backbone).__name__}) gives {feature_dim}: the head was trained on "
                f"another backbone or pooling"
            )
        self.backbone = backbone.requires_grad_(False)
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    @property
    def default_saliency_layer(self) -> str:
        """The backbone's default saliency layer (:func:`contrastive_saliency.layers.default_layer`)."""
        return f"backbone.{default_layer(self.backbone)}"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in LAYOUT_ATTRIBUTES:
                raise
        # The backbone's layout declarations (token prefix, patch grid, channels-last output),
        # read by contrastive_saliency.feature_layout on the explained model to arrange its layers' outputs.
        return getattr(self.backbone, name)


def build_feature_backbone(
    model_name: str,
    pretrained: bool = False,
    weights_path: str | None = None,
    pooling: Pooling = "default",
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, int]:
    """The network ``model_name`` without its classifier, mapping images to pooled features
    ``[B, D]``, and ``D``. timm: built with ``num_classes=0``; ``pooling`` picks a ViT's class
    token (``cls``) or the mean of its patch tokens (``mean_patch``, Finer-CAM's DINOv2 probe).
    torchvision: the last ``nn.Linear`` replaced by ``nn.Identity``. ``weights_path`` is a state
    dict of this headless network, loaded last, or a ``train.py`` checkpoint of a classifier
    with this architecture (``outputs/<run>/checkpoints/last.ckpt``: its network without the
    linear head, e.g. an encoder trained on the coarse shape task, :func:`load_encoder_weights`);
    ``model_kwargs`` go to the library's constructor (e.g. a timm ViT's ``img_size``)."""
    if model_name.startswith("timm:"):
        backbone = build_backbone(model_name, 0, pretrained, model_kwargs=model_kwargs)
        _set_timm_pooling(backbone, model_name, pooling)
        # Models with a pre-logits layer feed the head head_hidden_size features, not num_features.
        feature_dim = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
    elif model_name.startswith("torchvision:"):
        if pooling != "default":
            raise ConfigurationError(
                f"pooling={pooling!r} applies to timm ViTs only; {model_name} supports "
                f"pooling='default'"
            )
        # The head is dropped below, so its size only matters for matching pretrained weights.
        backbone = build_backbone(model_name, 1000, pretrained, model_kwargs=model_kwargs)
        feature_dim = _drop_last_linear(backbone, model_name)
    else:
        raise ConfigurationError(
            f"a linear probe needs a 'timm:<name>' or 'torchvision:<name>' backbone, got "
            f"{model_name!r}"
        )
    if weights_path is not None:
        load_encoder_weights(backbone, weights_path)
    return backbone, feature_dim


def load_encoder_weights(backbone: nn.Module, weights_path: str) -> None:
    """Load ``weights_path`` into a headless ``backbone``: a state dict of it
    (:func:`~lightning_modules.backbones.load_weights`), or a ``train.py`` checkpoint
    (``state_dict`` keys ``model.<name>``) of the same network with a classifier head, whose
    linear head (the one weight/bias pair the headless network lacks) is dropped."""
    path = Path(weights_path)
    if path.suffix not in (".ckpt", ".pt", ".pth") or not path.is_file():
        load_weights(backbone, weights_path)
        return
    checkpoint = load_torch_file(path, "a state dict or a train.py checkpoint")
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(k.startswith("model.") for k in state):
        load_weights(backbone, weights_path)
        return
    state = {key.removeprefix("model."): value for key, value in state.items()}
    extra = sorted(set(state) - set(backbone.state_dict()))
    heads = {key.rpartition(".")[0] for key in extra}
    if len(heads) == 1 and extra == [f"{next(iter(heads))}.bias", f"{next(iter(heads))}.weight"]:
        head = next(iter(heads))
        if state[f"{head}.weight"].ndim == 2:
            del state[f"{head}.weight"], state[f"{head}.bias"]
    try:
        backbone.load_state_dict(state)
    except RuntimeError as error:
        first = " ".join(str(error).strip().splitlines()[:3])[:300]
        raise ConfigurationError(
            f"the network of the train.py checkpoint {path} does not fit the probe's backbone "
            f"{type(backbone).__name__} (only its linear head is dropped): {first}; train it with "
            f"the same backbone and backbone_kwargs"
        ) from error


def _set_timm_pooling(model: nn.Module, model_name: str, pooling: Pooling) -> None:
    """Switch a timm ViT's ``global_pool``. Done with ``reset_classifier`` after creation: passing
    ``global_pool='avg'`` to ``create_model`` would also move the final norm after the pool
    (``fc_norm``), so the pretrained ``norm`` weights of class-token models would not load."""
    if pooling == "default":
        return
    if pooling not in _TIMM_GLOBAL_POOL:
        raise ConfigurationError(
            f"unknown pooling {pooling!r}; expected one of default, {', '.join(_TIMM_GLOBAL_POOL)}"
        )
    if not hasattr(model, "num_prefix_tokens"):
        raise ConfigurationError(
            f"pooling={pooling!r} applies to timm ViTs (token sequences); {model_name} is a "
            f"{type(model).__name__}: use pooling='default'"
        )
    if pooling == "cls" and getattr(model, "cls_token", None) is None:
        raise ConfigurationError(
            f"pooling='cls' needs a class token and {model_name} has none: use 'mean_patch'"
        )
    model.reset_classifier(0, global_pool=_TIMM_GLOBAL_POOL[pooling])


def _drop_last_linear(model: nn.Module, model_name: str) -> int:
    """Replace the last ``nn.Linear`` with ``nn.Identity``; return its ``in_features``."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigurationError(f"{model_name} has no nn.Linear classifier to remove")
    path, last = linears[-1]
    parent_path, _, attribute = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attribute, nn.Identity())
    return last.in_features


def load_linear_head(path: str | Path) -> nn.Linear:
    """An ``nn.Linear`` from a ``torch.save`` file holding ``weight`` ``[N, D]`` and ``bias``
    ``[N]`` (also under ``head.weight`` / ``head.bias``; a head without bias has no ``bias``),
    or from a ``train.py`` probe checkpoint, whose head is ``model.head.*`` of its state dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"linear head file not found: {path}")
    state = load_torch_file(
        path, "a linear head {'weight': [N, D], 'bias': [N]} or a train.py probe checkpoint"
    )
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    keys = next((k for k in HEAD_KEYS if isinstance(state, dict) and k[0] in state), None)
    if keys is None:
        found = sorted(map(str, state))[:10] if isinstance(state, dict) else type(state).__name__
        raise ConfigurationError(
            f"linear head {path} has no 'weight' or 'head.weight' entry (found: {found}); save "
            f"{{'weight': [N, D], 'bias': [N]}} or an nn.Linear's state_dict()"
        )
    weight, bias = state[keys[0]], state.get(keys[1])
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ConfigurationError(f"linear head {path}: {keys[0]} must be [N, D], got {shape}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ConfigurationError(
            f"linear head {path}: {keys[1]} must be [{weight.shape[0]}] to match {keys[0]} "
            f"{tuple(weight.shape)}, got {shape}"
        )
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head
