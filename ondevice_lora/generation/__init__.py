"""Generating text: sampling, streaming detokenised text, multi-turn chat with a reused KV cache.

text = generate(model, tokenizer, "Who wrote it?", SamplingConfig(temperature=0))
for piece in stream_generate(model, tokenizer, prompt, config):
    print(piece, end="")
session = ChatSession(model, tokenizer, config)   # keeps the cache between turns
"""

from .chat_session import ChatSession
from .generate import SamplingConfig, encode_prompt, generate, stream_generate

__all__ = ["ChatSession", "SamplingConfig", "encode_prompt", "generate", "stream_generate"]
