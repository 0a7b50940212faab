"""Qwen2 / Qwen2.5 decoder: the Llama architecture with biases on the query, key and value
projections (none on the output projection), usually with tied embeddings."""

from __future__ import annotations

from dataclasses import dataclass

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen2"
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    # Qwen configs carry a sliding_window that applies only with use_sliding_window.
    use_sliding_window: bool = False

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def output_bias(self) -> bool:
        return False


class Model(llama.Model):
    pass
