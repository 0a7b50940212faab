"""Preference pairs and DPO/ORPO training: formats, errors naming file and line, the reference
policy, the command line with its metrics, training on top of a reference adapter, and an exact
resume after kill -9. (The losses against TRL: test_preference_trl.py.)"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from ondevice_lora.adapters.files import LoraConfig, adapter_tensors, apply_adapters
from ondevice_lora.data import DataConfig, DatasetError
from ondevice_lora.data.preference import PairEncoder, load_preference_datasets
from ondevice_lora.loading import load
from ondevice_lora.training import ConfigError, TrainConfig
from ondevice_lora.training.checkpoint import latest_checkpoint, load_checkpoint
from ondevice_lora.training.cli import train_command
from ondevice_lora.training.metrics import read_metrics
from ondevice_lora.training.preference import reference_policy
from tests.hf_fixtures import write_hf_model
from tests.test_resume import max_abs_diff, run, sigkill, start, wait_for

USER = [{"role": "user", "content": "Name a fruit."}]
SHORT = [{"role": "assistant", "content": "An apple."}]
LONG = [{"role": "assistant", "content": "There are many fruits; apples and bananas are two."}]
# Short preferred to long: a tiny random model learns it in a few dozen steps.
QUESTIONS = ["What is the capital of France?", "Name a fruit.", "Say hello.", "What is two plus two?"]  # fmt: skip


def pair_lines(n: int = 12) -> list[dict]:
    lines = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS))
        lines.append({
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "assistant", "content": "The answer to that is a long story."}],
        })  # fmt: skip
    return lines


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pref-model") / "llama"
    write_hf_model(folder, "llama")
    return folder


@pytest.fixture(scope="module")
def tokenizer(model_folder):
    return load(model_folder)[1]


def test_the_three_formats_score_only_the_replies(tokenizer):
    encoder = PairEncoder(tokenizer, max_length=256)
    explicit, _ = encoder.pair({"prompt": USER, "chosen": SHORT, "rejected": LONG})
    implicit, _ = encoder.pair({"chosen": USER + SHORT, "rejected": USER + LONG})
    assert implicit == explicit  # the shared leading messages are the prompt
    chosen = [t for t, m in zip(explicit["input_ids"], explicit["loss_mask"]) if m]
    assert tokenizer.decode(chosen).startswith("An apple.")
    rejected = [
        t for t, m in zip(explicit["rejected_input_ids"], explicit["rejected_loss_mask"]) if m
    ]
    assert tokenizer.decode(rejected).startswith("There are many fruits")
    text, _ = encoder.pair({"prompt": "Name a fruit.", "chosen": " Apple.", "rejected": " Many."})
    scored = [t for t, m in zip(text["input_ids"], text["loss_mask"]) if m]
    assert tokenizer.decode(scored).startswith(" Apple.")
    assert text["input_ids"][-1] == tokenizer.eos_token_id  # the reply ends, as in SFT


def test_bad_pairs_are_reported_by_file_and_line(tokenizer, tmp_path):
    records = [
        {"prompt": USER, "chosen": SHORT, "rejected": LONG},  # line 1: fine
        {"chosen": USER + SHORT, "rejected": [{"role": "user", "content": "Other."}] + LONG},
        {"prompt": USER, "chosen": SHORT, "rejected": []},
        {"prompt": "Q?", "chosen": "", "rejected": "no"},
        {"prompt": "Q?", "chosen": SHORT, "rejected": "text"},
        {"chosen": USER + SHORT, "rejected": USER + SHORT},
        {"prompt": USER, "chosen": [{"role": "assistant", "content": "  "}], "rejected": LONG},
        {"prompt": "Q?", "completion": "A"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(DatasetError) as error:
        load_preference_datasets(DataConfig(path), tokenizer)
    message = str(error.value)
    assert "has 7 problems" in message and ", line 1:" not in message
    for line, words in [
        (2, "do not share the prompt"),
        (3, '"rejected" is empty'),
        (4, '"chosen" is empty'),
        (5, "all strings or all lists"),
        (6, "the same chat"),
        (7, "empty content"),
        (8, "needs 'chosen' and 'rejected'"),
    ]:
        assert f"pairs.jsonl, line {line}: " in message and words in message, (line, words)


def test_overlong_pairs_are_truncated_or_refused(tokenizer, tmp_path):
    long_reply = [{"role": "assistant", "content": "word " * 200}]
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": USER, "chosen": SHORT, "rejected": long_reply}] * 2)  # fmt: skip
    splits = load_preference_datasets(DataConfig(path, max_length=64, valid_fraction=0), tokenizer)
    assert splits.train.stats.truncated == 2
    assert all(len(x["rejected_input_ids"]) == 64 for x in splits.train)
    with pytest.raises(DatasetError, match=r"long.jsonl, line 1: .*longer than max_length 64"):
        load_preference_datasets(DataConfig(path, max_length=64, overlong="split"), tokenizer)
    with pytest.raises(DatasetError, match=r"line 1: .*starts after max_length 8"):
        load_preference_datasets(DataConfig(path, max_length=8), tokenizer)


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_the_reference_policy_is_the_base_exactly(model_folder, fine_tune_type):
    """Adapters off: bit-identical to the model without adapters, however far they trained;
    a reference adapter: the model with that adapter; afterwards the trained adapter is back."""
    model, _ = load(model_folder)
    tokens = mx.array([[1, 5, 9, 200, 31, 7]])
    base = model(tokens)
    apply_adapters(model, LoraConfig(target_modules="all-linear", fine_tune_type=fine_tune_type))
    mx.random.seed(0)
    trained = {k: v + mx.random.normal(v.shape) * 0.1 for k, v in adapter_tensors(model).items()}
    model.load_weights(list(trained.items()), strict=False)
    moved = model(tokens)
    assert not np.allclose(np.array(moved), np.array(base), atol=1e-3)
    with reference_policy(model, None):
        assert np.array_equal(np.array(model(tokens)), np.array(base))
    other = {k: v * 0.5 for k, v in trained.items()}
    with reference_policy(model, other):
        in_reference = model(tokens)
    model.load_weights(list(other.items()), strict=False)
    assert np.array_equal(np.array(in_reference), np.array(model(tokens)))
    model.load_weights(list(trained.items()), strict=False)
    assert np.array_equal(np.array(model(tokens)), np.array(moved))


def test_preference_settings_are_checked():
    with pytest.raises(ConfigError) as error:
        TrainConfig(
            data="x", method="orpo", orpo_lambda=0, reference_adapter="a", dp_epsilon=4.0,
            batching="packed",
        ).validate()  # fmt: skip
    message = str(error.value)
    for words in (
        "orpo_lambda must be a number > 0",
        "reference_adapter is for method dpo",
        "cannot be combined with DP-SGD",
        "trains on bucketed pairs only",
    ):
        assert words in message
    with pytest.raises(ConfigError, match="method must be one of sft, dpo, orpo"):
        TrainConfig(data="x", method="kto").validate()


def train_args(model_folder, data, out, *extra) -> list[str]:
    return [
        "--model", str(model_folder), "--data", data, "--adapter-path", str(out),
        "--rank", "8", "--target-modules", "all-linear", "--learning-rate", "3e-3",
        "--batch-size", "4", "--valid-fraction", "0.25", "--seed", "1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_train_command_learns_the_preference_and_writes_its_metrics(model_folder, tmp_path, method):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_lines())
    out = tmp_path / "run"
    flag = ["--beta", "0.2"] if method == "dpo" else ["--orpo-lambda", "0.5"]
    args = ["--method", method, *flag, "--iters", "24", "--eval-every", "12"]
    result = CliRunner().invoke(train_command, train_args(model_folder, data, out, *args))
    assert result.exit_code == 0, result.output
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    assert len(steps) == 24 and [r["step"] for r in vals] == [0, 12, 24]
    for r in steps:
        assert {"reward_chosen", "reward_rejected", "margin", "accuracy", "tokens_per_second"} <= set(r)  # fmt: skip
        assert r["margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"], abs=1e-5)
    assert vals[-1]["val_accuracy"] == 1.0 and vals[-1]["val_margin"] > vals[0]["val_margin"]
    if method == "dpo":  # the policy starts as the reference: loss log 2, no margin
        assert vals[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-6)
        assert vals[0]["val_margin"] == 0.0
    assert (out / "loss.png").stat().st_size > 0


def test_dpo_on_top_of_a_reference_adapter(model_folder, tmp_path):
    """The usual recipe: SFT first, then DPO against that adapter, starting from it."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_lines())
    sft = tmp_path / "sft"
    chats = [{"messages": p["prompt"] + p["chosen"]} for p in pair_lines()]
    sft_data = write_jsonl(tmp_path / "chats.jsonl", chats)
    runner = CliRunner()
    done = runner.invoke(train_command, train_args(model_folder, sft_data, sft, "--iters", "4"))
    assert done.exit_code == 0, done.output
    out = tmp_path / "dpo"
    args = ["--method", "dpo", "--reference-adapter", str(sft), "--iters", "2", "--eval-every", "0"]  # fmt: skip
    done = runner.invoke(train_command, train_args(model_folder, data, out, *args))
    assert done.exit_code == 0, done.output
    records = read_metrics(out / "metrics.jsonl")
    # At the start the policy is the reference exactly (its adapter, not the base's).
    assert records[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert records[1]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    reference, trained = mx.load(str(sft / "adapters.safetensors")), mx.load(str(out / "last" / "adapters.safetensors"))  # fmt: skip
    assert 0 < max_abs_diff(reference, trained) < 0.1  # started from it, then moved
    # A reference of other settings is refused, saying which.
    done = runner.invoke(train_command, train_args(model_folder, data, tmp_path / "x", *args, "--rank", "4"))  # fmt: skip
    assert done.exit_code != 0 and "rank: reference 8, this run 4" in done.output


@pytest.mark.slow
def test_killed_and_resumed_dpo_equals_an_uninterrupted_run(model_folder, tmp_path):
    import sys

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_lines(16))
    base = [sys.executable, "-m", "ondevice_lora.training.cli", "train"]
    # Dropout and accumulation: the random state and the data position must be restored.
    extra = ["--method", "dpo", "--iters", "16", "--save-every", "4", "--eval-every", "8",
             "--dropout", "0.1", "--grad-accumulation", "2", "--batch-size", "2", "--warmup-steps", "2"]  # fmt: skip

    def args(out, *more):
        return [*base, *train_args(model_folder, data, out), *extra, *more]

    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run(args(reference))
    process = start(args(interrupted))
    wait_for(lambda: latest_checkpoint(interrupted) is not None and latest_checkpoint(interrupted).name >= "step-0000008", process)  # fmt: skip
    sigkill(process)
    assert latest_checkpoint(interrupted).name < "step-0000016"
    run(args(interrupted, "--resume"))
    for name in ("adapters.safetensors", "last/adapters.safetensors"):
        assert max_abs_diff(mx.load(str(reference / name)), mx.load(str(interrupted / name))) <= 1e-6  # fmt: skip
    a, _, a_opt = load_checkpoint(latest_checkpoint(reference))
    b, _, b_opt = load_checkpoint(latest_checkpoint(interrupted))
    assert a.losses == pytest.approx(b.losses, abs=1e-6) and len(b.losses) == 16
    assert max_abs_diff(a_opt, b_opt) <= 1e-6
    steps = [r for r in read_metrics(interrupted / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    ref_steps = [r for r in read_metrics(reference / "metrics.jsonl") if "loss" in r]
    for x, y in zip(ref_steps, steps):
        assert x["accuracy"] == y["accuracy"] and x["margin"] == pytest.approx(y["margin"], abs=1e-6)  # fmt: skip


@pytest.mark.slow
def test_two_workers_train_the_same_dpo_adapter_as_one_process(model_folder, tmp_path):
    """Rows are sharded by whole pairs (chosen and rejected interleaved), and the pair counts
    and gradients are summed over the ranks: the same adapter as one process."""
    import sys

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_lines(12))
    base = [sys.executable, "-m", "ondevice_lora.launch", "train"]
    extra = ["--method", "dpo", "--iters", "6", "--eval-every", "0", "--save-every", "0"]
    single, split = tmp_path / "single", tmp_path / "split"
    run([*base, *train_args(model_folder, data, single), *extra])
    run([*base, *train_args(model_folder, data, split), *extra, "--workers", "2"])
    difference = max_abs_diff(
        mx.load(str(single / "adapters.safetensors")), mx.load(str(split / "adapters.safetensors"))
    )
    assert difference <= 1e-5
    ones = [r for r in read_metrics(single / "metrics.jsonl") if "loss" in r]
    twos = [r for r in read_metrics(split / "metrics.jsonl") if "loss" in r]
    assert len(twos) == 6
    for a, b in zip(ones, twos):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["accuracy"] == b["accuracy"]
