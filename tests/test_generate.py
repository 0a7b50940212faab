"""Generation with the KV cache, sampling, streaming and the CLI, against transformers."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ondevice_lora import SamplingConfig, generate, load, stream_generate
from ondevice_lora.cli import main
from ondevice_lora.errors import OndeviceLoraError
from ondevice_lora.generation.generate import generate_tokens, sample
from ondevice_lora.loading import load_model
from ondevice_lora.loading.tokenizer import Tokenizer
from ondevice_lora.models.base import make_cache
from tests.hf_fixtures import VOCAB_SIZE, write_hf_model

# A prompt of varied ids, so greedy decoding does not fall straight into a loop.
PROMPT_IDS = [5, 77, 300, 12, 499, 45, 260, 18]
LOGITS_ATOL = 1e-4
FIXTURES = {}  # variant -> (folder, transformers model), written once per session


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    def make(variant: str):
        if variant not in FIXTURES:
            folder = tmp_path_factory.mktemp(variant)
            FIXTURES[variant] = (folder, write_hf_model(folder, variant))
        return FIXTURES[variant]

    return make


class ScriptedModel:
    """A stand-in model whose n-th forward call makes script[n] by far the most likely token."""

    def __init__(self, script: list[int], vocab_size: int):
        self.layers = []  # no layers: make_cache gives an empty cache
        self.script = script
        self.vocab_size = vocab_size
        self.calls = 0

    def model(self, inputs, cache=None):
        """The decoder stack's place: (B, L) -> (B, L, 1) hidden states that say nothing."""
        return mx.zeros((*inputs.shape, 1))

    def output_logits(self, hidden):
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        row = mx.where(mx.arange(self.vocab_size) == token, 10.0, -10.0)
        return mx.broadcast_to(row, (*hidden.shape[:-1], self.vocab_size))

    def __call__(self, inputs, cache=None):
        return self.output_logits(self.model(inputs, cache))


# (1) Greedy decoding equals transformers' greedy generate, token for token.
@pytest.mark.parametrize(
    "variant", ["llama", "llama3_rope_scaling", "qwen2", "qwen2_untied", "qwen3", "qwen3_untied"]
)
def test_greedy_matches_transformers(hf_folder, variant):
    folder, hf_model = hf_folder(variant)
    model, _ = load_model(folder)
    ours = list(generate_tokens(model, PROMPT_IDS, SamplingConfig(max_tokens=20), eos_ids=()))

    hf_model.generation_config.eos_token_id = None  # no early stop on the reference side either
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([PROMPT_IDS]),
            attention_mask=torch.ones(1, len(PROMPT_IDS), dtype=torch.long),
            do_sample=False,
            max_new_tokens=20,
            pad_token_id=0,
        )
    assert ours == out[0, len(PROMPT_IDS) :].tolist()


# (2) Prefill k tokens then n single steps gives the logits of one full forward pass.
@pytest.mark.parametrize(
    "variant,k,n",
    [("llama", 5, 8), ("qwen2", 5, 8), ("qwen3", 5, 8), ("llama", 250, 10)],
    ids=["llama", "qwen2", "qwen3", "llama-across-cache-block"],
)
def test_cached_decode_matches_full_forward(hf_folder, variant, k, n):
    folder, _ = hf_folder(variant)
    model, _ = load_model(folder)
    rng = np.random.default_rng(0)
    ids = mx.array(rng.integers(0, VOCAB_SIZE, size=(1, k + n)), dtype=mx.int32)
    full = model(ids)  # (1, k + n, vocab)

    cache = make_cache(model)
    steps = [model(ids[:, :k], cache=cache)]
    for i in range(k, k + n):
        steps.append(model(ids[:, i : i + 1], cache=cache))
    cached = mx.concatenate(steps, axis=1)
    assert cache[0].offset == k + n
    np.testing.assert_allclose(np.array(cached), np.array(full), atol=LOGITS_ATOL, rtol=0)


# (3) Sampling: greedy is argmax, top-p stays in the nucleus, temperature follows the softmax.
PROBS = np.array([0.5, 0.3, 0.12, 0.05, 0.03])


def test_temperature_zero_is_argmax():
    logits = mx.random.normal((16, 50), key=mx.random.key(3))
    chosen = sample(logits, SamplingConfig(temperature=0.0))
    assert chosen.tolist() == mx.argmax(logits, axis=-1).tolist()


def test_top_p_never_leaves_the_nucleus():
    # 0.5 < 0.75 <= 0.5 + 0.3: the smallest set reaching 0.75 is {0, 1}.
    logits = mx.array(np.log(PROBS), dtype=mx.float32)
    config = SamplingConfig(temperature=1.0, top_p=0.75)
    seen = {sample(logits, config, key=mx.random.key(seed)).item() for seed in range(300)}
    assert seen == {0, 1}
    # A nucleus that the top token alone reaches is that token.
    config = SamplingConfig(temperature=1.0, top_p=0.5)
    assert {sample(logits, config, key=mx.random.key(s)).item() for s in range(50)} == {0}


def test_top_p_draws_follow_the_renormalised_nucleus():
    logits = mx.broadcast_to(mx.array(np.log(PROBS), dtype=mx.float32), (20000, len(PROBS)))
    draws = sample(logits, SamplingConfig(temperature=1.0, top_p=0.9), key=mx.random.key(0))
    nucleus = PROBS[:3] / PROBS[:3].sum()  # 0.5 + 0.3 < 0.9 <= 0.5 + 0.3 + 0.12
    counts = np.bincount(np.array(draws), minlength=len(PROBS))
    assert counts[3:].sum() == 0
    assert _chi_square(counts[:3], nucleus) < 13.8  # df 2, p = 0.001


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_temperature_draws_follow_the_softmax(temperature):
    raw = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    logits = mx.broadcast_to(mx.array(raw, dtype=mx.float32), (20000, len(raw)))
    config = SamplingConfig(temperature=temperature, top_p=1.0)
    draws = np.array(sample(logits, config, key=mx.random.key(1)))
    expected = np.exp(raw / temperature) / np.exp(raw / temperature).sum()
    counts = np.bincount(draws, minlength=len(raw))
    assert _chi_square(counts, expected) < 20.5  # df 5, p = 0.001


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def test_seed_makes_sampling_reproducible(hf_folder):
    folder, _ = hf_folder("llama")
    model, _ = load_model(folder)
    config = SamplingConfig(temperature=1.5, top_p=0.95, max_tokens=12, seed=7)
    first = list(generate_tokens(model, PROMPT_IDS, config))
    assert first == list(generate_tokens(model, PROMPT_IDS, config))
    other = SamplingConfig(temperature=1.5, top_p=0.95, max_tokens=12, seed=8)
    assert first != list(generate_tokens(model, PROMPT_IDS, other))


def test_invalid_settings_are_reported_together():
    with pytest.raises(OndeviceLoraError) as info:
        SamplingConfig(temperature=-1, top_p=0, max_tokens=0, seed=-2)
    message = str(info.value)
    for name in ("temperature", "top_p", "max_tokens", "seed"):
        assert name in message
    with pytest.raises(OndeviceLoraError, match="temperature"):
        SamplingConfig(temperature=math.nan)


# (4) Generation stops at an eos id, which is not emitted.
def test_stops_before_eos_id(hf_folder):
    folder, _ = hf_folder("llama")
    model, _ = load_model(folder)
    config = SamplingConfig(max_tokens=12)
    free = list(generate_tokens(model, PROMPT_IDS, config, eos_ids=()))
    # Declare the first token not seen before position 2 an eos id: generation ends just before.
    stop_at = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stopped = list(generate_tokens(model, PROMPT_IDS, config, eos_ids=[free[stop_at]]))
    assert stopped == free[:stop_at]
    ignoring = SamplingConfig(max_tokens=12, stop_at_eos=False)
    assert list(generate_tokens(model, PROMPT_IDS, ignoring, eos_ids=[free[stop_at]])) == free


@pytest.fixture(scope="module")
def tokenizer(hf_folder):
    folder, _ = hf_folder("llama")
    return Tokenizer.from_folder(folder)


def test_eos_text_is_not_emitted(tokenizer):
    words = tokenizer.encode(" hello world", add_special_tokens=False)
    eos = tokenizer.eos_token_ids[0]
    script = [*words, eos, *words]
    model = ScriptedModel(script, tokenizer.vocab_size)
    stream = stream_generate(model, tokenizer, "hi", SamplingConfig(max_tokens=20), chat=False)
    assert "".join(stream) == " hello world"
    assert stream.stats.generation_tokens == len(words)

    model = ScriptedModel(script, tokenizer.vocab_size)
    config = SamplingConfig(max_tokens=len(script), stop_at_eos=False)
    assert generate(model, tokenizer, "hi", config, chat=False) == tokenizer.decode(script)


# (5) The CLI prints what the Python API generates; bad input is one message and exit code 1.
def test_cli_generate_matches_python_api(hf_folder):
    folder, _ = hf_folder("llama")
    result = CliRunner().invoke(
        main,
        ["generate", "--model", str(folder), "--prompt", "hi", "--greedy", "--max-tokens", "5"],
    )
    assert result.exit_code == 0, result.output
    model, tokenizer = load(folder)
    expected = generate(model, tokenizer, "hi", SamplingConfig(temperature=0.0, max_tokens=5))
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr and "peak memory" in result.stderr


def test_cli_bad_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    result = CliRunner().invoke(main, ["generate", "--model", str(missing), "--prompt", "hi"])
    # An uncaught exception also exits 1 under CliRunner; only a handled one is a SystemExit.
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert str(missing) in result.stderr


@pytest.mark.parametrize(
    "args,code,words",
    [
        (["--top-p", "1.5"], 1, "top_p"),
        (["--system", "be terse", "--no-chat"], 1, "system prompt"),
        (["--greedy", "--temperature", "0.5"], 2, "--greedy"),
    ],
)
def test_cli_bad_settings(hf_folder, args, code, words):
    folder, _ = hf_folder("llama")
    base = ["generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "2"]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == code and isinstance(result.exception, SystemExit)
    assert words in result.stderr


# (6) Streaming: the pieces add up to the full decode, characters are never cut in half.
def test_stream_pieces_join_to_full_decode(tokenizer):
    ids = tokenizer.encode("café, naïve 日本 and 🤗!", add_special_tokens=False)
    model = ScriptedModel(ids, tokenizer.vocab_size)
    stream = stream_generate(model, tokenizer, "hi", SamplingConfig(max_tokens=len(ids)))
    pieces = list(stream)
    assert "".join(pieces) == tokenizer.decode(ids) == "café, naïve 日本 and 🤗!"
    assert not any("\ufffd" in piece for piece in pieces)
    assert stream.stats.generation_tokens == len(ids)


def test_stream_of_a_real_model_joins_to_full_decode(hf_folder, tokenizer):
    folder, _ = hf_folder("llama")
    model, _ = load_model(folder)
    config = SamplingConfig(temperature=1.0, max_tokens=30, seed=3, stop_at_eos=False)
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True
    )
    ids = list(generate_tokens(model, prompt_ids, config))
    stream = stream_generate(model, tokenizer, "hi", config)  # chat template by default
    assert "".join(stream) == tokenizer.decode(ids)
    stats = stream.stats
    assert stats.prompt_tokens == len(prompt_ids) and stats.generation_tokens == len(ids)
    assert stats.prompt_tps > 0 and stats.generation_tps > 0


def test_system_prompt_and_plain_text(tokenizer):
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
        tokenize=True,
    )
    model = ScriptedModel([5], tokenizer.vocab_size)
    stream = stream_generate(
        model, tokenizer, "hi", SamplingConfig(max_tokens=1), system="Be terse."
    )
    list(stream)
    assert stream.stats.prompt_tokens == len(with_system)
    plain = stream_generate(model, tokenizer, "hi", SamplingConfig(max_tokens=1), chat=False)
    list(plain)
    assert plain.stats.prompt_tokens == len(tokenizer.encode("hi"))
