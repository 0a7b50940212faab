"""The worked example (examples/preferences): DPO on the built-in SmolLM2-135M-Instruct teaches
it to answer in a few words. Held-out pairs end up preferred the right way, and the model's own
greedy replies to held-out questions get shorter. Slow tier: a real model, trained for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ondevice_lora.generation.generate import SamplingConfig, generate
from ondevice_lora.loading import load
from ondevice_lora.training import TrainConfig
from ondevice_lora.training.api import train_from_config
from tests.real_models import smollm2_path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "preferences"
# The settings of the example's README command.
SETTINGS = dict(
    method="dpo", beta=0.1, iters=30, batch_size=4, learning_rate=1e-3, rank=8,
    target_modules="all-linear", num_layers=8, warmup_steps=3, eval_every=30, save_every=0,
)  # fmt: skip
MIN_ACCURACY = 0.9
# Held-out questions whose replies are measured, and how long each reply may run.
ASKED = 4
MAX_TOKENS = 48


def words(reply: str) -> int:
    return len(reply.split())


@pytest.mark.slow
def test_dpo_teaches_short_answers(tmp_path):
    smollm2_path()  # skips, saying why, without the built-in model
    out = tmp_path / "short-answers"
    config = TrainConfig(data=str(EXAMPLE), adapter_path=str(out), **SETTINGS)
    result = train_from_config(config, show_progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "val_accuracy" in r]
    assert validations[0]["step"] == 0 and validations[-1]["step"] == SETTINGS["iters"]
    # The 12 held-out pairs (valid.jsonl): the trained policy prefers the short reply.
    assert validations[-1]["val_accuracy"] >= MIN_ACCURACY, validations
    assert validations[-1]["val_margin"] > validations[0]["val_margin"]
    assert result.steps == SETTINGS["iters"]

    questions = [
        json.loads(line)["prompt"][0]["content"]
        for line in (EXAMPLE / "valid.jsonl").read_text().splitlines()[:ASKED]
    ]
    greedy = SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS)
    before_model, tokenizer = load(None)
    before = [generate(before_model, tokenizer, q, greedy) for q in questions]
    after_model, _ = load(None, adapter=str(out))
    after = [generate(after_model, tokenizer, q, greedy) for q in questions]
    shorter = sum(words(a) < words(b) for a, b in zip(after, before))
    assert sum(map(words, after)) < 0.6 * sum(map(words, before)), (before, after)
    assert shorter >= ASKED - 1, (before, after)
