"""Phi-3 / Phi-3.5 / Phi-4-mini decoder: the Llama architecture with the query, key and value
projections fused into one `qkv_proj` and the MLP's gate and up projections into one
`gate_up_proj`, as the checkpoints store them (so adapters on them have PEFT's names and
shapes). Phi-4-mini rotates only part of each head (`partial_rotary_factor`), and the long
context models use LongRoPE (`rope_scaling` of type longrope, or su in older configs).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .base import RoPE


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "phi3"
    rms_norm_eps: float = 1e-5
    vocab_size: int = 32064
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        scaling = dict(self.rope_scaling or {})
        # transformers 5 nests the rotated fraction in rope_parameters.
        self.partial_rotary_factor = scaling.pop(
            "partial_rotary_factor", self.partial_rotary_factor
        )
        if scaling.get("rope_type", scaling.get("type")) in ("su", "yarn", "longrope"):
            scaling["rope_type"] = "longrope"
            scaling.setdefault(
                "original_max_position_embeddings", self.original_max_position_embeddings
            )
            scaling.setdefault("max_position_embeddings", self.max_position_embeddings)
        self.rope_scaling = scaling or None

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_rope(self, index: int) -> nn.Module:
        return RoPE(self.rotary_dims, self.rope_theta, self.rope_scaling)


class Attention(llama.Attention):
    """Grouped-query attention whose q, k and v come from one fused projection."""

    def __init__(self, args: ModelArgs, index: int = 0):
        nn.Module.__init__(self)
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        fused = (self.n_heads + 2 * self.n_kv_heads) * args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, fused, bias=False)
        self.o_proj = nn.Linear(self.n_heads * args.head_dim, args.hidden_size, bias=False)
        self.rope = args.layer_rope(index)

    def project_qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        B, L, _ = x.shape
        # Rows of qkv_proj: all query heads, then the key heads, then the value heads.
        q_end = self.n_heads * self.head_dim
        k_end = q_end + self.n_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        queries = qkv[..., :q_end].reshape(B, L, self.n_heads, -1)
        keys = qkv[..., q_end:k_end].reshape(B, L, self.n_kv_heads, -1)
        values = qkv[..., k_end:].reshape(B, L, self.n_kv_heads, -1)
        return queries, keys, values


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused: the first half of gate_up_proj's rows is
    the gate, the second half the up projection."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


class DecoderLayer(llama.DecoderLayer):
    mlp_class = MLP


class Model(llama.Model):
    attention_class = Attention
    layer_class = DecoderLayer
    default_lora_targets = ("qkv_proj",)

    @property
    def rope_switch_length(self) -> int | None:
        """With LongRoPE, the sequence length past which the long factors apply to every
        position (generation then re-feeds the sequence); None otherwise."""
        scaling = self.args.rope_scaling or {}
        if scaling.get("rope_type") != "longrope":
            return None
        return scaling["original_max_position_embeddings"]
