"""The tokenizer: Hugging Face's Rust `tokenizers` plus the files around tokenizer.json.

A model folder describes its tokenizer in several files: tokenizer.json (vocabulary, merges,
pre- and post-processing), tokenizer_config.json (special tokens, chat template),
generation_config.json and config.json (which ids end a turn), and in newer layouts a separate
chat_template.jinja. `Tokenizer.from_folder` reads them all and encodes, decodes and renders chat
templates the way transformers' AutoTokenizer does, without depending on transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, processors

from ..atomic import write_atomically, write_text_atomically
from ..errors import TokenizerError
from .chat_template import SPECIAL_TOKEN_KEYS, render_chat_template

# Keys of tokenizer_config.json that save() writes itself; every other key is carried over.
_REWRITTEN_KEYS = {"tokenizer_class", "auto_map", "chat_template", "added_tokens_decoder"}
_REWRITTEN_KEYS.update(SPECIAL_TOKEN_KEYS)


def _read_json(path: Path) -> dict:
    """Read a JSON object, naming the file and the position of a syntax error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Fix the file or download it again from the model's repository."
        ) from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(value) -> str | None:
    """A special token as a string: configs write either "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value) -> list[int]:
    """eos_token_id is written as an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if v is not None]


def _read_chat_template(folder: Path, config: dict) -> str | None:
    """The chat template, from the separate files newer repositories use or from the config.

    A separate file wins over tokenizer_config.json, as in transformers.
    """
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = folder / "chat_template.json"
    template = _read_json(json_file).get("chat_template") if json_file.is_file() else None
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates ([{"name": ..., "template": ...}]): use "default", else the first.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception
        _read_json(path)  # a JSON syntax error gets a message with line and column
        raise TokenizerError(
            f"{path} could not be read by the tokenizers library ({e}). It may come from a newer "
            "tokenizers version: upgrade with `pip install -U tokenizers`."
        ) from e


class Tokenizer:
    """Text to token ids and back, plus the model's chat template.

    backend: a `tokenizers.Tokenizer`; special: tokenizer_config-style {"bos_token": "<s>", ...}
    (strings or None); chat_template: Jinja source or None; eos_token_ids: every id that ends
    generation. Build one from a model folder with `Tokenizer.from_folder`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special: dict,
        chat_template: str | None,
        eos_token_ids: list[int],
        config: dict | None = None,
    ):
        self.backend = backend
        self.special = {k: _token_text(v) for k, v in special.items() if k in SPECIAL_TOKEN_KEYS}
        self.chat_template = chat_template
        self.eos_token_ids = list(eos_token_ids)
        # The rest of tokenizer_config.json (model_max_length, padding_side, ...), kept for save().
        self.config = {k: v for k, v in (config or {}).items() if k not in _REWRITTEN_KEYS}

    @classmethod
    def from_folder(cls, folder) -> Tokenizer:
        """Load the tokenizer of a Hugging Face style model folder.

        Raises TokenizerError if the folder has no tokenizer.json or a file is malformed.
        """
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            hint = (
                " It has tokenizer.model (sentencepiece): convert it once with transformers, "
                "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)."
                if (folder / "tokenizer.model").is_file()
                else " Copy tokenizer.json (and tokenizer_config.json) from the model's repository."
            )
            raise TokenizerError(f"no tokenizer.json in {folder}.{hint}")
        backend = _load_backend(path)

        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        special_map_path = folder / "special_tokens_map.json"
        special_map = _read_json(special_map_path) if special_map_path.is_file() else {}
        special = {}
        for key in SPECIAL_TOKEN_KEYS:
            value = _token_text(config[key]) if key in config else _token_text(special_map.get(key))
            if value is not None:
                special[key] = value

        _add_missing_tokens(backend, config, special)
        bos = special.get("bos_token")
        if config.get("add_bos_token") is True and backend.post_processor is None and bos:
            # The config asks for BOS but tokenizer.json has no post-processor to add it: add one,
            # as transformers 4's Llama and Gemma tokenizers and llama.cpp do.
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, backend.token_to_id(bos))],
            )

        eos_ids = []
        if special.get("eos_token") is not None:
            eos_ids += _as_id_list(backend.token_to_id(special["eos_token"]))
        for name in ("generation_config.json", "config.json"):
            if (folder / name).is_file():
                eos_ids += _as_id_list(_read_json(folder / name).get("eos_token_id"))
        eos_ids = list(dict.fromkeys(eos_ids))  # union, first occurrence first

        return cls(backend, special, _read_chat_template(folder, config), eos_ids, config)

    # Ids of the named special tokens.
    def token_to_id(self, token: str | None) -> int | None:
        """The id of a token string, or None if it is not in the vocabulary."""
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        """The first of eos_token_ids (the config's eos_token when it has one)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.special.get("pad_token"))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def add_bos_token(self) -> bool:
        """Whether encode(text) starts with BOS, as the post-processor decides."""
        bos_id = self.bos_token_id
        return bos_id is not None and self.encode("")[:1] == [bos_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, the post-processor may add BOS/EOS."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids (an int or a list of ints), as transformers' decode gives it."""
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # transformers 5 tidies spaces before punctuation only when asked and never for BPE,
        # where it would delete real spaces.
        if self.config.get("clean_up_tokenization_spaces") and not isinstance(
            self.backend.model, tokenizers.models.BPE
        ):
            for before, after in _CLEANUPS:
                text = text.replace(before, after)
        return text

    def apply_chat_template(
        self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs
    ) -> str | list[int]:
        """Render a conversation with the model's chat template; token ids if tokenize=True.

        Extra keywords (tools, documents, enable_thinking, ...) reach the template. The ids do
        not get the post-processor's special tokens: the template writes those itself.
        """
        if self.chat_template is None:
            raise TokenizerError(
                "this tokenizer has no chat template: add a 'chat_template' to "
                "tokenizer_config.json (or a chat_template.jinja file), or pass plain text prompts."
            )
        variables = {k: v for k, v in self.special.items() if v is not None}
        variables.update(kwargs)  # the caller's values win over the special tokens
        text = render_chat_template(
            self.chat_template, messages, add_generation_prompt, **variables
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh StreamingDetokenizer over this tokenizer."""
        return StreamingDetokenizer(self, skip_special_tokens)

    def save(self, folder) -> None:
        """Write tokenizer.json and tokenizer_config.json, loadable by transformers and by us."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / "tokenizer.json", lambda tmp: self.backend.save(str(tmp)))
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        # PreTrainedTokenizerFast reads everything from tokenizer.json, so any transformers
        # version loads it, whatever class the original folder named.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added}
        config.update(self.special)
        config.update(self.config)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        write_text_atomically(folder / "tokenizer_config.json", text)


# transformers' clean_up_tokenization replacements, for WordPiece-style tokenizers.
_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")]
_CLEANUPS += [(" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _add_missing_tokens(backend: tokenizers.Tokenizer, config: dict, special: dict) -> None:
    """Add tokens the config declares but tokenizer.json lacks, as transformers does on load."""
    declared = config.get("added_tokens_decoder") or {}
    for _, entry in sorted(declared.items(), key=lambda kv: int(kv[0])):
        content = _token_text(entry)
        if content and backend.token_to_id(content) is None:
            options = ("single_word", "lstrip", "rstrip", "normalized", "special")
            kwargs = {k: entry[k] for k in options if k in entry}
            backend.add_tokens([AddedToken(content, **kwargs)])
    for value in special.values():
        if backend.token_to_id(value) is None:
            backend.add_special_tokens([AddedToken(value, special=True, normalized=False)])


class StreamingDetokenizer:
    """Turns generated ids into text piece by piece, for printing while the model generates.

    add_token(id) returns only the newly completed text. A token can end in the middle of a
    multi-byte UTF-8 character (byte-level BPE splits "é" into two byte tokens); its text then
    ends in U+FFFD and is held back until the character is complete. The concatenation of every
    add_token() result and finish() equals tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything returned so far
        # Decoding restarts at prefix_offset, one token before the unread ones, so that decoders
        # which strip a leading space (sentencepiece) see the same context as a full decode.
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, start: int) -> str:
        return self.tokenizer.decode(self.ids[start:], skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is partial)."""
        self.ids.append(int(token_id))
        prefix = self._decode_range(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += new
        return new

    def finish(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode_range(self._prefix_offset, self._read_offset)
        rest = self._decode(self._prefix_offset)[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += rest
        return rest

    def _decode_range(self, start: int, stop: int) -> str:
        ids = self.ids[start:stop]
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
