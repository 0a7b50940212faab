"""Gemma 3 text decoder (Gemma 3 270M / 1B, and the text half of the larger ones).

Differs from Llama in five places, each as in the Gemma 3 report:
- every RMSNorm scales by (1 + weight), its weight stored as an offset from one;
- the embeddings are multiplied by sqrt(hidden_size) (the tied output head is not);
- a block normalises before and after each sub-layer:
  h = x + norm(attention(norm(x))), then h + norm(mlp(norm(h)));
- attention normalises each query and key head, scales scores by query_pre_attn_scalar^-1/2,
  and interleaves sliding-window layers (local, rope_local_base_freq) with global layers
  (rope_theta and rope_scaling), five to one in the released models (`layer_types`);
- the MLP is GeGLU: down(gelu_tanh(gate(x)) * up(x)).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelLoadError
from . import llama
from .base import KVCache, RoPE
from .geglu import gelu_tanh_gate


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "gemma3_text"
    hidden_size: int = 1152
    num_hidden_layers: int = 26
    intermediate_size: int = 6912
    num_attention_heads: int = 4
    num_key_value_heads: int | None = 1
    head_dim: int | None = 256
    vocab_size: int = 262144
    tie_word_embeddings: bool = True
    hidden_act: str | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 512
    sliding_window_pattern: int = 6
    rope_theta: float = 1000000.0
    rope_local_base_freq: float = 10000.0
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool | None = False

    def __post_init__(self):
        activation = self.hidden_act or self.hidden_activation
        if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ModelLoadError(
                f"config.json: hidden_activation {activation!r} is not supported for "
                "gemma3_text (only 'gelu_pytorch_tanh')."
            )
        if self.attn_logit_softcapping is not None or self.use_bidirectional_attention:
            raise ModelLoadError(
                "config.json: attn_logit_softcapping and use_bidirectional_attention are not "
                "supported for gemma3_text (the released Gemma 3 models use neither)."
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            pattern = self.sliding_window_pattern
            self.layer_types = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        llama.check_layer_types(self)
        # Hub configs: rope_theta and rope_scaling for the global layers, rope_local_base_freq
        # for the local ones; transformers 5 nests both under rope_parameters by layer type.
        nested = self.rope_parameters or {}
        self.layer_ropes = {
            "full_attention": {
                "rope_theta": self.rope_theta,
                **(self.rope_scaling or {}),
                **nested.get("full_attention", {}),
            },
            "sliding_attention": {
                "rope_theta": self.rope_local_base_freq,
                **nested.get("sliding_attention", {}),
            },
        }
        self.rope_theta = float(self.layer_ropes["full_attention"]["rope_theta"])

    def layer_window(self, index: int) -> int | None:
        sliding = self.layer_types[index] == "sliding_attention"
        return self.sliding_window if sliding else None

    def layer_rope(self, index: int) -> nn.Module:
        settings = dict(self.layer_ropes[self.layer_types[index]])
        return RoPE(self.head_dim, float(settings.pop("rope_theta")), settings)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight); the stored weight starts at zero."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, index: int = 0):
        super().__init__(args, index)
        self.scale = args.query_pre_attn_scalar**-0.5
        self.q_norm = RMSNorm(args.head_dim, eps=args.rms_norm_eps)
        self.k_norm = RMSNorm(args.head_dim, eps=args.rms_norm_eps)

    def normalize_qk(self, queries: mx.array, keys: mx.array) -> tuple[mx.array, mx.array]:
        return self.q_norm(queries), self.k_norm(keys)


class MLP(llama.MLP):
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu_tanh_gate(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, attention_class=Attention, index: int = 0):
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = attention_class(args, index)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def __call__(self, x: mx.array, mask, cache: KVCache | None = None, positions=None):
        attended = self.self_attn(self.input_layernorm(x), mask, cache, positions)
        h = x + self.post_attention_layernorm(attended)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class DecoderStack(llama.DecoderStack):
    def __init__(self, args: ModelArgs, attention_class, layer_class=DecoderLayer):
        super().__init__(args, attention_class, layer_class)
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.embed_scale = args.hidden_size**0.5

    def embed(self, inputs: mx.array) -> mx.array:
        h = self.embed_tokens(inputs)
        # transformers rounds the scale to the weights' dtype first; so do we.
        return h * mx.array(self.embed_scale, h.dtype)


class Model(llama.Model):
    attention_class = Attention
    layer_class = DecoderLayer
    stack_class = DecoderStack

    @property
    def logit_softcap(self) -> float | None:
        return self.args.final_logit_softcapping

    def output_logits(self, h: mx.array) -> mx.array:
        logits = super().output_logits(h)
        cap = self.logit_softcap
        if cap is None:
            return logits
        return mx.tanh(logits / cap) * cap
