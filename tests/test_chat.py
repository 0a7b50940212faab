"""`ondevice-lora chat`, driven through its standard input.

The reference for every turn: a from-scratch `generate` of the whole conversation so far, on a
model whose adapters are set the same way; the KV cache must change the cost, not the answer.
"""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from ondevice_lora import SamplingConfig, generate, load
from ondevice_lora.adapters.files import AdapterError, LoraConfig
from ondevice_lora.adapters.mix import load_adapters, parse_adapter_specs, set_active
from ondevice_lora.cli import main
from ondevice_lora.errors import OndeviceLoraError
from ondevice_lora.generation.chat_session import ChatSession
from ondevice_lora.generation.generate import encode_prompt
from tests.adapter_fixtures import write_adapter
from tests.hf_fixtures import write_hf_model

MAX_TOKENS = 10
PREFILL = re.compile(r"prefill: (\d+) new tokens \((\d+) of (\d+) reused from the KV cache\)")

# (line typed, adapters active afterwards for the reference: a name, a mix, None, or "reset")
SCRIPT = [
    ("hello there", "a"),
    ("tell me more", "a"),
    ("/adapter b", "b"),
    ("and now?", "b"),
    ("/mix a=0.5,b=0.5", {"a": 0.5, "b": 0.5}),
    ("mixed", {"a": 0.5, "b": 0.5}),
    ("/base", None),
    ("plain", None),
    ("/reset", "reset"),
    ("hello there", None),
]


def test_chat_reuses_the_cache_and_answers_as_from_scratch(tmp_path):
    write_hf_model(tmp_path / "base", "llama")
    configs = {
        "a": LoraConfig(rank=4, alpha=8, target_modules="all-linear"),
        "b": LoraConfig(rank=2, alpha=4, target_modules=["q_proj", "v_proj"]),
    }
    folders = {
        n: write_adapter(tmp_path / "base", tmp_path / n, c, lora_b_std=0.5, seed=i)
        for i, (n, c) in enumerate(configs.items())
    }
    lines = [line for line, _ in SCRIPT] + ["/stats", "/bogus", "/mix a", "/help", "/quit"]
    args = ["chat", "--model", str(tmp_path / "base"), "--greedy", "--max-tokens", str(MAX_TOKENS)]
    args += ["--adapter", f"a={folders['a']}", "--adapter", f"b={folders['b']}"]
    result = CliRunner().invoke(main, args, input="\n".join(lines) + "\nnever read\n")
    assert result.exit_code == 0, result.output

    # The reference: each turn generated from scratch with the whole conversation.
    model, tokenizer = load(tmp_path / "base")
    load_adapters(model, folders, tokenizer)
    config = SamplingConfig(temperature=0, max_tokens=MAX_TOKENS)
    messages, replies, lengths = [], [], []
    for line, active in SCRIPT:
        if active == "reset":
            messages = []
            continue
        set_active(model, active)
        if line.startswith("/"):
            continue
        messages.append({"role": "user", "content": line})
        lengths.append(len(encode_prompt(tokenizer, messages)))
        replies.append(generate(model, tokenizer, messages, config))
        messages.append({"role": "assistant", "content": replies[-1]})
    # stdout holds the replies alone, each ended by a newline; "never read" came after /quit.
    assert result.stdout == "".join(reply + "\n" for reply in replies)
    assert len(set(replies)) >= 4  # the adapters change the answers

    turns = [tuple(map(int, m)) for m in PREFILL.findall(result.stderr)]
    assert len(turns) == len(replies) + 1  # and /stats repeats the last one
    assert turns[-1] == turns[-2]
    for (new, reused, total), length in zip(turns, lengths):
        assert total == length and new + reused == total
    # Turn 2 reads only what follows the cached part of turn 1; after a switch of adapters
    # (turns 3, 4, 5) and after /reset (turn 6) the whole conversation is read again.
    # (the turn-1 prompt is a prefix of the turn-2 rendering: at least all of it is reused).
    assert turns[1][1] >= lengths[0] and turns[1][0] < turns[1][2]
    assert [t[1] for t in (turns[0], *turns[2:6])] == [0] * 5
    assert "KV cache dropped" in result.stderr
    assert "unknown command /bogus" in result.stderr and "cannot read 'a'" in result.stderr
    assert "/adapter NAME" in result.stderr  # /help

    tokenizer.chat_template = None
    with pytest.raises(OndeviceLoraError, match="needs a tokenizer with a chat template"):
        ChatSession(model, tokenizer, config)


def test_adapter_specs_name_folders():
    assert parse_adapter_specs(["chat=runs/x", "runs/sql", "runs/a=b"]) == {
        "chat": "runs/x",
        "sql": "runs/sql",
        "a=b": "runs/a=b",
    }
    with pytest.raises(AdapterError, match="'x' is given twice"):
        parse_adapter_specs(["x=1", "x=2"])
