"""SmolLM3 decoder: the Llama architecture with rotary positions left out of every
`no_rope_layer_interval`-th layer (NoPE), so those layers attend by content alone and the
model extrapolates to long contexts more gracefully."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from . import llama
from .base import NoRoPE


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "smollm3"
    rope_theta: float = 2000000.0
    tie_word_embeddings: bool = True
    use_sliding_window: bool = False
    # no_rope_layers[i] is 1 where layer i rotates, 0 where it is a NoPE layer; when absent,
    # every no_rope_layer_interval-th layer (counting from 1) is NoPE, as transformers does.
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.no_rope_layers is None:
            self.no_rope_layers = [
                int((i + 1) % self.no_rope_layer_interval != 0)
                for i in range(self.num_hidden_layers)
            ]

    def layer_rope(self, index: int) -> nn.Module:
        return super().layer_rope(index) if self.no_rope_layers[index] else NoRoPE()


class Model(llama.Model):
    """Llama's model: only the arguments differ (layer_rope gives NoPE layers no rotation)."""
