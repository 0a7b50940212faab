"""DatasetError, and the collector that gathers a file's line errors so they are raised once."""

from __future__ import annotations

from pathlib import Path

from ..errors import OndeviceLoraError

# Enough to show a pattern (every line is wrong the same way) without flooding the terminal.
MAX_LINE_ERRORS = 10


class DatasetError(OndeviceLoraError):
    """A dataset or data option is unusable; the message names the file, the line and the fix."""


class LineErrors:
    """Problems found in one file, each tied to a 1-based line number.

    Reading goes on after a bad line, so one run shows every problem (up to MAX_LINE_ERRORS)
    instead of making the user fix them one at a time.
    """

    def __init__(self, path: Path, limit: int = MAX_LINE_ERRORS):
        self.path = path
        self.limit = limit
        self.problems: list[str] = []
        self.count = 0

    def add(self, line: int | None, message: str) -> None:
        self.count += 1
        if len(self.problems) < self.limit:
            where = f"{self.path}, line {line}" if line is not None else str(self.path)
            self.problems.append(f"{where}: {message}")

    def __bool__(self) -> bool:
        return self.count > 0

    def raise_if_any(self) -> None:
        """Raise one DatasetError listing every problem gathered, if there were any."""
        if not self.count:
            return
        if self.count == 1:
            raise DatasetError(self.problems[0])
        lines = "\n  ".join(self.problems)
        more = self.count - len(self.problems)
        tail = f"\n  ... and {more} more" if more else ""
        raise DatasetError(f"{self.path} has {self.count} problems:\n  {lines}{tail}")
