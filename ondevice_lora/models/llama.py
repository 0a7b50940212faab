"""Llama decoder (Llama 2/3.x, SmolLM2, TinyLlama, Mistral).

Pre-norm transformer: x + Attention(RMSNorm(x)), then x + SwiGLU-MLP(RMSNorm(x)); grouped-query
attention with rotary positions, over every earlier position or, in sliding-window layers
(Mistral), over the last `sliding_window` of them. Qwen2, Qwen3, SmolLM3, Phi-3 and Gemma 3
reuse these blocks with their own changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..backend.cpu_attention import scaled_dot_product_attention
from ..errors import ModelLoadError
from .base import (
    BaseModelArgs,
    KVCache,
    RoPE,
    make_attention_mask,
    make_segment_mask,
    rope_settings,
)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "llama"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Sliding-window attention: Mistral windows every layer; Qwen2 and SmolLM3 only with
    # use_sliding_window, and only the layers `layer_types` (or Qwen2's max_window_layers) say.
    sliding_window: int | None = None
    use_sliding_window: bool | None = None
    layer_types: list[str] | None = None
    max_window_layers: int | None = None

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ModelLoadError(
                f"config.json: hidden_act {self.hidden_act!r} is not supported for "
                f"{self.model_type} (only 'silu')."
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.rope_theta, self.rope_scaling = rope_settings(
            self.rope_theta, self.rope_scaling, self.rope_parameters
        )
        check_layer_types(self)

    def layer_window(self, index: int) -> int | None:
        """Layer `index`'s attention window, or None where it attends to every position."""
        if self.sliding_window is None or self.use_sliding_window is False:
            return None
        if self.layer_types is not None:
            sliding = self.layer_types[index] == "sliding_attention"
        elif self.max_window_layers is not None:
            sliding = index >= self.max_window_layers
        else:
            sliding = True
        return self.sliding_window if sliding else None

    def layer_rope(self, index: int) -> nn.Module:
        """Layer `index`'s positional rotation (SmolLM3 turns it off in some layers)."""
        return RoPE(self.head_dim, self.rope_theta, self.rope_scaling)

    # Which projections carry a bias; Qwen2 differs here and nowhere else.
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def output_bias(self) -> bool:
        return self.attention_bias


def check_layer_types(args) -> None:
    """A clear error for a `layer_types` list that does not give one entry per layer."""
    types = args.layer_types
    if types is not None and len(types) != args.num_hidden_layers:
        raise ModelLoadError(
            f"config.json: layer_types has {len(types)} entries for num_hidden_layers "
            f'{args.num_hidden_layers}; it needs one per layer ("sliding_attention" or '
            '"full_attention").'
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, index: int = 0):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        head_dim = args.head_dim
        self.scale = head_dim**-0.5
        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=args.output_bias)
        self.rope = args.layer_rope(index)

    def normalize_qk(self, queries: mx.array, keys: mx.array) -> tuple[mx.array, mx.array]:
        """Hook for families that normalise queries and keys before the rotation (Qwen3)."""
        return queries, keys

    def project_qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries (B, L, heads, head_dim), keys and values (B, L, kv_heads, head_dim); Phi-3
        computes them with one fused projection instead."""
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        return queries, keys, values

    def __call__(self, x: mx.array, mask, cache: KVCache | None = None, positions=None):
        B, L, _ = x.shape
        queries, keys, values = self.project_qkv(x)
        queries, keys = self.normalize_qk(queries, keys)
        # (B, L, heads, head_dim) -> (B, heads, L, head_dim)
        queries = queries.transpose(0, 2, 1, 3)
        keys = keys.transpose(0, 2, 1, 3)
        values = values.transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset, positions=positions)
        keys = self.rope(keys, offset=offset, positions=positions)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)

        # Grouped-query attention: the kernel shares each KV head across its query heads. On CPU
        # long inputs go block by block, skipping the masked-out half (backend/cpu_attention.py).
        out = scaled_dot_product_attention(queries, keys, values, self.scale, mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, heads * head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=args.mlp_bias)
        self.up_proj = nn.Linear(dim, hidden, bias=args.mlp_bias)
        self.down_proj = nn.Linear(hidden, dim, bias=args.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    mlp_class = MLP

    def __init__(self, args: ModelArgs, attention_class=Attention, index: int = 0):
        super().__init__()
        self.self_attn = attention_class(args, index)
        self.mlp = self.mlp_class(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache: KVCache | None = None, positions=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    """The `model.` part of a Hub checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, args: ModelArgs, attention_class, layer_class=DecoderLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [layer_class(args, attention_class, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.windows = [args.layer_window(i) for i in range(args.num_hidden_layers)]

    def embed(self, inputs: mx.array) -> mx.array:
        return self.embed_tokens(inputs)

    def __call__(
        self, inputs: mx.array, cache=None, padding_mask=None, position_ids=None, segment_ids=None
    ) -> mx.array:
        h = self.embed(inputs)
        offset = cache[0].offset if cache is not None else 0
        # One mask per distinct window (full attention is the window None), shared by layers.
        masks = {}
        for window in set(self.windows):
            if segment_ids is None:
                masks[window] = make_attention_mask(
                    inputs.shape[1], offset, padding_mask, h.dtype, window
                )
            else:
                masks[window] = make_segment_mask(segment_ids, h.dtype, window)
        layer_caches = cache or [None] * len(self.layers)
        for layer, window, layer_cache in zip(self.layers, self.windows, layer_caches):
            h = layer(h, masks[window], layer_cache, position_ids)
        return self.norm(h)


class Model(nn.Module):
    attention_class = Attention
    layer_class = DecoderLayer
    stack_class = DecoderStack
    # LoRA targets when the configuration names none (PEFT's defaults for the family).
    default_lora_targets = ("q_proj", "v_proj")

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = self.stack_class(args, self.attention_class, self.layer_class)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: list[KVCache] | None = None,
        attention_mask: mx.array | None = None,
        position_ids: mx.array | None = None,
        segment_ids: mx.array | None = None,
    ) -> mx.array:
        """inputs: (B, L) token ids -> logits (B, L, vocab_size).

        For packed rows (several examples per row, see data.packing): position_ids (B, L),
        each example's positions counting from 0, and segment_ids (B, L), equal within one
        example, which confine attention to each example. Both are for training: they do not
        combine with a cache or a padding mask. Without them the fast path runs unchanged.
        """
        if (position_ids is not None or segment_ids is not None) and (
            cache is not None or attention_mask is not None
        ):
            raise ValueError(
                "position_ids and segment_ids describe packed training rows; they cannot be "
                "combined with a KV cache or an attention_mask"
            )
        h = self.model(inputs, cache, attention_mask, position_ids, segment_ids)
        return self.output_logits(h)

    # Gemma's final_logit_softcapping: logits = cap * tanh(z / cap); None: none.
    logit_softcap: float | None = None

    def output_logits(self, h: mx.array) -> mx.array:
        """The output head alone: hidden states (..., hidden_size) -> logits (..., vocab_size).
        Generation calls it on the last position only; training's loss reads the head's
        weight through output_layer instead (training.chunked_loss)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def output_layer(self) -> nn.Module:
        """The layer whose (vocab_size, hidden_size) weight is the output head: the embedding
        when tied, else lm_head. output_logits is this layer's map, then logit_softcap."""
        return self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head

    @property
    def layers(self):
        return self.model.layers

    def sanitize(self, weights: dict) -> dict:
        """Drop what Hub checkpoints carry but the model does not use."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            # Some tied checkpoints also store the head; it is the embedding again.
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights
