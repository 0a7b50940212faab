"""Preference pairs: a prompt, the reply a person kept and the one they rejected.

Read as TRL writes them, one JSON object per line:
  text          {"prompt": "...", "chosen": "...", "rejected": "..."}
  conversation  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  implicit      {"chosen": [messages], "rejected": [messages]}: two chats whose shared leading
                messages are the prompt and whose differing ends are the replies

A pair becomes one example: the chosen side's {"input_ids", "loss_mask"} and the rejected side's
{"rejected_input_ids", "rejected_loss_mask"}, each mask 1 on the reply's tokens only (what DPO
and ORPO score). Every problem of a file is reported at once, naming its line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import TokenizerError, format_list
from .chat import TurnNotFound, assistant_spans, spans_to_mask
from .config import DataConfig
from .errors import DatasetError, LineErrors
from .examples import DatasetStats, Encoded
from .loading import SPLIT_FILES, Dataset, DataSplits
from .records import _check_message

PAIR_EXAMPLE = (
    '{"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "There are many fruits..."} '
    'or {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", '
    '"content": "Hello!"}], "rejected": [{"role": "assistant", "content": "..."}]}'
)
SIDES = ("chosen", "rejected")
# The rejected side's tokens and mask, beside the chosen side's input_ids / loss_mask.
REJECTED_KEYS = ("rejected_input_ids", "rejected_loss_mask")


def _empty(value) -> bool:
    return (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def parse_pair(obj: dict) -> tuple[object, dict[str, object]]:
    """(prompt, {"chosen": reply, "rejected": reply}) of one record, or raise ValueError saying
    what is wrong. Text pairs give strings; chats give lists of messages."""
    missing = [k for k in SIDES if k not in obj]
    if missing:
        raise ValueError(
            f"has keys [{format_list(obj)}] but a preference pair needs "
            f"{' and '.join(repr(k) for k in SIDES)}; e.g. {PAIR_EXAMPLE}"
        )
    for side in SIDES:
        if _empty(obj[side]):
            raise ValueError(f'"{side}" is empty; write the {side} reply or remove the line')
    kinds = {type(obj[k]) for k in ("prompt", *SIDES) if k in obj}
    if kinds == {str}:
        if "prompt" not in obj:
            raise ValueError('text pairs need a "prompt" string beside "chosen" and "rejected"')
        return obj["prompt"], {side: obj[side] for side in SIDES}
    if kinds != {list}:
        raise ValueError(
            '"prompt", "chosen" and "rejected" must be all strings or all lists of messages'
        )
    for key in ("prompt", *SIDES):
        for number, message in enumerate(obj.get(key, []), start=1):
            for problem in _check_message(number, message):
                raise ValueError(f'"{key}" {problem}')
    if "prompt" in obj:
        if _empty(obj["prompt"]):
            raise ValueError('"prompt" is empty; write the messages before the replies')
        return obj["prompt"], {side: obj[side] for side in SIDES}
    # Implicit prompt: the leading messages both chats share.
    chosen, rejected = obj["chosen"], obj["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) and shared == len(rejected):
        raise ValueError('"chosen" and "rejected" are the same chat; there is nothing to prefer')
    if shared == 0:
        raise ValueError(
            '"chosen" and "rejected" do not share the prompt: their first messages differ. Both '
            'chats must start with the same messages (or give the prompt as "prompt")'
        )
    return chosen[:shared], {side: obj[side][shared:] for side in SIDES}


class PairEncoder:
    """Tokenises pairs with one tokenizer, max_length and overlong policy."""

    def __init__(self, tokenizer, max_length: int, overlong: str = "truncate"):
        self.tokenizer, self.max_length, self.overlong = tokenizer, max_length, overlong
        eos = tokenizer.eos_token_id
        self._eos = [] if eos is None else [eos]

    def side(self, prompt, reply) -> tuple[list[int], list[int]]:
        """(ids, mask) of prompt + reply, mask 1 on the reply's tokens."""
        if isinstance(prompt, str):
            # Encoded apart, as at inference: no BPE merge joins prompt and reply.
            prompt_ids = self.tokenizer.encode(prompt)
            reply_ids = self.tokenizer.encode(reply, add_special_tokens=False) + self._eos
            return prompt_ids + reply_ids, [0] * len(prompt_ids) + [1] * len(reply_ids)
        messages = list(prompt) + list(reply)
        turns = [i for i in range(len(prompt), len(messages)) if messages[i]["role"] == "assistant"]
        if not turns:
            raise TurnNotFound("reply: it has no assistant message")
        text, spans = assistant_spans(self.tokenizer, messages, turns)
        encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), spans_to_mask(encoding.offsets, spans)

    def pair(self, obj: dict) -> tuple[dict, bool]:
        """(example, truncated) of one record. Raises ValueError, TurnNotFound or
        TokenizerError."""
        prompt, replies = parse_pair(obj)
        example, truncated = {}, False
        for side, (ids_key, mask_key) in zip(
            SIDES, (("input_ids", "loss_mask"), REJECTED_KEYS), strict=True
        ):
            ids, mask = self.side(prompt, replies[side])
            if len(ids) > self.max_length:
                if self.overlong != "truncate":
                    raise ValueError(
                        f'"{side}" is {len(ids)} tokens, longer than max_length '
                        f"{self.max_length}; raise max_length, shorten the pair, or pass "
                        "--overlong truncate (a pair cannot be split into windows)"
                    )
                ids, mask, truncated = ids[: self.max_length], mask[: self.max_length], True
            mask = [0] + mask[1:]  # nothing predicts the first token
            if sum(mask) == 0:
                raise ValueError(
                    f'the "{side}" reply starts after max_length {self.max_length} tokens, so '
                    "nothing of it is scored; raise max_length or shorten the prompt"
                )
            example[ids_key], example[mask_key] = ids, mask
        return example, truncated


def read_pairs(path: Path, encoder: PairEncoder) -> list[Encoded]:
    """Every pair of a JSONL file, encoded; one DatasetError lists every bad line."""
    errors, encoded = LineErrors(path), []
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.add(line_no, f"is not valid JSON: {e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            errors.add(line_no, f"expected a JSON object, got a JSON {type(obj).__name__}")
            continue
        try:
            example, truncated = encoder.pair(obj)
        except (ValueError, TurnNotFound, TokenizerError) as e:
            errors.add(line_no, str(e))
            continue
        length = max(len(example["input_ids"]), len(example["rejected_input_ids"]))
        encoded.append(Encoded([example], length, truncated=truncated))
    errors.raise_if_any()
    if not encoded:
        raise DatasetError(f"{path} holds no pairs. Write one JSON object per line: {PAIR_EXAMPLE}")
    return encoded


def load_preference_datasets(config: DataConfig, tokenizer) -> DataSplits:
    """Pairs for training and validation: a .jsonl file (validation split off it by
    config.valid_fraction and seed) or a folder with train.jsonl (and valid.jsonl)."""
    config.validate()
    path = Path(config.path).expanduser()
    encoder = PairEncoder(tokenizer, config.max_length, config.overlong)
    if path.is_dir():
        train_file = path / SPLIT_FILES["train"]
        if not train_file.is_file():
            raise DatasetError(f"{path} has no train.jsonl of preference pairs")
        train = read_pairs(train_file, encoder)
        valid_file = path / SPLIT_FILES["valid"]
        if valid_file.is_file():
            return DataSplits(_dataset(train_file, train), _dataset(valid_file, read_pairs(valid_file, encoder)))  # fmt: skip
        path, pairs = train_file, train
    elif path.is_file():
        pairs = read_pairs(path, encoder)
    else:
        raise DatasetError(f"{path} does not exist; give a .jsonl file of preference pairs")
    n_valid = min(len(pairs) - 1, max(1, int(round(len(pairs) * config.valid_fraction, 6))))
    if not config.valid_fraction or n_valid <= 0:
        return DataSplits(_dataset(path, pairs))
    # Seeded as SFT's split, so the same file and seed hold out the same records.
    held = set(np.random.default_rng(config.seed).permutation(len(pairs))[:n_valid].tolist())
    train = [p for i, p in enumerate(pairs) if i not in held]
    valid = [p for i, p in enumerate(pairs) if i in held]
    return DataSplits(_dataset(path, train), _dataset(path, valid))


def _dataset(source: Path, encoded: list[Encoded]) -> Dataset:
    return Dataset(source, [x for e in encoded for x in e.examples], DatasetStats.of(encoded))
