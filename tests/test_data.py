"""Data: loss masks token by token, formats, notes, length limits, splits, batches, bad input.

Uses the real tiny BPE tokenizer (ChatML and Llama-3 templates). Expected masks are built here
independently of ondevice_lora.data: by finding each assistant reply's own token ids, and the
end-of-turn token after them, in the encoded conversation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ondevice_lora.data import (
    DataConfig,
    DatasetError,
    encode_chat,
    iterate_batches,
    load_dataset,
    load_datasets,
)
from ondevice_lora.errors import OndeviceLoraError
from ondevice_lora.loading.tokenizer import Tokenizer
from tests.tiny_tokenizer import write_tiny_tokenizer

END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}

SYSTEM = "You answer in one short line."
USERS = ["What is the capital of France?", "Name some fruit.", "Any advice on training?"]
REPLIES = [
    "The capital of France is Paris.",
    "Apples, oranges and bananas are fruit.",
    "Keep the learning rate small and watch the validation loss.",
]
CHAT = [{"role": "system", "content": SYSTEM}]
for _user, _reply in zip(USERS, REPLIES):
    CHAT += [{"role": "user", "content": _user}, {"role": "assistant", "content": _reply}]


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    folders = {}
    for template in ("chatml", "llama3"):
        folders[template] = tmp_path_factory.mktemp(template)
        write_tiny_tokenizer(folders[template], template=template)
    return folders


@pytest.fixture(params=["chatml", "llama3"])
def template(request):
    return request.param


@pytest.fixture
def tok(tokenizer_folders, template):
    # A fresh Tokenizer per test: some tests swap its chat template.
    return Tokenizer.from_folder(tokenizer_folders[template])


@pytest.fixture
def chatml(tokenizer_folders):
    return Tokenizer.from_folder(tokenizer_folders["chatml"])


def find(ids: list[int], sub: list[int], start: int) -> int:
    """First position >= start where `sub` occurs in `ids`."""
    for i in range(start, len(ids) - len(sub) + 1):
        if ids[i : i + len(sub)] == sub:
            return i
    raise AssertionError(f"{sub} not found in {ids} after {start}")


def expected_chat_mask(tok, ids, template, trained_turns):
    """Mask built from the replies' own ids, each followed by the end-of-turn token."""
    end = tok.token_to_id(END_OF_TURN[template])
    mask, cursor = [0] * len(ids), 0
    positions = {}
    for text in [SYSTEM] + [t for pair in zip(USERS, REPLIES) for t in pair]:
        sub = tok.encode(text, add_special_tokens=False)
        at = find(ids, sub, cursor)
        positions[text] = range(at, at + len(sub))
        cursor = at + len(sub)
    for turn in trained_turns:
        reply = positions[REPLIES[turn]]
        assert ids[reply.stop] == end, "the reply must be followed by the end-of-turn token"
        for t in [*reply, reply.stop]:
            mask[t] = 1
    return mask, positions


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---- loss masks, token by token ----


def test_every_assistant_turn_carries_loss_and_nothing_else(tok, template):
    ids, mask = encode_chat(tok, CHAT, "assistant")
    assert ids == tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)
    expected, positions = expected_chat_mask(tok, ids, template, trained_turns=[0, 1, 2])
    assert mask == expected
    for text in [SYSTEM, *USERS]:
        assert not any(mask[t] for t in positions[text]), f"{text!r} must carry no loss"
    # Read the trained tokens back: the three replies, each closed by its end-of-turn token.
    trained = [i for i, m in zip(ids, mask) if m]
    end = END_OF_TURN[template]
    assert tok.decode(trained) == "".join(reply + end for reply in REPLIES)


def test_last_assistant_trains_only_the_last_reply(tok, template):
    ids, mask = encode_chat(tok, CHAT, "last_assistant")
    assert mask == expected_chat_mask(tok, ids, template, trained_turns=[2])[0]


def test_loss_on_all_trains_every_token(tok):
    ids, mask = encode_chat(tok, CHAT, "all")
    assert mask == [1] * len(ids)  # position 0 loses it when loaded (see the next test)


def test_loaded_chat_matches_the_token_level_mask(tmp_path, tok, template):
    file = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    train = load_dataset(file, tok)
    [example] = train.examples
    assert example["input_ids"] == encode_chat(tok, CHAT, "assistant")[0]
    expected, _ = expected_chat_mask(tok, example["input_ids"], template, [0, 1, 2])
    assert example["loss_mask"] == expected
    assert train.stats.trained_tokens == sum(expected)
    config = DataConfig(file, loss_on="all", valid_fraction=0)
    [example] = load_datasets(config, tok).train.examples
    assert example["loss_mask"] == [0] + [1] * (len(example["input_ids"]) - 1)


def test_chat_starting_with_user_gets_the_default_system_prompt_untrained(chatml):
    chat = CHAT[1:3]  # the ChatML template adds its own system prompt
    ids, mask = encode_chat(chatml, chat, "assistant")
    assert "You are a small, helpful assistant." in chatml.decode(ids)
    assert chatml.decode([i for i, m in zip(ids, mask) if m]) == REPLIES[0] + "<|im_end|>"


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function | tojson }}</call>"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_and_tool_calls_reach_the_template(tmp_path, chatml):
    chatml.chat_template = TOOL_TEMPLATE
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    record = {
        "tools": [{"type": "function", "function": {"name": "weather"}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
        ],
    }
    train = load_dataset(write_jsonl(tmp_path / "tools.jsonl", [record]), chatml)
    [example] = train.examples
    text = chatml.decode(example["input_ids"])
    assert 'Tools: [{"type": "function"' in text
    trained = [i for i, m in zip(example["input_ids"], example["loss_mask"]) if m]
    call_text = f"<call>{json.dumps(call['function'])}</call>"
    assert chatml.decode(trained) == f"{call_text}<|im_end|>It is sunny.<|im_end|>"


# ---- completions, text, notes ----


def test_completions_mask_the_prompt(tmp_path, tok):
    record = {"prompt": "What is the capital of France?", "completion": " Paris."}
    file = write_jsonl(tmp_path / "c.jsonl", [record])
    prompt_ids = tok.encode(record["prompt"])  # with BOS for llama3
    completion_ids = tok.encode(record["completion"], add_special_tokens=False)
    expected_ids = prompt_ids + completion_ids + [tok.eos_token_id]

    [example] = load_dataset(file, tok).examples
    assert example["input_ids"] == expected_ids
    assert example["loss_mask"] == [0] * len(prompt_ids) + [1] * (len(completion_ids) + 1)

    config = DataConfig(file, mask_prompt=False)
    [example] = load_dataset(file, tok, config).examples
    assert example["loss_mask"] == [0] + [1] * (len(expected_ids) - 1)


def test_text_records_train_every_token(tmp_path, tok):
    text = "Tokens are pieces of text."
    [example] = load_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": text}]), tok).examples
    assert example["input_ids"] == tok.encode(text) + [tok.eos_token_id]
    assert example["loss_mask"] == [0] + [1] * (len(example["input_ids"]) - 1)


def test_notes_folder_becomes_windows_of_max_length(tmp_path, tok):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / ".obsidian").mkdir()
    long_note = " ".join(CHAT[i]["content"] for i in range(len(CHAT)))
    (notes / "a.md").write_text(long_note)
    (notes / "sub" / "b.txt").write_text("On Monday the weather was cold.")
    (notes / "empty.md").write_text("  \n")
    (notes / ".obsidian" / "workspace.md").write_text("tool settings, not a note")
    (notes / "data.json").write_text("{}")

    splits = load_datasets(DataConfig(notes, max_length=16, valid_fraction=0), tok)
    assert splits.valid is None
    expected = []
    for text in (long_note, "On Monday the weather was cold."):  # sorted by path
        ids = tok.encode(text) + [tok.eos_token_id]
        windows = [ids[i : i + 16] for i in range(0, len(ids), 16)]
        expected += [w for w in windows if len(w) >= 2]  # a 1-token window predicts nothing
    assert [x["input_ids"] for x in splits.train.examples] == expected
    for x in splits.train.examples:
        assert x["loss_mask"] == [0] + [1] * (len(x["input_ids"]) - 1)
    stats = splits.train.stats
    assert stats.split == 1 and stats.truncated == 0
    assert stats.longest == len(tok.encode(long_note)) + 1
    assert stats.examples == len(expected) and stats.tokens == sum(map(len, expected))


def test_truncate_and_split_are_counted(tmp_path, tok):
    texts = [CHAT[i]["content"] for i in range(len(CHAT))]
    file = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    encoded = [tok.encode(t) + [tok.eos_token_id] for t in texts]
    limit = 10
    long = sum(len(ids) > limit for ids in encoded)
    assert 0 < long < len(texts)

    truncated = load_dataset(file, tok, DataConfig(file, max_length=limit))
    assert [x["input_ids"] for x in truncated] == [ids[:limit] for ids in encoded]
    assert truncated.stats.truncated == long and truncated.stats.split == 0
    assert truncated.stats.longest == max(map(len, encoded))

    split = load_dataset(file, tok, DataConfig(file, max_length=limit, overlong="split"))
    windows = [ids[i : i + limit] for ids in encoded for i in range(0, len(ids), limit)]
    assert [x["input_ids"] for x in split] == [w for w in windows if len(w) >= 2]
    assert split.stats.split == long and split.stats.truncated == 0
    assert all(len(x["input_ids"]) <= limit for x in split)


def test_chat_with_reply_beyond_max_length_is_dropped_and_counted(tmp_path, chatml):
    short = {"messages": CHAT[1:3]}
    long = {"messages": [{"role": "user", "content": "word " * 40}, CHAT[2]]}
    file = write_jsonl(tmp_path / "c.jsonl", [short, long])
    train = load_dataset(file, chatml, DataConfig(file, max_length=60))
    assert len(train) == 1 and train.stats.dropped == 1 and train.stats.truncated == 1
    with pytest.raises(DatasetError, match="no example is left with a token to train on"):
        load_dataset(file, chatml, DataConfig(file, max_length=20))


# ---- train / valid / test ----


def test_seeded_validation_split_is_deterministic_and_disjoint(tmp_path, chatml):
    records = [{"text": f"Note number {i} about apples."} for i in range(20)]
    file = write_jsonl(tmp_path / "notes.jsonl", records)

    def split(seed):
        s = load_datasets(DataConfig(file, valid_fraction=0.25, seed=seed), chatml)
        return [chatml.decode(x["input_ids"]) for x in s.train], [
            chatml.decode(x["input_ids"]) for x in s.valid
        ]

    train, valid = split(seed=3)
    assert len(valid) == 5 and len(train) == 15
    assert not set(train) & set(valid)
    assert sorted(train + valid) == sorted(
        f"Note number {i} about apples.<|im_end|>" for i in range(20)
    )
    assert split(seed=3) == (train, valid)
    assert split(seed=4)[1] != valid


def test_folder_with_train_valid_test(tmp_path, chatml):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}] * 3)
    write_jsonl(tmp_path / "valid.jsonl", [{"messages": CHAT[:3]}])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "Hi", "completion": " there"}] * 2)
    splits = load_datasets(DataConfig(tmp_path), chatml)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (3, 1, 2)
    assert splits.valid.source == tmp_path / "valid.jsonl"

    (tmp_path / "valid.jsonl").unlink()  # now split off train, test still read
    splits = load_datasets(DataConfig(tmp_path, valid_fraction=0.5), chatml)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (2, 1, 2)


# ---- batches ----


def make_examples(n, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(2, 30))
        ids = rng.integers(5, 100, size=length).tolist()
        examples.append({"input_ids": ids, "loss_mask": rng.integers(0, 2, size=length).tolist()})
    return examples


def test_batches_are_right_padded_shifted_and_masked():
    examples = make_examples(23)
    seen = []
    iterator = iterate_batches(examples, batch_size=4, max_length=32, seed=1, pad_id=0)
    assert len(iterator) == 6
    by_ids = {tuple(x["input_ids"]): x for x in examples}
    for inputs, targets, loss_mask in iterator:
        inputs, targets, loss_mask = np.array(inputs), np.array(targets), np.array(loss_mask)
        assert inputs.dtype == np.int32 and loss_mask.dtype == np.float32
        assert inputs.shape == targets.shape == loss_mask.shape
        # Widths are multiples of 8, capped at max_length - 1.
        assert inputs.shape[1] % 8 == 0 or inputs.shape[1] == 31
        for row in range(inputs.shape[0]):
            ids = [*inputs[row].tolist(), int(targets[row, -1])]
            # The example is this row up to its length; the rest is padding.
            example = next(x for key, x in by_ids.items() if list(key) == ids[: len(key)])
            n = len(example["input_ids"])
            assert inputs[row, : n - 1].tolist() == example["input_ids"][:-1]
            assert targets[row, : n - 1].tolist() == example["input_ids"][1:]
            assert loss_mask[row, : n - 1].tolist() == example["loss_mask"][1:]
            assert not inputs[row, n:].any() and not targets[row, n - 1 :].any()
            assert not loss_mask[row, n - 1 :].any()
            seen.append(tuple(example["input_ids"]))
    assert sorted(seen) == sorted(by_ids)  # every example once per epoch


def test_batches_bucket_lengths_and_evaluation_order_is_fixed():
    examples = make_examples(64)  # ids are never 0, so zeros in inputs are padding
    padding = sum(int((np.array(b.inputs) == 0).sum()) for b in iterate_batches(examples, 4, 32))
    # The same batch size and width rounding, with examples drawn in plain random order.
    rng, random_padding = np.random.default_rng(0), 0
    for i in range(0, 64, 4):
        lengths = [len(examples[j]["input_ids"]) for j in rng.permutation(64)[i : i + 4]]
        width = -(-(max(lengths) - 1) // 8) * 8
        random_padding += sum(width - n for n in lengths)
    assert padding < 0.6 * random_padding

    first = [np.array(b.inputs).tolist() for b in iterate_batches(examples, 4, 32, shuffle=False)]
    again = [np.array(b.inputs).tolist() for b in iterate_batches(examples, 4, 32, shuffle=False)]
    assert first == again


def test_batches_resume_from_a_saved_position():
    examples = make_examples(10)
    run = iterate_batches(examples, 3, 32, seed=7, repeat=True)  # 4 batches per epoch
    batches = [np.array(next(run).inputs).tolist() for _ in range(3)]
    state = dict(run.state)
    assert state == {"epoch": 0, "index": 3}
    rest = [np.array(next(run).inputs).tolist() for _ in range(6)]  # crosses into epoch 1
    assert run.state == {"epoch": 2, "index": 1}

    resumed = iterate_batches(examples, 3, 32, seed=7, repeat=True, **json.loads(json.dumps(state)))
    assert [np.array(next(resumed).inputs).tolist() for _ in range(6)] == rest
    assert rest[1:5] != batches + rest[:1]  # epochs are shuffled differently

    once = iterate_batches(examples, 3, 32, seed=7, drop_last=True)
    assert len(list(once)) == 3 and once.state == {"epoch": 0, "index": 3}


def test_batch_arguments_are_checked():
    with pytest.raises(ValueError, match="max_length=8"):
        iterate_batches(make_examples(4), 2, 8)
    with pytest.raises(ValueError, match="no full batch"):
        iterate_batches(make_examples(3), 4, 32, drop_last=True)


# ---- bad input: one DatasetError naming the file and line ----


def load_error(path, tok, **options) -> str:
    with pytest.raises(DatasetError) as info:
        load_datasets(DataConfig(path, **options), tok)
    assert isinstance(info.value, OndeviceLoraError)
    return str(info.value)


def test_malformed_json_line(tmp_path, chatml):
    file = tmp_path / "chats.jsonl"
    file.write_text(json.dumps({"messages": CHAT}) + '\n{"messages": [{"role": "user",\n')
    message = load_error(file, chatml)
    assert f"{file}, line 2: is not valid JSON" in message and "column" in message


def test_line_without_expected_keys(tmp_path, chatml):
    file = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 2 + [{"question": "?"}])
    message = load_error(file, chatml)
    assert f"{file}, line 3: has keys [question]" in message and '"messages"' in message

    file = write_jsonl(tmp_path / "first.jsonl", [{"input": "x", "output": "y"}])
    message = load_error(file, chatml)
    assert f"{file}, line 1" in message and '{"prompt"' in message and '{"text"' in message


def test_file_mixing_formats(tmp_path, chatml):
    file = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": CHAT}, {"text": "hello"}])
    message = load_error(file, chatml)
    assert f"{file}, line 2: is a text record but line 1 is a chat record" in message


def test_unknown_role(tmp_path, chatml):
    chat = [{"role": "human", "content": "hi"}, CHAT[2]]
    file = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}, {"messages": chat}])
    message = load_error(file, chatml)
    assert f"{file}, line 2: message 1 has role 'human'" in message
    assert "allowed roles: system, user, assistant, tool (did you mean 'user'?)" in message


def test_empty_content_and_missing_assistant(tmp_path, chatml):
    records = [
        {"messages": [{"role": "user", "content": " "}, CHAT[2]]},
        {"messages": [CHAT[1]]},
        {"messages": [CHAT[1], {"role": "assistant", "content": ""}]},
    ]
    file = write_jsonl(tmp_path / "chats.jsonl", records)
    message = load_error(file, chatml)
    assert f"{file} has 3 problems" in message
    assert f"{file}, line 1: message 1 (user) has empty content" in message
    assert f'{file}, line 2: has no "assistant" message' in message
    assert f"{file}, line 3: message 2 (assistant) has empty content" in message
    # Without assistant turns a chat is fine when every token is trained.
    file = write_jsonl(tmp_path / "user_only.jsonl", [{"messages": [CHAT[1]]}])
    assert len(load_datasets(DataConfig(file, loss_on="all"), chatml).train) == 1


def test_empty_dataset(tmp_path, chatml):
    file = tmp_path / "empty.jsonl"
    file.write_text("\n\n")
    message = load_error(file, chatml)
    assert str(file) in message and "holds no records" in message
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("")
    assert "every .txt/.md note in it is empty" in load_error(notes, chatml)


def test_missing_path(tmp_path, chatml):
    missing = tmp_path / "nowhere" / "data.jsonl"
    message = load_error(missing, chatml)
    assert f"{missing} does not exist" in message and "train.jsonl" in message
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "valid.jsonl", [{"text": "x"}])
    assert "has valid.jsonl but no train.jsonl" in load_error(folder, chatml)


def test_assistant_turn_not_in_rendered_template(tmp_path, chatml):
    # A template that leaves assistant replies out: nothing could be trained.
    chatml.chat_template = (
        "{% for m in messages %}{% if m.role != 'assistant' %}<|im_start|>{{ m.role }}\n"
        "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    file = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    message = load_error(file, chatml)
    assert f"{file}, line 1: the chat template does not show the assistant message 3" in message


def test_template_rejecting_a_chat_names_the_line(tmp_path, tokenizer_folders):
    llama3 = Tokenizer.from_folder(tokenizer_folders["llama3"])  # knows no "tool" role
    tool_chat = [CHAT[1], {"role": "tool", "content": "42"}, CHAT[2]]
    file = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}, {"messages": tool_chat}])
    message = load_error(file, llama3)
    assert f"{file}, line 2:" in message and "Unknown role: tool" in message


def test_line_errors_are_gathered_up_to_a_limit(tmp_path, chatml):
    file = tmp_path / "chats.jsonl"
    file.write_text(json.dumps({"messages": CHAT}) + "\n" + "not json\n" * 14)
    message = load_error(file, chatml)
    assert f"{file} has 14 problems" in message and "... and 4 more" in message
    assert f"{file}, line 2:" in message and f"{file}, line 11:" in message
    assert f"{file}, line 12:" not in message


def test_non_utf8_line(tmp_path, chatml):
    file = tmp_path / "t.jsonl"
    file.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert f"{file}, line 2: is not UTF-8 text" in load_error(file, chatml)


def test_invalid_options_are_reported_together():
    with pytest.raises(DatasetError) as info:
        DataConfig("d.jsonl", max_length=1, loss_on="everything", overlong="drop", valid_fraction=1)
    message = str(info.value)
    for name in ("max_length", "loss_on", "overlong", "valid_fraction"):
        assert name in message
    assert "last_assistant" in message
