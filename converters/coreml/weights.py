"""MLX model -> numpy `DecoderWeights` for the MIL builder, at the export's precision.

int4 exports keep a quantised base exactly as MLX stores it: MLX de-quantises a code q as
scale * q + bias per group of columns, which is Core ML's constexpr_blockwise_shift_scale
scale * (q - offset) with offset = -bias / scale. 4-bit layers stay 4-bit and 8-bit ones (GGUF
Q8_0 embeddings) 8-bit; dense layers and other widths are quantised to 4 bits with mx.quantize
first (quantize_for_int4 does the same to the MLX model). Adapters stay an unmerged branch over
the untouched codes. fp16 / fp32 exports de-quantise everything and merge adapters in.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ondevice_lora.adapters.layers import DoRALinear, LoRALinear, dense_weight, replace_modules
from ondevice_lora.models import gemma3
from ondevice_lora.models.base import RoPE, longrope_settings

from .build import (
    ALL_PROJECTIONS,
    DecoderWeights,
    LayerWeights,
    LinearWeights,
    LoraBranch,
    QuantizedWeight,
)
from .settings import Precision

SUPPORTED_MODEL_TYPES = ("gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3", "smollm3")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def to_numpy(a: mx.array) -> np.ndarray:
    # numpy cannot hold bfloat16: go through float32 (exact for bf16 and fp16).
    return np.array(a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a)


def unpack_codes(packed: mx.array, bits: int = 4) -> np.ndarray:
    """MLX's packed uint32 words (rows, cols * bits / 32) -> uint8 codes (rows, cols).

    Code j of a row sits in word j // (32 / bits) at bit offset bits * (j % (32 / bits)).
    """
    words = np.array(packed).astype(np.uint32)
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    codes = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)  # (rows, words, per_word)
    return codes.reshape(words.shape[0], -1).astype(np.uint8)


def from_affine(packed: mx.array, scales: mx.array, biases: mx.array, bits: int) -> QuantizedWeight:
    """MLX's affine triple (packed codes, scales, biases) -> QuantizedWeight on the same grid."""
    codes = unpack_codes(packed, bits)
    scales, biases = to_numpy(scales), to_numpy(biases)
    rows, groups = scales.shape
    grouped = codes.reshape(rows, groups, -1)  # (rows, groups, group_size)
    # A constant group (mx.quantize gives it a scale of 0 or 1e-7, so -bias / scale would
    # overflow fp16) holds one value v = scale * code + bias: store it as code 0, scale 1,
    # offset -v, i.e. 1 * (0 + v).
    flat = (grouped == grouped[..., :1]).all(axis=-1)  # (rows, groups)
    value = scales * grouped[..., 0] + biases
    codes = np.where(flat[..., None], 0, grouped).reshape(codes.shape).astype(np.uint8)
    scales = np.where(flat, 1.0, scales)
    # Other groups far from zero relative to their spread get a large offset, which fp16 holds
    # less exactly (its error is |offset| * 2^-11 steps); trained weights straddle zero, where
    # a 4-bit offset lies in [0, 15] and the error stays under 0.4% of a step.
    offsets = np.where(flat, -value, -biases / scales)
    return QuantizedWeight(codes, scales.astype(np.float16), offsets.astype(np.float16), bits)


def keeps_codes(module: nn.Module) -> bool:
    """Whether an int4 export stores this layer's own codes: 4- and 8-bit affine layers (Core
    ML's blockwise op takes 4- and 8-bit data). An 8-bit layer (GGUF Q8_0 embeddings) stays
    8-bit, since re-quantising it would change the model its adapters were trained on."""
    quantized = isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    return quantized and module.bits in (4, 8) and module.mode == "affine"


def quantized_weight(module: nn.Module, group_size: int) -> QuantizedWeight:
    """The int4 export's grid for a linear or embedding layer: its own codes when keeps_codes(),
    else the 4-bit codes mx.quantize gives its dense weight (as quantize_for_int4 does)."""
    if keeps_codes(module):
        return from_affine(module.weight, module.scales, module.biases, module.bits)
    dense = _dense(module).astype(mx.float32)
    if dense.shape[1] % group_size:
        raise ValueError(
            f"cannot quantise a weight of {dense.shape[1]} columns in groups of {group_size}; "
            "choose a group size that divides it (32, 64 or 128 usually do)."
        )
    packed, scales, biases = mx.quantize(dense, group_size=group_size, bits=4)
    return from_affine(packed, scales, biases, 4)


def quantize_for_int4(model: nn.Module, group_size: int = 32) -> int:
    """Quantise in place, to 4 bits, every linear and embedding layer whose codes an int4
    export would not keep (dense ones, and quantised ones of other widths), with the same
    mx.quantize call the export makes. Adapter bases are included, adapters are not.

    An int4 export of the result stores its codes unchanged, so this model is the reference an
    int4 package must match. Returns the number of layers quantised.
    """
    replaced = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            if keeps_codes(module):
                continue
            embedding = isinstance(module, nn.QuantizedEmbedding)
            plain = nn.Embedding(1, 1) if embedding else nn.Linear(1, 1, bias="bias" in module)
            plain.weight = _dense(module)
            if "bias" in module:
                plain.bias = module.bias
            replaced[path] = plain.to_quantized(group_size=group_size, bits=4)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            replaced[path] = module.to_quantized(group_size=group_size, bits=4)
    replace_modules(model, replaced)
    return len(replaced)


def _dense(module: nn.Module) -> mx.array:
    if isinstance(module, nn.QuantizedEmbedding):
        return mx.dequantize(
            module.weight, module.scales, module.biases, module.group_size, module.bits
        )
    return dense_weight(module)


def lora_branch(module: LoRALinear) -> LoraBranch:
    """An adapter layer's unmerged branch as numpy constants (DoRA: with its row factor)."""
    factor = None
    if isinstance(module, DoRALinear):
        factor = to_numpy(module.magnitude / module.weight_norm())
    return LoraBranch(to_numpy(module.lora_a), to_numpy(module.lora_b), float(module.scale), factor)


def linear_weights(module: nn.Module, precision: Precision, group_size: int) -> LinearWeights:
    """A linear layer, plain, quantised or wrapped by an adapter, at `precision`."""
    if isinstance(module, LoRALinear):
        if not precision.int4:
            return linear_weights(module.fuse(dequantize=True), precision, group_size)
        lin = linear_weights(module.base, precision, group_size)
        lin.lora = lora_branch(module)
        return lin
    if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        raise ValueError(
            f"a {type(module).__name__} layer cannot be exported to Core ML; supported: Linear, "
            "QuantizedLinear, and LoRA or DoRA adapters on them"
        )
    bias = to_numpy(module.bias) if "bias" in module else None
    if precision.int4:
        return LinearWeights(quantized_weight(module, group_size), bias)
    return LinearWeights(to_numpy(_dense(module)).astype(precision.np_dtype), bias)


def rope_tables(rope, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sign-adjusted sin tables (context_length, rotated features) of one layer's
    rotary embedding (an ondevice_lora.models.base.RoPE), in float64 then cast; sin's first
    half is negated (see build.convert_rope). LongRoPE's constant is folded into both."""
    dims, theta, scaling = rope.settings()
    kind = scaling["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope scaling {kind!r} cannot be exported; supported: {ROPE_TYPES}")
    inv_freq = 1.0 / theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    positions = np.arange(context_length, dtype=np.float64)
    amplitude = 1.0
    if kind == "linear":
        positions = positions / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "longrope":
        settings = longrope_settings(dims, theta, scaling)
        if context_length > settings.original_context:
            # transformers switches to the long factors once a sequence passes the original
            # context, re-rotating every cached key: a fixed table cannot do that.
            raise ValueError(
                f"context_length {context_length} exceeds this LongRoPE model's original "
                f"context of {settings.original_context}, past which the model changes its "
                "rotary frequencies for the whole sequence; a Core ML package has one fixed "
                f"table: use --context <= {settings.original_context}."
            )
        inv_freq = 1.0 / np.array(settings.short_periods, dtype=np.float64)
        amplitude = settings.attention_factor
    angles = positions[:, None] * inv_freq[None]  # (context, dims / 2)
    cos = np.concatenate([np.cos(angles)] * 2, axis=1) * amplitude
    sin = np.concatenate([-np.sin(angles), np.sin(angles)], axis=1) * amplitude
    return cos, sin


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, the band between blended."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    wavelength = 2 * math.pi / inv_freq
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelength > old_context / low, inv_freq / factor, blended)
    return np.where(wavelength < old_context / high, inv_freq, out)


def norm_weight(module: nn.Module) -> np.ndarray:
    """The factor an RMSNorm multiplies by: its weight, or 1 + weight for Gemma's."""
    weight = to_numpy(module.weight)
    return 1.0 + weight if isinstance(module, gemma3.RMSNorm) else weight


def layer_weights(block: nn.Module, precision: Precision, group_size: int) -> LayerWeights:
    """One decoder layer of any family in ondevice_lora.models."""
    attn, mlp = block.self_attn, block.mlp
    linears = {
        name: linear_weights(getattr(part, name), precision, group_size)
        for part in (attn, mlp)
        for name in ALL_PROJECTIONS
        if name in part
    }
    optional_norms = {
        name: norm_weight(getattr(owner, name)) if name in owner else None
        for owner, names in (
            (attn, ("q_norm", "k_norm")),
            (block, ("pre_feedforward_layernorm", "post_feedforward_layernorm")),
        )
        for name in names
    }
    return LayerWeights(
        **linears,
        **optional_norms,
        input_layernorm=norm_weight(block.input_layernorm),
        post_attention_layernorm=norm_weight(block.post_attention_layernorm),
    )


def decoder_weights(
    model: nn.Module, precision: Precision, context_length: int, group_size: int = 32
) -> DecoderWeights:
    """Everything the builder needs from `model` (ours, from ondevice_lora.models)."""
    args = model.args
    if args.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {args.model_type!r} cannot be exported to Core ML; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layers, ropes = [], {}
    for index, block in enumerate(model.layers):
        layer = layer_weights(block, precision, group_size)
        layer.window = model.model.windows[index]
        rope = block.self_attn.rope
        if isinstance(rope, RoPE):
            # Layers with the same rotation share one table (Gemma 3 has two: local, global).
            key = repr(rope.settings())
            if key not in ropes:
                ropes[key] = rope_tables(rope, context_length)
            layer.rope = key
        else:
            layer.rope = None  # NoPE
        layers.append(layer)
    embed = model.model.embed_tokens
    if precision.int4:
        embedding = quantized_weight(embed, group_size)
    else:
        embedding = to_numpy(_dense(embed)).astype(precision.np_dtype)
    lm_head = None
    if not args.tie_word_embeddings:
        lm_head = linear_weights(model.lm_head, precision, group_size)
    gemma = isinstance(model, gemma3.Model)
    return DecoderWeights(
        num_heads=args.num_attention_heads,
        num_kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.rms_norm_eps,
        embedding=embedding,
        layers=layers,
        norm=norm_weight(model.model.norm),
        lm_head=lm_head,
        ropes=ropes,
        precision=precision,
        context_length=context_length,
        activation="gelu_tanh" if gemma else "silu",
        attention_scale=args.query_pre_attn_scalar**-0.5 if gemma else None,
        embed_scale=model.model.embed_scale if gemma else None,
        final_logit_softcapping=getattr(args, "final_logit_softcapping", None),
    )
