"""Where the files of a Hugging Face model ``hf:<repo id or local directory>`` are, offline.

A local directory (written by ``save_pretrained``) is used as it is; a repo id is read from
the local Hugging Face cache only (``local_files_only``: nothing is downloaded here). A
missing model or file is a :class:`~contrastive_saliency.errors.ConfigurationError` naming the path and
how to fetch it where there is network (``uv run hf download <repo id>``).
"""

from __future__ import annotations

from pathlib import Path

from contrastive_saliency.errors import ConfigurationError

SCHEME = "hf:"


def hf_source(name: str) -> str:
    """``hf:<source>`` → ``<source>``: an existing directory (as a path string) or a repo id."""
    source = name.removeprefix(SCHEME)
    if not source:
        raise ConfigurationError(
            f"{name!r} names no model: use hf:<repo id> (e.g. hf:google/vit-base-patch16-224) or "
            f"hf:<directory written by save_pretrained>"
        )
    path = Path(source).expanduser()
    looks_like_path = source.startswith(("/", ".", "~")) or path.exists()
    if looks_like_path and not path.is_dir():
        raise ConfigurationError(
            f"hf:{source}: no such directory; pass a directory written by save_pretrained() "
            f"(config.json, model.safetensors, preprocessor_config.json) or a repo id"
        )
    return str(path) if looks_like_path else source


def missing_model(source: str, what: str, error: Exception | None = None) -> ConfigurationError:
    """The error for a model (or one of its files, ``what``) that is not on this machine."""
    from huggingface_hub import constants

    if Path(source).is_dir():
        return ConfigurationError(
            f"hf:{source}: {what} not found in that directory; it must hold what "
            f"save_pretrained() writes (config.json and the weights; preprocessor_config.json "
            f"from the image processor's save_pretrained)"
        )
    detail = f" ({type(error).__name__})" if error is not None else ""
    return ConfigurationError(
        f"hf:{source}: {what} not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
        f"and nothing is downloaded here{detail}; fetch it where there is network with "
        f"`uv run hf download {source}` (then copy the cache, or set HF_HOME), or pass a "
        f"local directory written by save_pretrained()"
    )


def hf_file(name: str, filename: str) -> Path:
    """The local path of ``filename`` of model ``hf:<source>`` (directory or cache)."""
    source = hf_source(name)
    if Path(source).is_dir():
        path = Path(source) / filename
        if not path.is_file():
            raise missing_model(source, filename)
        return path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, filename)
    if not isinstance(cached, str):
        raise missing_model(source, filename)
    return Path(cached)
