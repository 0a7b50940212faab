"""Find the data a DataConfig points at, encode it, and split off validation examples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import TokenizerError, format_list
from .chat import TurnNotFound
from .config import DataConfig
from .errors import DatasetError, LineErrors
from .examples import DatasetStats, Encoded, Encoder
from .records import read_jsonl

SPLIT_FILES = {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}
NOTE_SUFFIXES = (".txt", ".md")


@dataclass
class Dataset:
    """Tokenised examples from one source, with their statistics.

    Behaves as a read-only list of examples ({"input_ids": [...], "loss_mask": [...]}), so it
    can be passed to iterate_batches as it is.
    """

    source: Path
    examples: list[dict]
    stats: DatasetStats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]

    def __iter__(self):
        return iter(self.examples)


@dataclass
class DataSplits:
    """Training data and, when there is any, validation and test data."""

    train: Dataset
    valid: Dataset | None = None
    test: Dataset | None = None


def load_datasets(config: DataConfig, tokenizer) -> DataSplits:
    """Load the dataset at config.path with `tokenizer` (an ondevice_lora Tokenizer).

    A .jsonl file (or a .txt/.md note) gives train data, and validation data split off it by
    config.valid_fraction and config.seed. A folder with train.jsonl gives train data, and
    valid.jsonl / test.jsonl if present (without valid.jsonl, validation is split off train).
    Any other folder is read as notes: every .txt and .md file in it and its subfolders.
    Raises DatasetError naming the file and line for anything unusable.
    """
    path = Path(config.path).expanduser()
    encoder = _encoder(config, tokenizer)
    if path.is_dir() and (path / SPLIT_FILES["train"]).is_file():
        train = _load_jsonl(path / SPLIT_FILES["train"], encoder)
        splits = {}
        for name in ("valid", "test"):
            file = path / SPLIT_FILES[name]
            splits[name] = _load_jsonl(file, encoder) if file.is_file() else None
        if splits["valid"] is not None:
            return DataSplits(_dataset(*train), _dataset(*splits["valid"]), _test(splits))
        return _split_valid(train[0], train[1], config, test=_test(splits))
    source, encoded = _load_source(path, encoder)
    return _split_valid(source, encoded, config)


def load_dataset(path, tokenizer, config: DataConfig | None = None) -> Dataset:
    """Load one .jsonl file, note or notes folder whole, with no validation split (e.g. a test
    set for evaluation). Options other than path come from `config` (defaults if None)."""
    config = config or DataConfig(path=path)
    return _dataset(*_load_source(Path(path).expanduser(), _encoder(config, tokenizer)))


def _encoder(config: DataConfig, tokenizer) -> Encoder:
    config.validate()  # the fields may have been changed since the config was built
    redactor = None
    if config.redact:
        from ..privacy.redact import Redactor

        redactor = Redactor()  # one for every split: the same value, the same placeholder
    return Encoder(
        tokenizer, config.max_length, config.loss_on, config.overlong, config.mask_prompt,
        redactor,
    )  # fmt: skip


def _test(splits: dict) -> Dataset | None:
    return _dataset(*splits["test"]) if splits["test"] is not None else None


def _dataset(source: Path, encoded: list[Encoded]) -> Dataset:
    examples = [x for item in encoded for x in item.examples]
    if not examples:
        raise DatasetError(
            f"{source}: no example is left with a token to train on once cut to max_length; "
            "raise max_length or shorten what comes before the assistant replies"
        )
    return Dataset(source, examples, DatasetStats.of(encoded))


def _load_source(path: Path, encoder: Encoder) -> tuple[Path, list[Encoded]]:
    if not path.exists():
        raise DatasetError(
            f"{path} does not exist. Give a .jsonl file, a folder with train.jsonl (and "
            "optionally valid.jsonl, test.jsonl), or a folder of .txt/.md notes."
        )
    if path.is_file():
        if path.suffix.lower() in NOTE_SUFFIXES:
            return path, _load_notes(path, [path], encoder)
        if path.suffix.lower() != ".jsonl":
            raise DatasetError(
                f"{path} is neither a .jsonl dataset nor a .txt/.md note; rename it if it is one"
            )
        return _load_jsonl(path, encoder)
    for name in ("valid", "test"):
        if (path / SPLIT_FILES[name]).is_file():
            raise DatasetError(
                f"{path} has {SPLIT_FILES[name]} but no train.jsonl; add train.jsonl beside it"
            )
    notes = sorted(
        p
        for p in path.rglob("*")
        if p.suffix.lower() in NOTE_SUFFIXES
        and p.is_file()
        # Skip hidden folders such as .git or .obsidian: tool data, not the person's notes.
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not notes:
        others = sorted(p.name for p in path.glob("*.jsonl"))
        hint = (
            f" It has {format_list(others)}: rename the training file to train.jsonl, or pass it."
            if others
            else ""
        )
        raise DatasetError(f"{path} has no train.jsonl and no .txt or .md notes.{hint}")
    return path, _load_notes(path, notes, encoder)


def _load_jsonl(path: Path, encoder: Encoder) -> tuple[Path, list[Encoded]]:
    records = read_jsonl(path, require_assistant=encoder.loss_on != "all")
    errors, encoded = LineErrors(path), []
    for record in records:
        try:
            encoded.append(encoder.record(record))
        except TurnNotFound as e:
            errors.add(
                record.line,
                f"the chat template does not show the {e}. Check that the model's chat template "
                "renders assistant messages, or train with loss_on='all'",
            )
        except TokenizerError as e:
            errors.add(record.line, f"{e}; fix the messages or the model's chat template")
    errors.raise_if_any()
    return path, encoded


def _load_notes(root: Path, files: list[Path], encoder: Encoder) -> list[Encoded]:
    errors, encoded = LineErrors(root), []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            errors.add(None, f"{file} is not UTF-8 text ({e.reason}); save it as UTF-8")
            continue
        if not text.strip():
            continue  # empty notes are skipped, not an error: note folders hold stubs
        item = encoder.note(text)
        # Each window is a record of its own for the validation split; the note's own figures
        # go on its first window, so that DatasetStats counts each note once.
        windows = [Encoded([x], len(x["input_ids"])) for x in item.examples] or [Encoded([], 0)]
        windows[0].length, windows[0].split, windows[0].dropped = (
            item.length,
            item.split,
            item.dropped,
        )
        encoded += windows
    errors.raise_if_any()
    if not encoded:
        raise DatasetError(f"{root}: every .txt/.md note in it is empty; write some notes first")
    return encoded


def _split_valid(
    source: Path, encoded: list[Encoded], config: DataConfig, test: Dataset | None = None
) -> DataSplits:
    """Hold out a seeded fraction of the records for validation, the rest for training.

    A record's windows stay together, so no chat is in both. At least one record is held
    out when valid_fraction > 0, and at least one is kept for training.
    """
    # Records left with no example (all dropped) stay on the train side, only for the counts.
    usable = [i for i, e in enumerate(encoded) if e.examples]
    n = len(usable)
    # Rounded down (never more than asked), less float noise: 10 * 0.3 is 3.0000000000000004.
    wanted = int(round(n * config.valid_fraction, 6))
    n_valid = min(n - 1, max(1, wanted)) if config.valid_fraction else 0
    if n_valid <= 0:
        return DataSplits(_dataset(source, encoded), None, test)
    # A private generator seeded by the config: the same split on every run and machine.
    order = np.random.default_rng(config.seed).permutation(n)[:n_valid]
    chosen = {usable[j] for j in order.tolist()}
    train = [e for i, e in enumerate(encoded) if i not in chosen]
    valid = [e for i, e in enumerate(encoded) if i in chosen]
    return DataSplits(_dataset(source, train), _dataset(source, valid), test)
