"""Where an export's files go, and how they get there: all or nothing.

A package ``DIR/x.mlpackage`` owns one folder of side files, ``DIR/x-tokenizer/`` (the
tokenizer, its special tokens and the model's config.json: what swift-transformers'
``AutoTokenizer.from(modelFolder:)`` reads), so two exports into one folder never overwrite each
other's files.

Both are built beside their targets (``.x.mlpackage.partial-<pid>``, see ondevice_lora.atomic),
the package is validated there, and only then are both moved into place. A failed validation
leaves --out as it was; with keep_failed the failed package is kept at ``x.mlpackage.failed``
for inspection. A killed export's temporary folders are removed by the next export to the same
target, which says so.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ondevice_lora.atomic import atomic_folder

from .validate import CoreMLValidationError

TOKENIZER_FOLDER_SUFFIX = "-tokenizer"
FAILED_SUFFIX = ".failed"


def tokenizer_folder(package: str | os.PathLike) -> Path:
    """The side-file folder that belongs to `package`: DIR/x.mlpackage -> DIR/x-tokenizer."""
    package = Path(package)
    return package.with_name(package.stem + TOKENIZER_FOLDER_SUFFIX)


def failed_path(package: str | os.PathLike) -> Path:
    """Where --keep-failed keeps a package that failed its validation."""
    package = Path(package)
    return package.with_name(package.name + FAILED_SUFFIX)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class Staging:
    """The folders an export writes into before they are moved into place."""

    package: Path  # becomes out_path: save the package here
    tokenizer: Path  # becomes tokenizer_folder(out_path)
    scratch: Path  # conversion's intermediate files; removed with the staging folders
    out_path: Path  # the final place, for messages


@contextmanager
def staged_export(
    out_path: Path, keep_failed: bool = False, say: Callable[[str], object] = _stderr
) -> Iterator[Staging]:
    """Stage an export of `out_path` (see the module docstring); on leaving without an error,
    the tokenizer folder then the package are moved into place whole."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_folder(out_path, say) as package,
        atomic_folder(tokenizer_folder(out_path), say) as tok,
    ):
        scratch = tok / ".scratch"
        scratch.mkdir()
        try:
            yield Staging(package, tok, scratch, out_path)
        except CoreMLValidationError:
            if keep_failed:
                failed = failed_path(out_path)
                if failed.exists():
                    shutil.rmtree(failed)
                os.replace(package, failed)
                say(f"The package failed its validation; kept for inspection at {failed}.")
            else:
                say(f"The package failed its validation; nothing was written to {out_path}.")
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def relocate_reports(validation, out_path: Path):
    """The check's report(s), naming the package by the path it was moved to (they were made
    on the staged copy)."""
    reports = validation.values() if isinstance(validation, dict) else [validation]
    for report in reports:
        if hasattr(report, "package"):
            report.package = str(out_path)
    return validation
