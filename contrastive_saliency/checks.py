"""The argument checks that methods, metrics and datamodules share: a positive integer, and
the number of images per forward pass built on it. Both raise a :class:`ConfigurationError`
(a ``ValueError``) naming the argument, the value given and, where useful, what to do."""

from __future__ import annotations

from contrastive_saliency.errors import ConfigurationError


def check_positive_int(value: object, name: str, hint: str | None = None) -> int:
    """``value`` if it is an ``int`` ≥ 1 (``bool`` is refused), else a
    :class:`ConfigurationError` ``"<name> must be a positive integer, got <value>[; <hint>]"``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        advice = f"; {hint}" if hint else ""
        raise ConfigurationError(f"{name} must be a positive integer, got {value!r}{advice}")
    return value


def check_batch_size(
    batch_size: object, owner: str | None = None, counts: str = "images per forward pass"
) -> int:
    """``batch_size`` if it is a positive integer; the error names the ``owner`` (a method or
    metric, e.g. ``"rise"``) and what one batch ``counts``."""
    name = f"{owner} batch_size ({counts})" if owner else f"batch_size ({counts})"
    return check_positive_int(batch_size, name)
