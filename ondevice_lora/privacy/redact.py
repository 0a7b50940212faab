"""Scan a dataset for personal data, and write or apply a redacted copy of it.

A dataset is what training reads: .jsonl files (chat, completions or text records) or .txt/.md
notes. Scanning reports every finding by file and line; redacting replaces each found value by
a placeholder of its kind, numbered per distinct value ([EMAIL_1] wherever that email appears,
in every file), so the text keeps its shape and who-is-who without the values.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..atomic import atomic_folder
from ..data.errors import DatasetError, LineErrors
from ..data.records import json_lines
from ..errors import OndeviceLoraError
from .pii import Finding, scan_text

DATA_SUFFIXES = (".jsonl", ".txt", ".md")
REPORT_VERSION = 1


class PrivacyError(OndeviceLoraError):
    """A privacy command could not read its input or write its output."""


def dataset_files(path) -> list[Path]:
    """The files of a dataset: the file itself, or the .jsonl/.txt/.md files under a folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PrivacyError(f"{path} does not exist: give a dataset file or folder.")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise PrivacyError(f"{path} has no .jsonl, .txt or .md files to scan.")
    return files


def read_text(path: Path) -> str:
    """A .txt/.md note as training reads it: UTF-8, or the error training gives."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8") from None


def read_records(path: Path) -> list[tuple[int, object]]:
    """(line, JSON value) of each record line of a .jsonl file, read as training reads it
    (bytes split at newlines only, a byte order mark allowed); bad lines raise DatasetError."""
    errors = LineErrors(path)
    records = list(json_lines(path, errors))
    errors.raise_if_any()
    return records


def scan_file(path: Path) -> list[Finding]:
    if path.suffix.lower() == ".jsonl":
        # Scan the decoded strings, not the JSON escapes, line by line (one record a line).
        return [
            dataclasses.replace(f, line=number, column=0)
            for number, record in read_records(path)
            for value in _strings(record)
            for f in scan_text(value)
        ]
    return scan_text(read_text(path))


def scan_dataset(path) -> dict[Path, list[Finding]]:
    return {file: scan_file(file) for file in dataset_files(path)}


def report_json(findings: dict[Path, list[Finding]]) -> dict:
    """The JSON report: every finding with its file and line, and counts per kind."""
    items = [
        {"file": str(file), "line": f.line, "kind": f.kind, "value": f.value, "certain": f.certain}
        for file, found in findings.items()
        for f in found
    ]
    counts: dict[str, int] = {}
    for item in items:
        counts[item["kind"]] = counts.get(item["kind"], 0) + 1
    return {"version": REPORT_VERSION, "files": len(findings), "counts": counts, "findings": items}


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


class Redactor:
    """Replaces personal data by placeholders, the same placeholder for the same value."""

    def __init__(self, include_uncertain: bool = True):
        self.include_uncertain = include_uncertain
        self.placeholders: dict[tuple[str, str], str] = {}

    def placeholder(self, kind: str, value: str) -> str:
        key = (kind, value)
        if key not in self.placeholders:
            n = sum(1 for k, _ in self.placeholders if k == kind) + 1
            self.placeholders[key] = f"[{kind.upper()}_{n}]"
        return self.placeholders[key]

    def text(self, text: str) -> str:
        out, last = [], 0
        lines = text.split("\n")
        starts = [0]
        for line in lines[:-1]:
            starts.append(starts[-1] + len(line) + 1)
        for f in scan_text(text):
            if not f.certain and not self.include_uncertain:
                continue
            start = starts[f.line - 1] + f.column - 1
            out.append(text[last:start])
            out.append(self.placeholder(f.kind, f.value))
            last = start + len(f.value)
        out.append(text[last:])
        return "".join(out)

    def obj(self, obj):
        """A JSON value with every string in it redacted (keys kept)."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {k: self.obj(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.obj(v) for v in obj]
        return obj

    def file_text(self, path: Path) -> str:
        if path.suffix.lower() != ".jsonl":
            return self.text(read_text(path))
        lines = [json.dumps(self.obj(obj), ensure_ascii=False) for _, obj in read_records(path)]
        return "\n".join(lines) + "\n"


def redact_dataset(path, out, force: bool = False) -> tuple[list[Path], Redactor]:
    """Write a redacted copy of the dataset at `path` into folder `out`, same layout.

    `out` is written whole or not at all: every file is read and redacted first, then written
    into a temporary folder beside `out` that replaces it in one rename. An `out` that is, holds
    or lies inside the dataset is refused (the input is never written over), and so is one that
    already holds files, unless `force` (then it is replaced, everything in it included).
    """
    path, out = Path(path).expanduser(), Path(out).expanduser()
    source, target = path.resolve(), out.resolve()
    if target == source or target in source.parents or source in target.parents:
        raise PrivacyError(
            f"{out}: the redacted copy would be written over or inside the dataset {path}; "
            "choose an --out folder outside it (e.g. data-redacted)."
        )
    if out.exists() and not out.is_dir():
        raise PrivacyError(f"{out} is a file; --out must be a folder (new or empty).")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PrivacyError(
            f"{out} already holds files, which the redacted copy would replace. Choose a new or "
            "empty --out, or pass --force to replace that folder and everything in it."
        )
    root = path if path.is_dir() else path.parent
    redactor = Redactor()
    # Everything is read before anything is written: a bad file leaves no output at all.
    texts = {file.relative_to(root): redactor.file_text(file) for file in dataset_files(path)}
    with atomic_folder(out) as tmp:
        for relative, text in texts.items():
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp / relative).write_text(text, encoding="utf-8")
    return [out / relative for relative in texts], redactor
