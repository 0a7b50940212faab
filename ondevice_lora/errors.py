"""Errors raised at the boundary: each names the file, what was expected and how to fix it."""

from __future__ import annotations

import functools


class OndeviceLoraError(ValueError):
    """Base class for every error this package raises about user input."""


class ModelLoadError(OndeviceLoraError):
    """A model folder, file or Hub id could not be loaded."""


class TokenizerError(OndeviceLoraError):
    """A tokenizer or chat template is missing or malformed."""


def format_list(items, limit: int = 12) -> str:
    """Show at most `limit` items of a long list, saying how many were left out."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


def user_errors(command):
    """Decorate a click command so our input errors end it with their message, not a
    traceback (also when the command runs outside the main group, as in tests)."""
    import click

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except OndeviceLoraError as e:
            raise click.ClickException(str(e)) from None

    return wrapper
