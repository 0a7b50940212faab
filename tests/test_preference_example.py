"""The worked example (examples/preferences): DPO on the built-in SmolLM2-135M-Instruct teaches
it to answer in a few words. Held-out pairs end up preferred the right way, and the model's own
greedy replies to held-out questions get shorter. Slow tier: a real model, trained for real,
through the README's commands (`python -m ondevice_lora.launch`: with the fast BLAS on Linux)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.real_models import smollm2_path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "preferences"
# The example README's command, flag for flag.
TRAIN = [
    "train", "--method", "dpo", "--beta", "0.1", "--data", str(EXAMPLE),
    "--iters", "10", "--batch-size", "4", "--learning-rate", "1e-3", "--rank", "8",
    "--target-modules", "all-linear", "--num-layers", "8", "--warmup-steps", "2",
    "--eval-every", "10", "--save-every", "0",
]  # fmt: skip
ITERS = 10
MIN_ACCURACY = 0.9
# Held-out questions whose replies are measured, and how long each reply may run.
ASKED = 3
MAX_TOKENS = 48


def ondevice_lora(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ondevice_lora.launch", *args], cwd=REPO, capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def words(reply: str) -> int:
    return len(reply.split())


@pytest.mark.slow
def test_dpo_teaches_short_answers(tmp_path):
    smollm2_path()  # skips, saying why, without the built-in model
    out = tmp_path / "short-answers"
    ondevice_lora(*TRAIN, "--adapter-path", str(out))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in validations] == [0, ITERS]
    # The 12 held-out pairs (valid.jsonl): the trained policy prefers the short reply.
    assert validations[-1]["val_accuracy"] >= MIN_ACCURACY, validations
    assert validations[-1]["val_margin"] > validations[0]["val_margin"]

    questions = [
        json.loads(line)["prompt"][0]["content"]
        for line in (EXAMPLE / "valid.jsonl").read_text().splitlines()[:ASKED]
    ]
    asked = ["generate", "--greedy", "--max-tokens", str(MAX_TOKENS)]
    before = [ondevice_lora(*asked, "--prompt", q) for q in questions]
    after = [ondevice_lora(*asked, "--adapter", str(out), "--prompt", q) for q in questions]
    shorter = sum(words(a) < words(b) for a, b in zip(after, before))
    assert sum(map(words, after)) < 0.6 * sum(map(words, before)), (before, after)
    assert shorter >= ASKED - 1, (before, after)
