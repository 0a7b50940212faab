"""Load GGUF files (llama.cpp's format) as our MLX models, still quantised where MLX can hold it.

`reader` parses the file and decodes its blocks. Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K and Q8_0
tensors become MLX affine-quantised triples (`.weight` uint32 codes, `.scales`, `.biases`, 32
weights per group) with the same values; Q2_K, Q3_K, Q6_K, IQ4_NL and IQ4_XS are de-quantised
(a note says how many and what it costs). We rename the
tensors to the Hub's names, undo the row order llama.cpp's converter gives Llama's query and key
projections, describe the model with a Hub-style config.json dict, and rebuild the tokenizer
from the vocabulary stored in the file (byte-level BPE or SentencePiece).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from ...errors import ModelLoadError
from ...models.base import RoPE, _llama3_periods
from .reader import (
    BLOCKS,
    GROUP_SIZE,
    KEPT_QUANTISED,
    WHY_DEQUANTISED,
    GGUFFile,
    decode_affine,
    decode_float,
)
from .tokenizer import gguf_tokenizer

# GGUF tensor names -> Hub names: per decoder block, then the tensors outside the blocks.
_LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 3 normalises each sub-layer's input and output: four norms a block.
_GEMMA3_BLOCK = {
    **_LLAMA_BLOCK,
    **_QK_NORMS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps its fused projections; llama.cpp's ffn_up holds gate_up_proj (gate rows first).
_PHI3_BLOCK = {
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one llama.cpp architecture maps onto one of our model families."""

    model_type: str
    hf_class: str
    block_names: dict
    # llama.cpp's Llama converter interleaves Q/K rows for GGML's adjacent-pair rotation; the
    # NEOX-rotation families (Qwen, Gemma, Phi-3) are stored in the Hub's order.
    permuted_qk: bool = False
    norm_offset: float = 0.0  # Gemma stores its (1 + w) norms as 1 + w: subtract to get w


ARCHITECTURES = {
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM", _GEMMA3_BLOCK, norm_offset=1.0),
    "llama": Architecture("llama", "LlamaForCausalLM", _LLAMA_BLOCK, permuted_qk=True),
    "phi3": Architecture("phi3", "Phi3ForCausalLM", _PHI3_BLOCK),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", _LLAMA_BLOCK),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", {**_LLAMA_BLOCK, **_QK_NORMS}),
    # llama.cpp's SmolLM3 is Llama with no rotation in every 4th layer, a step it hard-codes
    # (no GGUF key); SmolLM3's ModelArgs default no_rope_layer_interval is the same 4.
    "smollm3": Architecture("smollm3", "SmolLM3ForCausalLM", _LLAMA_BLOCK, permuted_qk=True),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}


def read_gguf_model(path: str | os.PathLike, dtype: mx.Dtype = mx.float32):
    """Read a GGUF file as a model's parts; returns (config, weights, tokenizer).

    Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K and Q8_0 tensors stay quantised: (weight, scales,
    biases) triples that loading/build.py makes QuantizedLinear / QuantizedEmbedding layers of.
    Q2_K, Q3_K, Q6_K, IQ4_NL and IQ4_XS tensors are de-quantised, with a note on stderr. `dtype`
    is the floating type of the scales, biases and unquantised tensors: float32 by default, which
    holds every GGUF block type's scales exactly and in which MLX's CPU backend computes; pass
    mx.float16 to save memory. config is the Hub-style config.json dict the model was built
    from, with a `quantization` entry in mlx-lm's format when any layer is quantised.
    """
    path = Path(path)
    gguf = GGUFFile(path)
    metadata = gguf.metadata
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported. "
            f"Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    gguf.check_types()
    tensors = read_tensors(gguf, dtype)
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    config = gguf_config(metadata, tensors, path)
    if "rope_factors_short.weight" in tensors:  # Phi-3 long-context models: LongRoPE
        config["rope_scaling"] = longrope_scaling(metadata, tensors, config)
    if rope_freqs is not None and not np.allclose(np.array(rope_freqs), 1.0):
        config["rope_scaling"] = llama3_scaling_from_factors(np.array(rope_freqs), config, path)
    weights = {
        name: w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w
        for name, w in hub_weights(tensors, config, path).items()
    }
    quant = quantization_config(weights)
    if quant is not None:
        config["quantization"] = quant
    return config, weights, gguf_tokenizer(metadata, path)


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict]:
    """(tensors, metadata) of a GGUF file; metadata numbers are Python ints, floats, lists."""
    gguf = GGUFFile(Path(path))
    gguf.check_types()
    return read_tensors(gguf), gguf.metadata


def read_tensors(gguf: GGUFFile, dtype: mx.Dtype = mx.float32) -> dict[str, mx.array]:
    """Every tensor as MLX arrays: kept-quantised ones as (weight, scales, biases) triples.
    `dtype` is only for the note's memory figure: de-quantised tensors will be held in it."""
    tensors, dequantised, stored = {}, Counter(), Counter()
    for name, t in gguf.tensors.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if t.type_name in KEPT_QUANTISED and base is not None and len(t.shape) == 2:
            codes, scales, biases, _ = decode_affine(t)
            tensors[name] = mx.array(codes)
            tensors[f"{base}.scales"] = mx.array(scales)
            tensors[f"{base}.biases"] = mx.array(biases)
            continue
        if t.type_name not in ("F32", "F16", "BF16"):
            dequantised[t.type_name] += 1
            stored[t.type_name] += t.data.nbytes
        tensors[name] = mx.array(decode_float(t))
    if dequantised:
        print(dequantised_note(gguf, dequantised, stored, dtype), file=sys.stderr)
    return tensors


def dequantised_note(gguf: GGUFFile, counts: Counter, stored: Counter, dtype: mx.Dtype) -> str:
    """One line: how many tensors of which types were de-quantised, why, and the memory cost."""
    kinds = ", ".join(
        f"{n} {kind} ({WHY_DEQUANTISED.get(kind, 'not an affine grid of 32')})"
        for kind, n in sorted(counts.items())
    )
    before = sum(stored.values())
    # Weights = bytes / block bytes * weights per block; as floats each takes dtype.size bytes.
    weights = sum(stored[kind] // BLOCKS[kind][1] * BLOCKS[kind][0] for kind in stored)
    after = weights * dtype.size
    return (
        f"note: {gguf.path.name}: de-quantised {sum(counts.values())} tensor(s) to "
        f"{str(dtype).removeprefix('mlx.core.')}, as MLX's affine grid (groups of 32 or more) "
        f"cannot hold them exactly: {kinds}. They take {after / 2**20:.1f} MiB in memory "
        f"instead of {before / 2**20:.1f} MiB in the file (+{(after - before) / 2**20:.1f} MiB)."
    )


def llama3_scaling_from_factors(factors: np.ndarray, config: dict, source) -> dict:
    """The Hub's llama3 `rope_scaling` that gives llama.cpp's per-frequency `rope_freqs`.

    llama.cpp's converter stores Llama 3.1's scaling as one divisor per rotated pair. Between
    the two wavelength thresholds the divisor's inverse is linear in 1/wavelength, so only two
    combinations of (original context, low and high frequency factors) matter; Meta's own values
    (low 1, high 4, original context 8192) are tried first, else they are solved from the band.
    """
    dims, theta = config["head_dim"], config["rope_theta"]
    inv_freq = 1.0 / theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    factor = float(factors.max())
    candidates = [(1.0, 4.0, 8192)]
    wavelength = 2 * math.pi / inv_freq
    band = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if band.sum() >= 2:
        # 1/f = (1 - s)/factor + s with s = old / (wl (high - low)) - low / (high - low).
        s = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelength[band], s, 1)
        # With low = 1: intercept = -1 / (high - 1), slope = old / (high - 1).
        high = 1 - 1 / intercept
        candidates.append((1.0, float(high), float(slope * (high - 1))))
    for low, high, old in candidates:
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": old,
        }
        periods = np.array(_llama3_periods(dims, theta, scaling), dtype=np.float64)
        if np.allclose(periods * inv_freq, factors, rtol=1e-5):
            return scaling
    raise ModelLoadError(
        f"{source}: its rope_freqs tensor (per-frequency RoPE divisors, {factors.round(3)}) is "
        "not Llama 3.1-style frequency scaling, the only kind this loader maps. Load the "
        "Hugging Face checkpoint instead."
    )


def longrope_scaling(metadata: dict, tensors: dict[str, mx.array], config: dict) -> dict:
    """Phi-3's `rope_scaling` (longrope) from llama.cpp's rope_factors_short / _long tensors
    (removed from `tensors`) and its rope.scaling metadata."""
    arch = metadata["general.architecture"]
    short = np.array(tensors.pop("rope_factors_short.weight"), dtype=np.float64)
    long = np.array(tensors.pop("rope_factors_long.weight", mx.array(short)), dtype=np.float64)
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    original = original or config["max_position_embeddings"]
    scaling = {
        "rope_type": "longrope",
        "short_factor": short.tolist(),
        "long_factor": long.tolist(),
        "original_max_position_embeddings": original,
        "max_position_embeddings": config["max_position_embeddings"],
    }
    attention_factor = metadata.get(f"{arch}.rope.scaling.attn_factor")
    if attention_factor is not None:
        scaling["attention_factor"] = attention_factor
    config["original_max_position_embeddings"] = original
    return scaling


def _gemma3_config(config: dict, get) -> None:
    """Gemma 3's keys: llama.cpp scales queries by head_dim ** -0.5 (query_pre_attn_scalar =
    head_dim, true of the released 270M to 12B models) and windows five layers in six unless
    the file gives a pattern (a period, or one flag per layer)."""
    del config["hidden_act"]
    config["hidden_activation"] = "gelu_pytorch_tanh"
    config["query_pre_attn_scalar"] = config["head_dim"]
    config["sliding_window"] = get("attention.sliding_window", 4096)
    config["rope_local_base_freq"] = get("rope.freq_base_swa", 10000.0)
    pattern = get("attention.sliding_window_pattern", 6)
    layers = config["num_hidden_layers"]
    if isinstance(pattern, list):
        flags = [bool(f) for f in pattern]
    else:
        flags = [(i + 1) % pattern != 0 for i in range(layers)]
    config["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags]
    cap = get("final_logit_softcapping")
    if cap:
        config["final_logit_softcapping"] = cap


def _phi3_config(config: dict, get) -> None:
    """Phi-3's keys: rope.dimension_count is the rotated part of each head (Phi-4-mini: 3/4)."""
    heads = config["num_attention_heads"]
    config["head_dim"] = get("attention.key_length") or config["hidden_size"] // heads
    rotary = get("rope.dimension_count") or config["head_dim"]
    config["partial_rotary_factor"] = rotary / config["head_dim"]
    window = get("attention.sliding_window")
    if window:
        config["sliding_window"] = window


def gguf_config(metadata: dict, tensors: dict[str, mx.array], source="GGUF") -> dict:
    """A Hub-style config.json dict from llama.cpp's `<architecture>.*` metadata keys."""
    arch = metadata["general.architecture"]
    family = ARCHITECTURES[arch]

    def get(key, default=None):
        return metadata.get(f"{arch}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = get("vocab_size") or (
        len(tokens) if tokens else tensors["token_embd.weight"].shape[0]
    )
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    config = {
        "model_type": family.model_type,
        "architectures": [family.hf_class],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 2048),
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensors,
        # llama.cpp writes no output tensor when the head shares the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none") and scaling not in RoPE.SCALING_TYPES:
        raise ModelLoadError(
            f"{source}: RoPE scaling {scaling!r} is not supported; "
            f"supported: {', '.join(RoPE.SCALING_TYPES)}."
        )
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": get("rope.scaling.factor")}
        if get("rope.scaling.original_context_length"):
            original = get("rope.scaling.original_context_length")
            config["rope_scaling"]["original_max_position_embeddings"] = original
    for key in ("bos_token_id", "eos_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = value
    if arch == "gemma3":
        _gemma3_config(config, get)
    elif arch == "phi3":
        _phi3_config(config, get)
    return config


def _unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's per-head row interleaving of the query or key projection.

    The converter turns each head's rows from Hugging Face's [first halves; second halves] of
    the rotary pairs into interleaved pairs (GGML rotates adjacent features). Only whole rows
    move, so the same permutation applies to quantised codes, scales, biases and a 1-D bias.
    """
    head_dim = w.shape[0] // n_heads
    # (rows, ...) -> (heads, head_dim/2, 2, ...) -> (heads, 2, head_dim/2, ...) -> (rows, ...)
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hub_weights(tensors: dict[str, mx.array], config: dict, source) -> dict[str, mx.array]:
    """Rename GGUF tensors to Hub parameter names and restore the Hub's Q/K row order."""
    family = _BY_MODEL_TYPE[config["model_type"]]
    weights = {}
    for name, w in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in family.block_names:
            layer, kind, suffix = parts[1], parts[2], parts[3]
            if family.permuted_qk and kind in ("attn_q", "attn_k"):
                key = "num_attention_heads" if kind == "attn_q" else "num_key_value_heads"
                w = _unpermute_rows(w, config[key])
            hub = f"model.layers.{layer}.{family.block_names[kind]}.{suffix}"
        elif len(parts) == 2 and parts[0] in _TOP_NAMES:
            hub = f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise ModelLoadError(
                f"{source}: unexpected tensor {name!r} {tuple(w.shape)} for a "
                f"{config['model_type']} model; the file may use a variant of the architecture "
                "this loader does not know."
            )
        if family.norm_offset and hub.endswith("norm.weight"):
            w = w - family.norm_offset
        weights[hub] = w
    return weights


def quantization_config(weights: dict[str, mx.array]) -> dict | None:
    """mlx-lm's `quantization` entry for these weights: the commonest bit width globally,
    {group_size, bits} for layers that differ, and False for layers stored unquantised."""
    bits = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            layer = name[: -len(".scales")]
            # Each uint32 packs 32/bits codes: columns = weight.shape[1] * 32 / bits.
            columns = scales.shape[1] * GROUP_SIZE
            bits[layer] = weights[f"{layer}.weight"].shape[1] * 32 // columns
    if not bits:
        return None
    common = Counter(bits.values()).most_common(1)[0][0]
    quant = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
    for layer, b in sorted(bits.items()):
        if b != common:
            quant[layer] = {"group_size": GROUP_SIZE, "bits": b}
    for name, w in sorted(weights.items()):
        layer = name[: -len(".weight")]
        if name.endswith(".weight") and w.ndim == 2 and layer not in bits:
            quant[layer] = False
    return quant
