"""Qwen3 decoder: the Llama architecture plus an RMSNorm over each query and key head
(before the rotation), which keeps attention logits bounded; no projection biases."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen3"
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    # Qwen configs carry a sliding_window that applies only with use_sliding_window.
    use_sliding_window: bool = False


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, index: int = 0):
        super().__init__(args, index)
        self.q_norm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)

    def normalize_qk(self, queries: mx.array, keys: mx.array) -> tuple[mx.array, mx.array]:
        # queries, keys: (B, L, heads, head_dim); the norm runs over head_dim.
        return self.q_norm(queries), self.k_norm(keys)


class Model(llama.Model):
    attention_class = Attention
