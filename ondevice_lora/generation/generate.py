"""Text generation for one sequence with the KV cache: greedy, temperature and top-p sampling.

The prompt goes through the model in one forward pass (prefill), which fills every layer's cache;
after that each step feeds only the newest token. Step n+1 is queued on the device before token
n is handed to the caller, so decoding and the caller's work (detokenizing, printing) overlap.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence

import mlx.core as mx

from ..errors import OndeviceLoraError
from ..loading.tokenizer import StreamingDetokenizer
from ..models.base import make_cache


@dataclasses.dataclass
class SamplingConfig:
    """How the next token is chosen, and when generation ends.

    temperature: 0 picks the most likely token (greedy); above 0 divides the logits before
        sampling, so lower is more conservative.
    top_p: nucleus sampling; keep the smallest set of most likely tokens whose probability
        reaches top_p, and sample within it. 1.0 keeps every token. Ignored when greedy.
    max_tokens: the most new tokens to generate.
    seed: makes sampling reproducible; None draws from MLX's global random state.
    stop_at_eos: end at any of the tokenizer's end-of-sequence ids (which are not emitted).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise one OndeviceLoraError listing every invalid setting."""
        problems = []
        # `not x >= 0` rather than `x < 0`, so that NaN is refused too.
        if not (_is_number(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (_is_integer(self.max_tokens) and self.max_tokens >= 1):
            problems.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and not (_is_integer(self.seed) and self.seed >= 0):
            problems.append(f"seed must be an integer >= 0 or None, got {self.seed!r}")
        if problems:
            raise OndeviceLoraError("invalid sampling settings:\n  " + "\n  ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample(logits: mx.array, config: SamplingConfig, key: mx.array | None = None) -> mx.array:
    """Choose one token id per row of `logits` (..., vocab) -> int32 (...).

    key: a PRNG key (mx.random.key); None uses MLX's global random state.
    """
    if config.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    # float32 so that low-precision logits do not quantise the probabilities or their sums.
    scaled = logits.astype(mx.float32) / config.temperature
    if config.top_p >= 1.0:
        return mx.random.categorical(scaled, axis=-1, key=key).astype(mx.int32)

    # Sort descending; a token stays in the nucleus when the tokens before it hold less than
    # top_p, so the most likely token always stays and the set is the smallest reaching top_p.
    order = mx.argsort(-scaled, axis=-1)  # (..., vocab) ids, most likely first
    sorted_logits = mx.take_along_axis(scaled, order, axis=-1)
    sorted_probs = mx.softmax(sorted_logits, axis=-1)
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = mx.where(mass_before < config.top_p, sorted_logits, -float("inf"))
    # Sample a rank within the nucleus, then map the rank back to a token id.
    rank = mx.random.categorical(kept, axis=-1, key=key)
    return mx.take_along_axis(order, rank[..., None], axis=-1)[..., 0].astype(mx.int32)


def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    config: SamplingConfig | None = None,
    eos_ids: Iterable[int] = (),
    cache: list | None = None,
) -> Iterator[int]:
    """Yield generated token ids one at a time, at most config.max_tokens of them.

    Generation ends before yielding an id in `eos_ids` (when config.stop_at_eos); pass the
    tokenizer's eos_token_ids. The model and its cache see one sequence (batch size 1).
    cache: a KV cache (make_cache) that already holds the tokens before `prompt_ids`, which then
    continue that sequence (a chat's next turn); None starts a new one. Each step writes to it:
    once generation ends it holds the prompt and the tokens fed back so far (the last yielded
    token only if another step was queued after it, and possibly the end-of-sequence token).
    """
    config = config or SamplingConfig()
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise OndeviceLoraError("the prompt is empty: generation needs at least one token.")
    stop = set(eos_ids) if config.stop_at_eos else set()
    cache = make_cache(model) if cache is None else cache
    # One explicit key split per step: a seed then fixes the whole sequence, independently of
    # anything else that draws from MLX's global random state.
    key = mx.random.key(config.seed) if config.seed is not None else None

    # LongRoPE (Phi-3 long-context models) changes its rotary frequencies for the whole
    # sequence once it grows past the original context: like transformers, feed every token of
    # the sequence again then, into an emptied cache. `fed` keeps them. A cache passed in that
    # already holds tokens (a chat's later turn) is continued as it is, since its tokens are
    # not known here: past the switch its earlier keys keep the short factors' rotation.
    switch = getattr(model, "rope_switch_length", None)
    fed = [] if switch is not None and cache[0].offset == 0 else None

    def step(inputs: mx.array) -> mx.array:
        nonlocal key
        if fed is not None:
            fed.append(inputs)
            if cache[0].offset <= switch < cache[0].offset + inputs.shape[1] and cache[0].offset:
                for layer_cache in cache:
                    layer_cache.trim(0)
                inputs = mx.concatenate(fed, axis=1)
        hidden = model.model(inputs, cache)  # (1, L, hidden)
        # The head at the sampled position only: a 262k-vocabulary head over a whole prompt
        # would cost the prompt's length in (vocab x hidden) products and (L, vocab) logits.
        logits = model.output_logits(hidden[:, -1, :])  # (1, vocab)
        step_key = None
        if key is not None:
            key, step_key = mx.random.split(key)
        return sample(logits, config, step_key)  # (1,)

    token = step(mx.array(prompt_ids, dtype=mx.int32)[None])  # prefill: (1, L_prompt)
    mx.async_eval(token)
    for n in range(config.max_tokens):
        # Queue the next step on the still-unevaluated token before reading this one, so the
        # device is busy while the caller handles `token`.
        upcoming = None
        if n + 1 < config.max_tokens:
            upcoming = step(token[:, None])  # (1, 1)
            mx.async_eval(upcoming)
        token_id = token.item()
        if token_id in stop:
            return
        yield token_id
        token = upcoming


@dataclasses.dataclass
class GenerationStats:
    """Counts and speeds of one generation; filled in as it runs, final once it ends."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0  # prompt tokens per second of prefill (time to first token)
    generation_tps: float = 0.0  # tokens per second after the first one
    peak_memory_gb: float = 0.0  # mx.get_peak_memory() during generation, in GB (1e9 bytes)

    def summary(self) -> str:
        """One line for the terminal."""
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s | "
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s | "
            f"peak memory: {self.peak_memory_gb:.3f} GB"
        )


def encode_prompt(tokenizer, prompt, chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids for `prompt`: a string or a list of chat messages ({"role", "content"}).

    With chat=True and a tokenizer that has a chat template, a string becomes a user message
    (after `system`, if given) and the conversation is rendered with the assistant's turn
    opened. Without a template the text is encoded as it is.
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
    else:
        messages = list(prompt)
        if system is not None:
            raise OndeviceLoraError("pass the system prompt inside the messages, not as system=.")
    use_template = chat and tokenizer.chat_template is not None
    if use_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if system is not None:
        reason = "chat is off" if not chat else "the tokenizer has no chat template"
        raise OndeviceLoraError(f"a system prompt needs a chat template, but {reason}.")
    if not isinstance(prompt, str):
        raise OndeviceLoraError(
            "a list of messages needs a chat template; pass plain text instead, or chat=True "
            "with a tokenizer that has one."
        )
    return tokenizer.encode(prompt)


class TextStream:
    """The text pieces of one generation, in order; `stats` is complete once iteration ends.

    Iterate it once: `for piece in stream: print(piece, end="")`. cache: see generate_tokens.
    """

    def __init__(self, model, tokenizer, prompt_ids: list[int], config: SamplingConfig, cache=None):
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.token_ids: list[int] = []  # the generated ids so far, without the end token
        self._pieces = self._run(model, tokenizer, prompt_ids, config, cache)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def _run(self, model, tokenizer, prompt_ids, config, cache) -> Iterator[str]:
        stats = self.stats
        detokenizer = StreamingDetokenizer(tokenizer)
        eos_ids = tokenizer.eos_token_ids
        mx.reset_peak_memory()
        start = time.perf_counter()
        first = None
        for token_id in generate_tokens(model, prompt_ids, config, eos_ids, cache):
            self.token_ids.append(token_id)
            now = time.perf_counter()
            if first is None:
                first = now
                stats.prompt_tps = stats.prompt_tokens / max(now - start, 1e-9)
            stats.generation_tokens += 1
            if stats.generation_tokens > 1:
                stats.generation_tps = (stats.generation_tokens - 1) / max(now - first, 1e-9)
            stats.peak_memory_gb = mx.get_peak_memory() / 1e9
            piece = detokenizer.add_token(token_id)
            if piece:
                yield piece
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        rest = detokenizer.finish()
        if rest:
            yield rest


def stream_generate(
    model,
    tokenizer,
    prompt,
    config: SamplingConfig | None = None,
    chat: bool = True,
    system: str | None = None,
) -> TextStream:
    """Generate a reply to `prompt`, yielding text pieces as they complete.

    prompt: a string, or a list of chat messages. chat: wrap it with the tokenizer's chat
    template (when it has one). Returns a TextStream; after iterating it, `.stats` holds the
    token counts, tokens per second and peak memory.
    """
    config = config or SamplingConfig()
    prompt_ids = encode_prompt(tokenizer, prompt, chat=chat, system=system)
    return TextStream(model, tokenizer, prompt_ids, config)


def generate(
    model,
    tokenizer,
    prompt,
    config: SamplingConfig | None = None,
    chat: bool = True,
    system: str | None = None,
) -> str:
    """The whole reply to `prompt` as one string; see stream_generate for the arguments."""
    return "".join(stream_generate(model, tokenizer, prompt, config, chat=chat, system=system))
