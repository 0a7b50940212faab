"""Errors raised at the boundary: each names the file, what was expected and how to fix it."""

from __future__ import annotations


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
