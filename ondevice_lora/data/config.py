"""DataConfig: where the data is and how it becomes training examples, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError

LOSS_ON = ("assistant", "last_assistant", "all")
OVERLONG = ("truncate", "split")


@dataclass
class DataConfig:
    """Options for turning a dataset into tokenised examples with loss masks.

    path: a .jsonl file (chat, completions or text records); a folder with train.jsonl and
        optionally valid.jsonl and test.jsonl; or a folder of personal notes (.txt, .md).
    max_length: the most tokens in one example.
    loss_on: "assistant" trains every assistant turn of a chat, "last_assistant" only the last,
        "all" every token (system and user turns too).
    overlong: examples longer than max_length are cut ("truncate") or cut into several
        examples of at most max_length tokens ("split"). Notes are always split into windows.
    valid_fraction: share of the records held out for validation when no valid.jsonl is given
        (0 for none); which ones is decided by `seed`, so it is the same on every run.
    mask_prompt: for completions records, train only the completion (not the prompt).
    redact: replace personal data (privacy.pii) by placeholders as records are read.

    Every invalid value is reported at once, in one DatasetError, when the config is built.
    """

    path: str | Path
    max_length: int = 2048
    loss_on: str = "assistant"
    overlong: str = "truncate"
    valid_fraction: float = 0.1
    seed: int = 0
    mask_prompt: bool = True
    redact: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise one DatasetError listing every invalid option."""
        problems = []
        if not isinstance(self.path, (str, Path)) or not str(self.path):
            problems.append(f"path must be a file or folder path, got {self.path!r}")
        if not _is_int(self.max_length) or self.max_length < 2:
            problems.append(f"max_length must be an integer of at least 2, got {self.max_length!r}")
        if not isinstance(self.loss_on, str) or self.loss_on not in LOSS_ON:
            problems.append(f"loss_on must be one of {', '.join(LOSS_ON)}; got {self.loss_on!r}")
        if not isinstance(self.overlong, str) or self.overlong not in OVERLONG:
            problems.append(f"overlong must be one of {', '.join(OVERLONG)}; got {self.overlong!r}")
        fraction = self.valid_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            problems.append(f"valid_fraction must be a number, got {fraction!r}")
        elif not 0 <= fraction < 1:
            problems.append(f"valid_fraction must be at least 0 and below 1, got {fraction}")
        if not _is_int(self.seed):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.mask_prompt, bool):
            problems.append(f"mask_prompt must be true or false, got {self.mask_prompt!r}")
        if problems:
            raise DatasetError("invalid data options:\n  - " + "\n  - ".join(problems))


def _is_int(value) -> bool:
    # bool is an int subclass, but `max_length: true` in a YAML file is a mistake.
    return isinstance(value, int) and not isinstance(value, bool)
