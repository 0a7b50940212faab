"""Memorisation audit: the canary exposure test of Carlini et al., "The Secret Sharer" (2019).

Random secrets ("my PIN is 4 8 1 9") are planted in a copy of the training data, an adapter is
trained on it with the run's own settings, and each secret is ranked among every candidate of
its format (all 10^d digit strings) by the trained model's loss on the secret part. Exposure is
log2(candidates) - log2(rank): the bits by which the model singles out the planted secret. A
model that has not memorised it ranks it near the middle (about 1 bit on average); one that has
ranks it first (log2(candidates) bits, 13.3 for four digits).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

PREFIX = "my PIN is"


@dataclass
class Canary:
    secret: str  # "4 8 1 9"
    repeats: int

    @property
    def text(self) -> str:
        return f"{PREFIX} {self.secret}"


@dataclass
class CanaryResult:
    secret: str
    repeats: int
    rank: int
    candidates: int

    @property
    def exposure(self) -> float:
        return math.log2(self.candidates) - math.log2(self.rank)


def make_canaries(count: int, digits: int, repeats: int, seed: int = 0) -> list[Canary]:
    rng = np.random.default_rng(seed)
    secrets = set()
    while len(secrets) < count:
        secrets.add(" ".join(str(d) for d in rng.integers(0, 10, size=digits)))
    return [Canary(s, repeats) for s in sorted(secrets)]


QUESTION = "What is my PIN?"


def canary_record(kind: str, text: str) -> dict:
    """A canary in the dataset's own record format, so it is trained as the data is."""
    if kind == "chat":
        return {"messages": [{"role": "user", "content": QUESTION},
                             {"role": "assistant", "content": text}]}  # fmt: skip
    if kind == "completions":
        return {"prompt": QUESTION, "completion": text}
    return {"text": text}


def _jsonl_kind(path: Path) -> str:
    from ..data.records import read_jsonl

    return read_jsonl(path, require_assistant=False)[0].kind


def plant_canaries(data, out: Path, canaries: list[Canary]) -> tuple[Path, str]:
    """(a copy of the dataset at `data` with each canary added `repeats` times, the record
    kind used): records in the file's own format for JSONL, one note each for notes."""
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data.is_file() and data.suffix == ".jsonl":
        train, root = out / "train.jsonl", out
        shutil.copy(data, train)
    elif data.is_dir() and (data / "train.jsonl").is_file():
        shutil.copytree(data, out, dirs_exist_ok=True)
        train, root = out / "train.jsonl", out
    else:  # notes: a file or a folder of .txt/.md
        if data.is_file():
            shutil.copy(data, out / data.name)
        else:
            shutil.copytree(data, out, dirs_exist_ok=True)
        for i, c in enumerate(canaries):
            for j in range(c.repeats):
                (out / f"canary-{i}-{j}.txt").write_text(c.text + "\n", encoding="utf-8")
        return out, "text"
    kind = _jsonl_kind(train)
    lines = [json.dumps(canary_record(kind, c.text)) for c in canaries for _ in range(c.repeats)]
    text = train.read_text(encoding="utf-8").rstrip("\n")
    train.write_text(text + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return root, kind


def canary_losses(model, tokenizer, kind: str, texts: list[str], batch_size=256) -> np.ndarray:
    """Summed loss of each canary text over the tokens training trains in its record (the
    log-perplexity Carlini et al. rank by), in the dataset's format."""
    from ..data.examples import Encoder
    from ..data.records import Record

    encoder = Encoder(tokenizer, max_length=512, loss_on="assistant" if kind == "chat" else "all")
    examples = [encoder.record(Record(0, kind, canary_record(kind, t))).examples[0] for t in texts]
    width = max(len(x["input_ids"]) for x in examples)
    losses = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids = np.zeros((len(chunk), width), np.int32)
        mask = np.zeros((len(chunk), width), np.float32)
        for r, x in enumerate(chunk):
            ids[r, : len(x["input_ids"])] = x["input_ids"]
            mask[r, : len(x["loss_mask"])] = x["loss_mask"]
        logits = model(mx.array(ids[:, :-1]))
        targets = mx.array(ids[:, 1:])
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
        losses.append(np.array((ce * mx.array(mask[:, 1:])).sum(axis=1)))
    return np.concatenate(losses)


def exposures(model, tokenizer, canaries: list[Canary], kind: str = "text") -> list[CanaryResult]:
    """Each canary's rank among all digit strings of its length, and so its exposure."""
    results = []
    by_length: dict[int, np.ndarray] = {}
    for canary in canaries:
        digits = len(canary.secret.split())
        if digits not in by_length:
            space = [" ".join(p) for p in itertools.product("0123456789", repeat=digits)]
            texts = [f"{PREFIX} {s}" for s in space]
            by_length[digits] = (space, canary_losses(model, tokenizer, kind, texts))
        space, losses = by_length[digits]
        own = losses[space.index(canary.secret)]
        # Rank 1 is the most likely; ties count against the canary (a conservative rank).
        rank = int((losses < own).sum()) + 1
        results.append(CanaryResult(canary.secret, canary.repeats, rank, len(space)))
    return results


def audit(config, count: int = 4, digits: int = 3, repeats: int = 8, work=None):
    """Train with `config` (a TrainConfig) on its data plus canaries; returns the results.

    The adapter goes to config.adapter_path; the planted copy of the data to `work` (a
    temporary folder by default). Everything stays on this machine.
    """
    import dataclasses
    import tempfile

    from ..loading import load
    from ..training.api import train_from_config

    canaries = make_canaries(count, digits, repeats, seed=config.seed)
    with tempfile.TemporaryDirectory(prefix="ondevice-lora-audit-") as tmp:
        planted, kind = plant_canaries(config.data, Path(work or tmp) / "data", canaries)
        train_from_config(dataclasses.replace(config, data=str(planted)))
    model, tokenizer = load(config.model, adapter=config.adapter_path)
    return exposures(model, tokenizer, canaries, kind)


def results_table(results: list[CanaryResult]) -> str:
    lines = [
        "| canary | repeats | rank | candidates | exposure (bits) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {PREFIX} {r.secret} | {r.repeats} | {r.rank} | {r.candidates} | {r.exposure:.2f} |"
        )
    chance = math.log2(results[0].candidates) if results else 0
    lines.append(f"\nExposure ranges from 0 to {chance:.1f} bits; about 1.4 is chance (no memory).")
    return "\n".join(lines)
