"""Registry of saliency methods by name, as timm registers models: configs, W&B keys and
``create_method`` all use the same names (``grad_cam``, ``case``, ``finer_cam``, ...)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from contrastive_saliency.errors import ConfigurationError, UnknownMethodError, closest

MethodFactory = TypeVar("MethodFactory", bound=Callable[..., Any])

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator registering a class or factory ``(model, layer=None, **kwargs) -> method``."""

    def decorate(factory: MethodFactory) -> MethodFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"saliency method {name!r} is registered twice")
        _REGISTRY[name] = factory
        if isinstance(factory, type):
            factory.registered_name = name  # error messages of built methods name it
        return factory

    return decorate


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_REGISTRY)


def method_factory(name: str) -> Callable[..., Any]:
    """The class (or factory) registered as ``name``, e.g. to read its metadata before building
    it (``class_agnostic``, ``batch_fields``)."""
    if name not in _REGISTRY:
        suggestions = closest(name, _REGISTRY)
        hint = f"did you mean {', '.join(suggestions)}? " if suggestions else ""
        raise UnknownMethodError(
            f"unknown saliency method {name!r}; {hint}available: {', '.join(list_methods())}"
        )
    return _REGISTRY[name]


def method_options(name: str) -> frozenset[str]:
    """The keyword arguments the factory registered as ``name`` accepts (its signature)."""
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown saliency method {name!r}")
    return frozenset(inspect.signature(_REGISTRY[name]).parameters)


def create_method(name: str, model: nn.Module, layer: str | None = None, **kwargs: Any):
    """Build the method registered as ``name`` for ``model`` (and ``layer`` where it uses one).

    The result is called as ``method(images, classes)`` with ``classes`` ``LongTensor[B]`` or
    ``[B, K]`` and returns ``FloatTensor[B, K, H, W]`` at the input resolution. A method that
    reads batch fields (its ``batch_fields``, e.g. ``("part_mask",)`` for ``oracle_part``) gets
    them by name: ``method(images, classes, part_mask=masks)``.
    """
    factory = method_factory(name)
    try:
        return factory(model, layer=layer, **kwargs)
    except TypeError as error:
        if "unexpected keyword argument" in str(error):
            raise ConfigurationError(f"saliency method {name!r}: {error}") from error
        raise
