"""What the training benchmark trains on: a random Llama and a deterministic chat dataset.

Both are pure functions of their settings and seed, so every side of a benchmark (and every
rerun) sees the same weights and the same tokens. The chats are token ids, not text: the model
has random weights, so there is no real vocabulary to honour, and token ids let both trainers
train exactly the same tokens with exactly the same loss positions.

A chat is [BOS, SYSTEM, system..., USER, user..., ASSISTANT, reply..., EOS]; the reply and its
EOS are trained. Tokens follow a fixed random bigram chain (each token has four likely
successors), so a LoRA adapter can learn something and the validation loss falls.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

PAD, BOS, EOS, SYSTEM, USER, ASSISTANT = 0, 1, 2, 3, 4, 5
FIRST_WORD = 8  # ids below this are markers

# The 88M-parameter Llama, and a small one for --quick.
FULL_MODEL = {
    "model_type": "llama",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "intermediate_size": 2048,
    "vocab_size": 8192,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
QUICK_MODEL = {
    **FULL_MODEL,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "vocab_size": 1024,
}
GROUP_SIZE, BITS = 64, 4

# Chat lengths: log-normal, clipped to [MIN_TOKENS, max_length]; mean ~226 at max_length 512
# (the median scales with max_length).
LENGTH_MEDIAN, LENGTH_SIGMA, MIN_TOKENS = 198.0, 0.55, 24


def write_model(folder: Path, config: dict, bits: int | None, seed: int = 0) -> Path:
    """A random-weight Llama saved as an mlx-lm-layout folder (config.json, model.safetensors),
    float32, or `bits`-bit affine quantised (every Linear and Embedding) with float32 scales.
    Our loader and mlx-lm's both read it."""
    from ondevice_lora.models.llama import Model, ModelArgs

    folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    config = {**config, "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    if bits is not None:
        nn.quantize(model, group_size=GROUP_SIZE, bits=bits)
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": bits}
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, {"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def make_tokenizer(vocab_size: int):
    """Our Tokenizer over ids 0..vocab_size-1 ("<pad>", "<s>", "</s>", markers, "w8", ...): the
    trainer wants one for the base's fingerprint and the padding id."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from ondevice_lora.loading.tokenizer import Tokenizer

    names = ["<pad>", "<s>", "</s>", "<system>", "<user>", "<assistant>", "<m6>", "<m7>"]
    vocab = {name: i for i, name in enumerate(names)}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, vocab_size)})
    backend = Backend(models.WordLevel(vocab, unk_token="<pad>"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": None}
    return Tokenizer(backend, special, None, [EOS])


def make_chats(count: int, vocab_size: int, max_length: int, seed: int) -> list[dict]:
    """`count` chats as {"input_ids", "loss_mask", "offset"}: offset is the first trained token
    (the reply's), which is how mlx-lm describes a masked prompt."""
    language = np.random.default_rng(12345)  # the same bigram chain for every split and seed
    words = vocab_size - FIRST_WORD
    successors = language.integers(0, words, size=(words, 4))
    weights = np.array([0.55, 0.25, 0.12, 0.08])
    rng = np.random.default_rng(seed)

    def sentence(length: int) -> list[int]:
        word = int(rng.integers(words))
        out = []
        for _ in range(length):
            out.append(word + FIRST_WORD)
            word = int(successors[word, rng.choice(4, p=weights)])
        return out

    chats = []
    for _ in range(count):
        # Lengths scale with max_length, so a shorter --quick run keeps the same shape.
        median = LENGTH_MEDIAN * max_length / 512
        total = int(np.clip(rng.lognormal(math.log(median), LENGTH_SIGMA), 0, max_length))
        total = max(MIN_TOKENS, total)
        # Markers take 5 tokens; the system prompt is short, the reply about half the rest.
        system = int(rng.integers(4, 16))
        reply = max(4, int((total - 5 - system) * rng.uniform(0.35, 0.7)))
        user = total - 5 - system - reply
        prompt = [BOS, SYSTEM, *sentence(system), USER, *sentence(user), ASSISTANT]
        ids = prompt + sentence(reply) + [EOS]
        offset = len(prompt)
        chats.append(
            {
                "input_ids": ids,
                "loss_mask": [0] * offset + [1] * (len(ids) - offset),
                "offset": offset,
            }
        )
    return chats


def write_data(path: Path, train: list[dict], valid: list[dict]) -> Path:
    path.write_text(json.dumps({"train": train, "valid": valid}))
    return path


def read_data(path: Path) -> tuple[list[dict], list[dict]]:
    data = json.loads(Path(path).read_text())
    return data["train"], data["valid"]


def validation_loss(model, examples: list[dict], batch_size: int = 4) -> float:
    """Mean cross-entropy per trained token over `examples`, the same code for every side:
    fixed batches in order, right-padded, logits from model(inputs), eval mode."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(x["input_ids"]) for x in chunk)
        ids = np.full((len(chunk), width), PAD, dtype=np.int32)
        mask = np.zeros((len(chunk), width), dtype=np.float32)
        for row, x in enumerate(chunk):
            ids[row, : len(x["input_ids"])] = x["input_ids"]
            mask[row, : len(x["loss_mask"])] = x["loss_mask"]
        logits = model(mx.array(ids[:, :-1])).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, mx.array(ids[:, 1:]), reduction="none")
        weight = mx.array(mask[:, 1:])
        total += (ce * weight).sum().item()
        count += int(mask[:, 1:].sum())
    return total / max(count, 1)


def model_flops(example_lengths, trained_tokens: int, config: dict) -> float:
    """Model FLOPs of LoRA training on these examples (not counting padding or recomputation):
    each real position runs every decoder matmul forward and backward to its input (4 FLOPs
    per weight: the frozen base needs no weight gradient), plus causal attention (forward
    2 * n^2 * heads * head_dim per example, backward twice that); the output head is needed
    only at trained positions (4 * hidden * vocab each)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    per_layer = hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden
    per_layer += 3 * hidden * inter
    layers = config["num_hidden_layers"]
    positions = np.asarray(example_lengths, dtype=np.float64) - 1  # inputs of each example
    linear = 4.0 * per_layer * layers * positions.sum()
    attention = 3 * 2.0 * heads * head_dim * layers * (positions**2).sum()
    head = 4.0 * hidden * config["vocab_size"] * trained_tokens
    return linear + attention + head
