"""Build a classifier network by name: ``small_cnn``, ``timm:<name>``, ``torchvision:<name>`` or
``hf:<repo id or directory>`` (a Hugging Face ``transformers`` image classifier)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from contrastive_saliency.errors import ConfigurationError, closest
from lightning_modules.torch_files import load_torch_file

SOURCES = (
    "small_cnn", "timm:<model name>", "torchvision:<model name>", "hf:<repo id or directory>",
)  # fmt: skip


def build_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights_path: str | None = None,
    *,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A network mapping images to ``[B, num_classes]`` logits.

    ``pretrained`` loads the library's default weights from its local cache (timm: the Hugging
    Face cache, torchvision: ``$TORCH_HOME``; ``hf:`` the model's own files in the directory or
    the cache) and replaces the head when ``num_classes`` differs from the pretrained one;
    without it the architecture starts from random weights. ``weights_path`` loads a state dict from a local file afterwards.
    ``model_kwargs`` go to the library's constructor (timm ``create_model``, e.g.
    ``img_size``/``patch_size``/``depth`` of a ViT; torchvision ``get_model``; ``hf:`` config
    attributes). ``hf:`` models come wrapped as
    :class:`~contrastive_saliency.huggingface.HuggingFaceClassifier` (logits out, default layers).
    """
    model_kwargs = dict(model_kwargs or {})
    if name == "small_cnn":
        if pretrained:
            raise ConfigurationError("small_cnn has no pretrained weights: use weights_path")
        if model_kwargs:
            raise ConfigurationError(
                f"small_cnn takes no model_kwargs, got {sorted(model_kwargs)}; use a timm: or "
                f"torchvision: backbone"
            )
        model: nn.Module = _small_cnn(num_classes)
    elif name.startswith("timm:"):
        model = _timm(name.removeprefix("timm:"), num_classes, pretrained, model_kwargs)
    elif name.startswith("torchvision:"):
        model = _torchvision(
            name.removeprefix("torchvision:"), num_classes, pretrained, model_kwargs
        )
    elif name.startswith("hf:"):
        model = _huggingface(name, num_classes, pretrained, model_kwargs)
    else:
        raise ConfigurationError(
            f"unknown backbone {name!r}: expected one of {', '.join(SOURCES)} "
            f"(e.g. 'timm:resnet18', 'torchvision:densenet201')"
        )
    if weights_path is not None:
        load_weights(model, weights_path)
    return model


def _small_cnn(num_classes: int) -> nn.Module:
    from lightning_modules.small_cnn import SmallCNN

    return SmallCNN(num_classes)


def _timm(
    model_name: str, num_classes: int, pretrained: bool, model_kwargs: dict[str, Any]
) -> nn.Module:
    import timm

    import lightning_modules.shapes_vit  # noqa: F401  (registers timm:vit_convstem_shapes)

    if not timm.is_model(model_name):
        suggestions = closest(model_name, timm.list_models())
        raise ConfigurationError(
            f"unknown timm model {model_name!r}; closest: {', '.join(suggestions) or 'none'}"
        )
    try:
        return timm.create_model(
            model_name, pretrained=pretrained, num_classes=num_classes, **model_kwargs
        )
    except (OSError, RuntimeError) as error:  # hub unreachable and weights not cached
        if not pretrained:
            raise
        raise ConfigurationError(
            f"pretrained weights for timm:{model_name} are not in the local cache and cannot be "
            f"downloaded here ({type(error).__name__}); download them where there is network "
            f"(they land in ~/.cache/huggingface) or pass weights_path"
        ) from error


def _torchvision(
    model_name: str, num_classes: int, pretrained: bool, model_kwargs: dict[str, Any]
) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if model_name not in available:
        suggestions = closest(model_name, available)
        raise ConfigurationError(
            f"unknown torchvision model {model_name!r}; closest: {', '.join(suggestions) or 'none'}"
        )
    if not pretrained:
        return torchvision.models.get_model(
            model_name, weights=None, num_classes=num_classes, **model_kwargs
        )
    try:
        model = torchvision.models.get_model(model_name, weights="DEFAULT", **model_kwargs)
    except (OSError, RuntimeError) as error:
        raise ConfigurationError(
            f"pretrained weights for torchvision:{model_name} are not in the local cache "
            f"($TORCH_HOME/hub/checkpoints) and cannot be downloaded here "
            f"({type(error).__name__}); download them where there is network or pass weights_path"
        ) from error
    _replace_head(model, num_classes)
    return model


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ConfigurationError(
            "hf: models need the optional dependency transformers: install the project with "
            "`uv sync --extra hf`"
        ) from error
    return transformers


def hf_config(name: str, model_kwargs: dict[str, Any] | None = None):
    """The ``transformers`` config of ``hf:<repo id or directory>``, read offline."""
    from datamodules.hf_hub import hf_source, missing_model

    transformers = _transformers()
    source = hf_source(name)
    try:
        return transformers.AutoConfig.from_pretrained(
            source, local_files_only=True, **(model_kwargs or {})
        )
    except OSError as error:
        raise missing_model(source, "config.json", error) from error


def _huggingface(
    name: str, num_classes: int, pretrained: bool, model_kwargs: dict[str, Any]
) -> nn.Module:
    from contrastive_saliency.huggingface import HuggingFaceClassifier
    from datamodules.hf_hub import hf_source, missing_model

    auto = _transformers().AutoModelForImageClassification
    config = hf_config(name, model_kwargs)
    source = hf_source(name)
    if not pretrained:
        config.num_labels = num_classes
        return HuggingFaceClassifier(auto.from_config(config).eval())
    new_head = config.num_labels != num_classes
    if new_head:
        config.num_labels = num_classes  # a fresh classifier of this size
    try:
        model = auto.from_pretrained(
            source, config=config, local_files_only=True, ignore_mismatched_sizes=new_head
        )
    except OSError as error:
        raise missing_model(source, "the weights (model.safetensors)", error) from error
    except ValueError as error:  # e.g. a config of another task
        raise ConfigurationError(
            f"{name} is not an image classifier transformers can load: {str(error).splitlines()[0]}"
        ) from error
    return HuggingFaceClassifier(model.eval())


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last ``nn.Linear`` for a fresh one with ``num_classes`` outputs if needed."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigurationError(f"{type(model).__name__} has no linear head to resize")
    path, head = linears[-1]
    if head.out_features == num_classes:
        return
    parent = model.get_submodule(path.rpartition(".")[0])
    setattr(parent, path.rpartition(".")[2], nn.Linear(head.in_features, num_classes))


def load_weights(model: nn.Module, weights_path: str) -> None:
    """Load a state dict (``.pt``/``.pth``/``.ckpt`` with ``state_dict``, or ``.safetensors``)."""
    path = Path(weights_path)
    if not path.is_file():
        raise ConfigurationError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_torch_file(path, "a state dict (torch.save(model.state_dict(), FILE))")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise ConfigurationError(
            f"weights in {path} do not fit the model: {' '.join(first[:3])[:300]}"
        ) from error
