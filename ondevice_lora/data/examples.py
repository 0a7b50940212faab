"""Records and notes become training examples: {"input_ids": [...], "loss_mask": [...]}.

loss_mask[t] = 1 means token t is a prediction target (predicted from the tokens before it).
Position 0 never carries loss: nothing precedes it. Examples longer than max_length are
truncated or split into windows, and DatasetStats counts what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .chat import encode_chat
from .records import Record


@dataclass
class Encoded:
    """The examples one record (or one note) became, and what fitting it to max_length did."""

    examples: list[dict]
    length: int  # tokens before truncation or splitting
    truncated: bool = False
    split: bool = False
    dropped: int = 0  # windows left out because no token in them is trained


@dataclass
class DatasetStats:
    """What loading a dataset produced.

    examples: examples after truncation and splitting; tokens: their total length;
    trained_tokens: tokens that carry loss; truncated / split: records cut to max_length or
    into several windows; longest: the longest record in tokens before any cut (a max_length
    at least this keeps every record whole); dropped: examples left out because no token in
    them carries loss (e.g. a chat whose assistant reply lies beyond max_length).
    """

    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    split: int = 0
    longest: int = 0
    dropped: int = 0

    @classmethod
    def of(cls, encoded: list[Encoded]) -> DatasetStats:
        stats = cls()
        for item in encoded:
            stats.examples += len(item.examples)
            stats.tokens += sum(len(x["input_ids"]) for x in item.examples)
            stats.trained_tokens += sum(sum(x["loss_mask"]) for x in item.examples)
            stats.truncated += item.truncated
            stats.split += item.split
            stats.longest = max(stats.longest, item.length)
            stats.dropped += item.dropped
        return stats

    def summary(self) -> str:
        """One line for the terminal."""
        text = (
            f"{self.examples} examples, {self.tokens} tokens ({self.trained_tokens} trained), "
            f"longest {self.longest}"
        )
        for name in ("truncated", "split", "dropped"):
            if getattr(self, name):
                text += f", {getattr(self, name)} {name}"
        return text


@dataclass
class Encoder:
    """Turns records into examples with one tokenizer and one set of options."""

    tokenizer: object
    max_length: int
    loss_on: str = "assistant"
    overlong: str = "truncate"
    mask_prompt: bool = True
    redactor: object = None  # privacy.redact.Redactor: personal data out before encoding
    _eos: list = field(init=False)

    def __post_init__(self):
        eos = self.tokenizer.eos_token_id
        self._eos = [] if eos is None else [eos]

    def record(self, record: Record) -> Encoded:
        """Encode one JSONL record. Raises TurnNotFound or TokenizerError for a chat the
        template cannot render or in which an assistant turn is not found."""
        data = record.data if self.redactor is None else self.redactor.obj(record.data)
        if record.kind == "chat":
            ids, mask = encode_chat(
                self.tokenizer, data["messages"], self.loss_on, data.get("tools")
            )
        elif record.kind == "completions":
            ids, mask = self._completion(data["prompt"], data["completion"])
        else:
            ids = self._document(data["text"])
            mask = [1] * len(ids)
        return self.fit(ids, mask, self.overlong)

    def note(self, text: str) -> Encoded:
        """A note: the whole text (with EOS, marking where it ends) in max_length windows."""
        if self.redactor is not None:
            text = self.redactor.text(text)
        ids = self._document(text)
        return self.fit(ids, [1] * len(ids), "split")

    def _document(self, text: str) -> list[int]:
        # EOS after a document teaches where documents end, as in pre-training.
        ids = self.tokenizer.encode(text)
        return ids + self._eos if ids[-1:] != self._eos else ids

    def _completion(self, prompt: str, completion: str) -> tuple[list, list]:
        # Encoded apart, as at inference: the prompt is encoded alone, then the model writes
        # the completion, so no BPE merge may join the two.
        prompt_ids = self.tokenizer.encode(prompt)  # with BOS where the tokenizer adds one
        completion_ids = self.tokenizer.encode(completion, add_special_tokens=False) + self._eos
        train_prompt = not self.mask_prompt or self.loss_on == "all"
        mask = [int(train_prompt)] * len(prompt_ids) + [1] * len(completion_ids)
        return prompt_ids + completion_ids, mask

    def fit(self, ids: list[int], mask: list[int], overlong: str) -> Encoded:
        """Cut to max_length ("truncate") or into max_length windows ("split")."""
        n, limit = len(ids), self.max_length
        starts = list(range(0, n, limit)) if overlong == "split" else [0]
        encoded = Encoded([], n, truncated=n > limit and overlong == "truncate")
        encoded.split = len(starts) > 1
        for start in starts:
            window_ids, window_mask = ids[start : start + limit], mask[start : start + limit]
            window_mask = [0] + window_mask[1:]  # the first token has no context to predict it
            if sum(window_mask) == 0:
                encoded.dropped += 1
                continue
            encoded.examples.append({"input_ids": window_ids, "loss_mask": window_mask})
        return encoded
