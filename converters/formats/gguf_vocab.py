"""A tokenizer as llama.cpp's `tokenizer.ggml.*` metadata: the inverse of
ondevice_lora/loading/gguf/tokenizer.py, which rebuilds a tokenizer from it.

Two kinds, as llama.cpp names them:
  - "gpt2": byte-level BPE (GPT-2, SmolLM, Qwen, Llama 3): tokens, merges and the pre-tokenizer's
    name (`tokenizer.ggml.pre`), recognised by comparing the tokenizer's pre-tokenizer with the
    ones the reader rebuilds;
  - "llama": SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma): tokens and
    scores (llama.cpp merges the pair whose result scores highest, so a token made by merge
    number k scores -k), no merges (a SentencePiece piece may hold a space, which the merges'
    "left right" strings cannot).
Token types are llama.cpp's (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)
and are written as an INT32 array, the type llama.cpp requires.
"""

from __future__ import annotations

import json
import re
import warnings

import tokenizers

from ondevice_lora.loading.gguf.tokenizer import PRE_TOKENIZERS

from .common import AdapterFormatError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _pre_tokenizer_json(pre_tokenizer) -> dict | None:
    probe = tokenizers.Tokenizer(tokenizers.models.BPE())
    probe.pre_tokenizer = pre_tokenizer
    return json.loads(probe.to_str())["pre_tokenizer"]


def _without_offsets(value):
    # trim_offsets changes offsets only, never ids: ignore it when comparing pre-tokenizers.
    if isinstance(value, dict):
        return {k: _without_offsets(v) for k, v in value.items() if k != "trim_offsets"}
    if isinstance(value, list):
        return [_without_offsets(v) for v in value]
    return value


def pre_tokenizer_name(pre_tokenizer: dict | None, source) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer (tokenizer.json's "pre_tokenizer")."""
    for name, make in PRE_TOKENIZERS.items():
        if _without_offsets(_pre_tokenizer_json(make())) == _without_offsets(pre_tokenizer):
            return name
    warnings.warn(
        f"{source}: its pre-tokenizer is not one llama.cpp names here; the GGUF says 'gpt-2', "
        "which splits most English text the same way but may split digits or contractions "
        "differently.",
        stacklevel=3,
    )
    return "gpt-2"


def _merge_strings(merges) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _adds_space_prefix(data: dict) -> bool:
    """Whether SentencePiece-style text gets a leading ▁ (Metaspace or a Prepend normaliser)."""
    text = json.dumps([data.get("pre_tokenizer"), data.get("normalizer")])
    return (
        '"prepend_scheme": "first"' in text
        or '"prepend_scheme": "always"' in text
        or ('"type": "Prepend"' in text)
    )


def add_tokenizer(writer, tokenizer, vocab_size: int, source) -> None:
    """Write `tokenizer` (our Tokenizer) to a gguf.GGUFWriter as llama.cpp's converter does.

    vocab_size: the embedding's rows; ids the tokenizer does not use are written as unused
    "[PAD<id>]" tokens, as llama.cpp's converter pads them.
    """
    data = json.loads(tokenizer.backend.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise AdapterFormatError(
            f"{source}: a {model.get('type')} tokenizer has no GGUF form here; only BPE "
            "tokenizers (byte-level, or SentencePiece-style with byte fallback) are written."
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise AdapterFormatError(
            f"{source}: the tokenizer has ids up to {max(vocab.values())} but the embedding "
            f"only {vocab_size} rows."
        )
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    sentencepiece = bool(model.get("byte_fallback"))
    unk = tokenizer.special.get("unk_token")

    def token_type(i: int, text: str) -> int:
        if i not in by_id:
            return UNUSED
        if i in added:
            return CONTROL if added[i]["special"] else USER_DEFINED
        if sentencepiece and text == unk:
            return UNKNOWN
        if sentencepiece and _BYTE_TOKEN.match(text):
            return BYTE
        return NORMAL

    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([token_type(i, t) for i, t in enumerate(tokens)])
    if sentencepiece:
        # Scores only, as llama.cpp's converter writes them: a merged token scores minus the
        # rank of the first merge that makes it; tokens no merge makes score below them all.
        writer.add_tokenizer_pre("default")
        pairs = model.get("merges") or []
        rank = {}
        for k, pair in enumerate(pairs):
            left, right = pair.split(" ", 1) if isinstance(pair, str) else pair
            rank.setdefault(left + right, k)
        writer.add_token_scores([-float(rank.get(t, len(pairs))) for t in tokens])
        writer.add_add_space_prefix(_adds_space_prefix(data))
    else:
        writer.add_tokenizer_pre(pre_tokenizer_name(data.get("pre_tokenizer"), source))
        writer.add_token_merges(_merge_strings(model.get("merges") or []))

    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("unk_token", writer.add_unk_token_id),
        ("pad_token", writer.add_pad_token_id),
    ):
        token_id = tokenizer.token_to_id(tokenizer.special.get(key))
        if token_id is not None:
            add(token_id)
    eos = tokenizer.token_to_id(tokenizer.special.get("eos_token"))
    others = [i for i in tokenizer.eos_token_ids if i != eos]
    if others:  # a chat model's end-of-turn token (<|im_end|>, <|eot_id|>, <end_of_turn>)
        writer.add_eot_token_id(others[0])
    writer.add_add_bos_token(tokenizer.add_bos_token)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
