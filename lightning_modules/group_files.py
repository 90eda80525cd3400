"""Config files of one group (``configs/data/*.yaml``) on the command line, in either flag.

LightningCLI's convention for a group file is the group's ``class_path``/``init_args`` at the
top level, given with the group's flag: ``--data configs/data/cub.yaml``. Such a file also
reads as a whole config, ``--config configs/data/cub.yaml``, which would otherwise fail (the
top-level keys ``class_path``/``init_args`` are not options of the entry point):
:func:`route_group_files` passes it on as ``--data FILE``. Users' own files in the older
wrapped form (a single top-level ``data:`` key) work with ``--data`` too (passed on as
``--config FILE``, which means the same). A ``--data`` file that holds anything else — a
model config, a full config, a class that is not a datamodule — is refused naming the file
and what it holds, before the parser sees it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from contrastive_saliency.errors import ConfigurationError

GROUP_KEYS = frozenset({"class_path", "init_args", "dict_kwargs"})
_EXAMPLE = "configs/data/shapes.yaml (class_path: datamodules.<Name>DataModule, init_args: ...)"


def route_group_files(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config`` of a datamodule file turned into ``--data`` and ``--data`` of
    a wrapped (``data:``) file into ``--config``; every ``--data`` file checked (see module)."""
    routed: list[str] = []
    arguments = iter(argv)
    for argument in arguments:
        flag, equals, value = argument.partition("=")
        if flag not in ("--config", "--data"):
            routed.append(argument)
            continue
        if not equals:
            value = next(arguments, None)
            if value is None:  # a flag without its value: the parser says so
                routed.append(argument)
                continue
        routed += [_route(flag, value), value]
    return routed


def _route(flag: str, value: str) -> str:
    """The flag that ``value`` (given with ``flag``) belongs to."""
    path = Path(value)
    if not path.is_file():
        return flag  # a class name, inline YAML or a missing file: the parser reports those
    content = _read(path, flag)
    is_group_file = isinstance(content, dict) and content.keys() <= GROUP_KEYS
    if flag == "--config":
        if not (is_group_file and "class_path" in content):
            return flag
        if _is_datamodule(path, content["class_path"], flag):
            return "--data"
        raise ConfigurationError(
            f"--config {path}: the file holds one class_path ({content['class_path']}) at its "
            f"top level, the form of a single group's config; pass it with that group's flag "
            f"(e.g. --model {path})"
        )
    if isinstance(content, dict) and content.keys() == {"data"}:
        return "--config"  # the wrapped form: {data: {class_path, init_args}}
    if not is_group_file:
        held = (
            "the keys " + ", ".join(map(str, content))
            if isinstance(content, dict)
            else f"a {type(content).__name__}"
        )
        raise ConfigurationError(
            f"--data {path}: expected a datamodule config like {_EXAMPLE}, but the file holds "
            f"{held}; a config of several groups goes to --config {path}"
        )
    if "class_path" in content and not _is_datamodule(path, content["class_path"], flag):
        raise ConfigurationError(
            f"--data {path}: class_path {content['class_path']!r} is not a LightningDataModule; "
            f"--data takes a datamodule config like {_EXAMPLE}"
        )
    return flag


def _read(path: Path, flag: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigurationError(
            f"{flag} {path}: not a YAML file ({str(error).splitlines()[0]})"
        ) from error


def _is_datamodule(path: Path, class_path: Any, flag: str) -> bool:
    """Whether ``class_path`` names a LightningDataModule; a short name (no module) counts as
    one here and is resolved by the parser among the known subclasses."""
    from lightning import LightningDataModule

    if not isinstance(class_path, str):
        raise ConfigurationError(f"{flag} {path}: class_path must be a string, got {class_path!r}")
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        return True
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ConfigurationError(
            f"{flag} {path}: class_path {class_path!r} cannot be imported ({error})"
        ) from error
    return isinstance(found, type) and issubclass(found, LightningDataModule)
