"""A multi-turn conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the chat template, as a from-scratch generation
would, and compares its token ids with the ids the cache holds: only the part after their
common prefix goes through the model. For most templates the previous rendering is a prefix of
the next one, so a turn prefills just its own tokens. Where it is not (a template that rewrites
earlier turns, or a reply whose text tokenizes differently from the ids that were generated),
the cache is trimmed back to the common prefix and the rest is recomputed, so the model always
sees exactly the tokens a from-scratch generation of the conversation would.

The cached keys and values depend on the weights that computed them: after the active adapters
change, the cache is dropped and the next turn prefills the whole conversation again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ..adapters.mix import Active, active_adapters, set_active
from ..errors import OndeviceLoraError
from ..models.base import make_cache
from .generate import GenerationStats, SamplingConfig, TextStream, encode_prompt


@dataclasses.dataclass
class TurnStats:
    """What one turn cost: `generation` holds its prefill (new tokens only) and decode speeds."""

    conversation_tokens: int = 0  # the rendered conversation up to the assistant's new turn
    reused_tokens: int = 0  # of those, taken from the KV cache
    generation: GenerationStats = dataclasses.field(default_factory=GenerationStats)

    @property
    def prefilled_tokens(self) -> int:
        return self.conversation_tokens - self.reused_tokens

    def summary(self) -> str:
        g = self.generation
        return (
            f"prefill: {self.prefilled_tokens} new tokens ({self.reused_tokens} of "
            f"{self.conversation_tokens} reused from the KV cache), {g.prompt_tps:.1f} tokens/s | "
            f"generation: {g.generation_tokens} tokens, {g.generation_tps:.1f} tokens/s"
        )


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with `model`: call `reply(text)` for each user turn.

    system: an optional system prompt, the first message of every rendering. The tokenizer
    must have a chat template.
    """

    def __init__(self, model, tokenizer, config: SamplingConfig, system: str | None = None):
        if tokenizer.chat_template is None:
            raise OndeviceLoraError(
                "chat needs a tokenizer with a chat template (tokenizer_config.json "
                "'chat_template' or chat_template.jinja); this model has none. Use "
                "`ondevice-lora generate --no-chat` for plain text completion."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and empty the cache."""
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.cache = make_cache(self.model)
        self.cached_ids: list[int] = []  # exactly the tokens whose keys/values the cache holds
        self.turns: list[TurnStats] = []

    def drop_cache(self) -> None:
        """Forget the cached keys and values (not the conversation): the next turn recomputes."""
        for layer in self.cache:
            layer.trim(0)
        self.cached_ids = []

    def set_adapters(self, active: Active) -> dict[str, float]:
        """set_active on the model; the cache was computed with the old weights, so it is
        dropped (unless nothing changed). Returns the active {name: weight}."""
        before = active_adapters(self.model)
        weights = set_active(self.model, active)
        if weights != before:
            self.drop_cache()
        return weights

    def reply(self, text: str) -> Iterator[str]:
        """Add a user turn and yield the assistant's reply as it is generated.

        Once the iteration ends (or is closed early, e.g. on Ctrl-C) the reply so far joins the
        conversation and `self.turns[-1]` holds the turn's statistics.
        """
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = encode_prompt(self.tokenizer, messages, chat=True)
        # At least one token must go through the model, to get the next token's logits.
        reused = min(common_prefix_length(self.cached_ids, ids), len(ids) - 1)
        for layer in self.cache:
            layer.trim(reused)
        self.cached_ids = ids[:reused]
        stream = TextStream(self.model, self.tokenizer, ids[reused:], self.config, self.cache)
        turn = TurnStats(len(ids), reused, stream.stats)
        pieces = []
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        finally:
            self.messages = [*messages, {"role": "assistant", "content": "".join(pieces)}]
            self.turns.append(turn)
            self._sync_cache(ids + stream.token_ids)

    def _sync_cache(self, fed: list[int]) -> None:
        """Record which tokens the cache holds after a generation, dropping any it holds beyond
        the known ones (the end-of-sequence token fed after the last reply token)."""
        offset = self.cache[0].offset
        self.cached_ids = fed[:offset]
        for layer in self.cache:
            layer.trim(len(self.cached_ids))
