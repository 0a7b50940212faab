"""Rebuild a GGUF file's tokenizer from its metadata as a `tokenizers` tokenizer.

A GGUF has no tokenizer.json: llama.cpp stores the vocabulary, merges (or SentencePiece scores),
token types and special token ids under `tokenizer.ggml.*`. Two tokenizer models are rebuilt:
"gpt2" (byte-level BPE: GPT-2, SmolLM, Qwen, Llama 3) and "llama" (SentencePiece BPE with byte
fallback: Llama 2, Mistral, Gemma-style vocabularies), the way transformers' GGUF loader builds
them, so token ids agree with it.
"""

from __future__ import annotations

import warnings

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors

from ...errors import TokenizerError
from ..tokenizer import Tokenizer

SUPPORTED_TOKENIZERS = ("gpt2", "llama")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
SPIECE_SPACE = "\u2581"  # SentencePiece writes a space as ▁

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str):
    return lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# llama.cpp's names (`tokenizer.ggml.pre`) for the byte-level BPE pre-tokenizers we rebuild.
PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # StarCoder's tokenizer, which SmolLM uses, gives every digit its own token.
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), PRE_TOKENIZERS["gpt-2"]()]
    ),
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),  # Llama 3.x
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
}


def gguf_tokenizer(metadata: dict, source) -> Tokenizer:
    """The tokenizer described by GGUF metadata.

    For byte-level BPE the pre-tokenizer follows `tokenizer.ggml.pre`: the ones in
    PRE_TOKENIZERS are rebuilt exactly; any other value falls back to plain GPT-2 ByteLevel
    splitting (with a warning), which matches most English text but may split digits, long
    numbers or contractions differently from the original tokenizer.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise TokenizerError(
            f"{source}: tokenizer model {kind!r} is not supported for GGUF files. Supported: "
            f"{', '.join(SUPPORTED_TOKENIZERS)} (byte-level BPE and SentencePiece BPE). Load "
            "the Hugging Face folder, which has tokenizer.json, instead."
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}

    def token(key):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    special = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
    }
    if kind == "gpt2":
        backend = _byte_level(metadata, vocab, source)
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token"))
    else:
        backend = _sentencepiece(metadata, vocab, special["unk_token"])
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", True)
    # Control tokens are special; user-defined ones match as plain added text. Both keep their
    # ids because each is already in the vocabulary.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    )
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token"))
    backend.post_processor = _post_processor(kind, special, vocab, add_bos, add_eos)
    eos_ids = [vocab[special["eos_token"]]] if special["eos_token"] else []
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot not in eos_ids:
        eos_ids.append(eot)
    config = {"clean_up_tokenization_spaces": False}
    return Tokenizer(backend, special, metadata.get("tokenizer.chat_template"), eos_ids, config)


def _byte_level(metadata: dict, vocab: dict, source) -> tokenizers.Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, fuse_unk=False))
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        warnings.warn(
            f"{source}: pre-tokenizer {pre!r} is not known here; splitting text as GPT-2 does, "
            "which can give different token ids than the original tokenizer for some text.",
            stacklevel=3,
        )
    backend.pre_tokenizer = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["gpt-2"])()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(metadata: dict, vocab: dict, unk: str | None) -> tokenizers.Tokenizer:
    """SentencePiece BPE with byte fallback (<0x41> tokens for bytes outside the vocabulary).

    The file holds scores, not merges: a merge is every split of a vocabulary entry into two
    entries, ranked by the merged entry's score, as SentencePiece's BPE ranks them.
    """
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    else:
        merges = merges_from_scores(list(vocab), metadata.get("tokenizer.ggml.scores"))
    model = tokenizers.models.BPE(
        vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None
    )
    backend = tokenizers.Tokenizer(model)
    prefix_space = metadata.get("tokenizer.ggml.add_space_prefix", True)
    # SentencePiece turns spaces into ▁ and, by default, puts one before the text.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_SPACE, prepend_scheme="first" if prefix_space else "never", split=False
    )
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def merges_from_scores(tokens: list[str], scores: list[float] | None) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary, best first.

    Candidates are every (left, right) split of an entry whose halves are both entries. They rank
    by the merged entry's score (its id when there are no scores), then by the halves' lengths;
    equal ranks keep vocabulary order, and the splits of one entry go by the halves' ids.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    score = dict(zip(tokens, scores)) if scores is not None else None
    candidates = []
    for merged in tokens:
        splits = [(merged[:k], merged[k:]) for k in range(1, len(merged)) if merged[:k] in ids]
        splits = [(left, right) for left, right in splits if right in ids]
        splits.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        rank = score[merged] if score is not None else ids[merged]
        candidates.extend((rank, left, right) for left, right in splits)
    # Python's sort is stable, also with reverse=True: ties keep their order.
    candidates.sort(key=lambda c: (c[0], len(c[1]), len(c[2])), reverse=score is not None)
    return [(left, right) for _, left, right in candidates]


def _post_processor(kind: str, special: dict, vocab: dict, add_bos: bool, add_eos: bool):
    """BOS/EOS around encoded text as the file's add_bos_token / add_eos_token ask."""
    wanted = {
        k: special[f"{k}_token"]
        for k, on in (("bos", add_bos), ("eos", add_eos))
        if on and special[f"{k}_token"]
    }
    if not wanted:
        if kind == "gpt2":
            # Byte-level post-processing only fixes offsets; the ids are the pre-tokenizer's.
            return processors.ByteLevel(trim_offsets=False)
        return None

    def sequence(text: str, type_id: int) -> str:
        parts = [wanted.get("bos"), text, wanted.get("eos")]
        return " ".join(f"{p}:{type_id}" for p in parts if p)

    return processors.TemplateProcessing(
        single=sequence("$A", 0),
        pair=f"{sequence('$A', 0)} {sequence('$B', 1)}",
        special_tokens=[(t, vocab[t]) for t in dict.fromkeys(wanted.values())],
    )
