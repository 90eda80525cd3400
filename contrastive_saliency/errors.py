"""Exceptions for bad user input. The entry points print them as one line and exit with 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserInputError(Exception):
    """Base of the errors in what a user gave (options, files, data) rather than in the code:
    the message names the wrong value and what to do, and the entry points print it alone
    (no traceback) and exit with status 2."""


class ConfigurationError(UserInputError, ValueError):
    """Something the user asked for does not exist or does not fit; the message says what to do."""


class UnknownLayerError(ConfigurationError, KeyError):
    """A dotted layer path that is not a submodule of the model."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes
        return str(self.args[0])


class UnknownMethodError(ConfigurationError, KeyError):
    """A saliency method name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates nearest to ``name`` (difflib ratio), best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.3)
