"""The memory estimate printed before training is within 25% of the peak MLX measures, and
MLX's cache and memory limits are applied for a run and restored after it.

The model is large enough that activations, not constant overheads, make up the peak:
hidden 256, 4 layers, vocab 4096, 4-bit, a few steps of the real trainer.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from ondevice_lora.adapters.files import LoraConfig, base_parameters, expected_trainable
from ondevice_lora.loading.tokenizer import Tokenizer
from ondevice_lora.models import llama
from ondevice_lora.training import ConfigError, TrainConfig, TrainingCallback, train
from ondevice_lora.training.memory import estimate_memory, loss_memory, memory_limits
from tests.tiny_tokenizer import write_tiny_tokenizer

# The acceptance bound: |estimate - measured peak| <= this share of the measured peak.
ESTIMATE_TOLERANCE = 0.25
ARGS = dict(
    hidden_size=256,
    num_hidden_layers=4,
    intermediate_size=704,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
)


def quantized_model():
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**ARGS))
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder)
    return Tokenizer.from_folder(folder)


def chats(n: int, max_length: int, seed: int = 0) -> list[dict]:
    """Examples of varied length with a prompt (untrained) and a reply (trained)."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(max_length // 4, max_length + 1))
        prompt = int(rng.integers(1, length // 2))
        ids = rng.integers(0, ARGS["vocab_size"], size=length).tolist()
        examples.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return examples


CASES = {
    "packed": dict(batch_size=4, max_length=257, batching="packed"),
    "bucketed": dict(batch_size=4, max_length=257, batching="bucketed"),
    "checkpointed": dict(batch_size=4, max_length=257, batching="packed", grad_checkpoint=True),
    "long_rows": dict(batch_size=2, max_length=513, batching="packed", rank=16),
    "qv_only_dropout": dict(
        batch_size=4, max_length=257, target_modules=["q_proj", "v_proj"], dropout=0.1
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_is_within_tolerance_of_the_measured_peak(case, tokenizer, tmp_path):
    settings = {"target_modules": "all-linear", **CASES[case]}
    examples = chats(16, settings["max_length"])
    # One epoch: the estimate is for the widest batch of the data, so the run must meet it.
    config = TrainConfig(
        adapter_path=str(tmp_path / "run"), epochs=1, save_every=0, eval_every=0, **settings
    )
    began = {}

    class Keep(TrainingCallback):
        def on_train_begin(self, info):
            began.update(info)

    result = train(
        quantized_model(), tokenizer, examples, None, config, [Keep()], show_progress=False
    )
    estimate = began["memory_estimate"]
    assert result.estimated_memory_gb == estimate.total / 1e9
    error = abs(result.estimated_memory_gb - result.peak_memory_gb) / result.peak_memory_gb
    print(
        f"{case}: estimated {result.estimated_memory_gb:.4f} GB, measured {result.peak_memory_gb:.4f} GB"
    )
    assert error <= ESTIMATE_TOLERANCE, (case, estimate.table(), result.peak_memory_gb)
    # Not dominated by constant overheads: activations and logits make up most of it.
    assert estimate.activations + estimate.logits > 0.8 * estimate.total


def test_estimate_items_count_what_the_model_holds():
    model = quantized_model()
    lora = LoraConfig(rank=8, target_modules="all-linear")
    estimate = estimate_memory(model, lora, batch_size=2, max_length=129)
    assert estimate.weights == sum(v.nbytes for v in base_parameters(model).values())
    assert estimate.adapter == 4 * expected_trainable(model, lora)  # float32 adapters
    assert estimate.optimizer == 2 * estimate.adapter  # AdamW's two moments
    assert estimate.gradients == estimate.adapter
    assert estimate_memory(model, lora, 2, 129, optimizer="sgd").optimizer == 0
    # The chunked loss: no (B, L - 1, vocab) logits; less with trained positions only, and a
    # vocabulary past 2 x 6 blocks costs the same however large (its blocks are what is held).
    assert estimate.logits == loss_memory(ARGS["vocab_size"], ARGS["hidden_size"], 2 * 128)
    # At a real vocabulary it is far below one float32 (B, L, vocab) copy of the logits (at 4k
    # words the head's own de-quantised blocks weigh more than the logits would).
    assert loss_memory(262_144, 640, 4 * 511) < 4 * 4 * 511 * 262_144 / 10
    assert estimate_memory(model, lora, 2, 129, logit_positions=64).logits < estimate.logits
    big = loss_memory(64 * ARGS["vocab_size"], ARGS["hidden_size"], 2 * 128)
    assert big == loss_memory(16 * ARGS["vocab_size"], ARGS["hidden_size"], 2 * 128)
    # Checkpointing keeps less; more tokens keep more.
    checkpointed = estimate_memory(model, lora, 2, 129, grad_checkpoint=True)
    assert checkpointed.activations < estimate.activations
    assert estimate_memory(model, lora, 4, 129).activations > estimate.activations
    table = estimate.table()
    assert "activations" in table and "loss" in table and "total (peak)" in table
    assert math.isclose(sum(size for _, size in estimate.items()), estimate.total)


def test_memory_limits_are_set_for_the_run_and_restored():
    # set_*_limit returns the limit it replaces: that is how the current one is read.
    old_cache = mx.set_cache_limit(111_000_000)
    old_memory = mx.set_memory_limit(3_000_000_000)
    try:
        with memory_limits(cache_limit_gb=0.5, memory_limit_gb=2.0):
            assert mx.set_cache_limit(500_000_000) == 500_000_000
            assert mx.set_memory_limit(2_000_000_000) == 2_000_000_000
        assert mx.set_cache_limit(111_000_000) == 111_000_000
        assert mx.set_memory_limit(3_000_000_000) == 3_000_000_000
    finally:
        mx.set_cache_limit(old_cache)
        mx.set_memory_limit(old_memory)


def test_batching_and_limits_are_validated():
    with pytest.raises(ConfigError) as info:
        TrainConfig(batching="sorted", cache_limit_gb=-1, memory_limit_gb="lots").validate(
            require_data=False
        )
    message = str(info.value)
    assert "batching must be one of packed, bucketed" in message
    assert "cache_limit_gb" in message and "memory_limit_gb" in message


# The estimate against a real checkpoint: SmolLM2-135M (vocab 49,152, tied head), trained in a
# process of its own with the fast BLAS preloaded, as `ondevice-lora train` runs on Linux.
SMOLLM2_RUN = """
import json, sys
from ondevice_lora import load
from ondevice_lora.training import TrainConfig, train
sys.path.insert(0, "tests")
from test_memory import chats_for

model, tokenizer = load(sys.argv[1])
config = TrainConfig(
    adapter_path=sys.argv[2], rank=8, target_modules="all-linear", batch_size=2,
    max_length=257, batching="packed", iters=2, save_every=0, eval_every=0, keep_best=False,
)
examples = chats_for(model.args.vocab_size, 32, 257)
result = train(model, tokenizer, examples, None, config, show_progress=False)
print(json.dumps({"peak": result.peak_memory_gb, "estimate": result.estimated_memory_gb}))
"""


def chats_for(vocab_size: int, n: int, max_length: int) -> list[dict]:
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(n):
        length = int(rng.integers(max_length // 2, max_length + 1))
        prompt = int(rng.integers(1, length // 2))
        ids = rng.integers(0, vocab_size, size=length).tolist()
        examples.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return examples


@pytest.mark.slow
def test_estimate_is_within_tolerance_on_smollm2(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from ondevice_lora.backend.fast_blas import preload_env, reexec_library
    from tests.real_models import smollm2_path

    path = smollm2_path()
    library = reexec_library()
    env = preload_env(library) if library else dict(os.environ)
    run = subprocess.run(
        [sys.executable, "-c", SMOLLM2_RUN, str(path), str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    error = abs(measured["estimate"] - measured["peak"]) / measured["peak"]
    print(f"SmolLM2-135M: estimated {measured['estimate']:.3f} GB, measured {measured['peak']:.3f}")
    assert error <= ESTIMATE_TOLERANCE, measured
