"""Load llama-architecture GGUF files (llama.cpp's format) as our MLX models, still quantised.

MLX reads GGUF itself: Q4_0, Q4_1 and Q8_0 tensors arrive as MLX affine-quantised triples
(`.weight` uint32 codes, `.scales`, `.biases`, 32 weights per group) and F32/F16 tensors as plain
arrays. We rename the tensors to the Hub's names, undo the row order llama.cpp's converter gives
the query and key projections, describe the model with a Hub-style config.json dict, and rebuild
the tokenizer from the vocabulary stored in the file. Nothing is de-quantised.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers, processors

from .errors import ModelLoadError, TokenizerError
from .loading import load_model_from_weights
from .models.base import RoPE
from .tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
SUPPORTED_TOKENIZERS = ("gpt2",)
GROUP_SIZE = 32  # every quantised GGUF block type MLX reads holds 32 weights

# GGUF tensor names -> Hub names: per decoder block, then the tensors outside the blocks.
_BLOCK_NAMES = {
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
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# llama.cpp's names (`tokenizer.ggml.pre`) for the byte-level BPE pre-tokenizers we rebuild.
PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # StarCoder's tokenizer, which SmolLM uses, gives every digit its own token.
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), PRE_TOKENIZERS["gpt-2"]()]
    ),
}


def load_gguf(path: str | os.PathLike, dtype: mx.Dtype = mx.float32):
    """Load a llama-architecture GGUF file; returns (model, tokenizer, config).

    Quantised tensors (Q4_0, Q4_1, Q8_0) stay quantised: their layers become QuantizedLinear /
    QuantizedEmbedding. `dtype` is the floating type of the scales, biases and unquantised
    tensors (GGUF stores them as float16 or float32): float32 by default because MLX's CPU
    backend computes in float32 and training is steadier in it; pass mx.float16 to save memory.
    config is the Hub-style config.json dict the model was built from, with a `quantization`
    entry in mlx-lm's format when any layer is quantised.
    """
    path = Path(path)
    tensors, metadata = read_gguf(path)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported. "
            f"Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(
            f"{path}: has per-frequency RoPE factors (rope_freqs, Llama 3.1-style long-context "
            "scaling), which GGUF loading does not support yet. Load the Hugging Face checkpoint "
            "instead."
        )
    config = gguf_config(metadata, tensors, path)
    weights = {
        name: w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w
        for name, w in hub_weights(tensors, config, path).items()
    }
    quant = quantization_config(weights)
    if quant is not None:
        config["quantization"] = quant
    model = load_model_from_weights(config, weights, source=path)
    return model, gguf_tokenizer(metadata, path), config


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict]:
    """(tensors, metadata) of a GGUF file; metadata numbers become Python ints, floats, lists."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{path}: not a GGUF file (it does not start with the bytes 'GGUF'). "
            "Pass a .gguf file written by llama.cpp, or a Hugging Face model folder."
        )
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:  # MLX's messages do not name the file
        raise ModelLoadError(
            f"{path}: could not read the GGUF file: {e}. If it is complete, check that its "
            f"tensors are of the types MLX reads: {', '.join(SUPPORTED_TENSOR_TYPES)}."
        ) from None
    return tensors, {k: _python_value(v) for k, v in metadata.items()}


def _python_value(value):
    if not isinstance(value, mx.array):
        return value  # strings and lists of strings
    if value.dtype == mx.float32 and value.ndim == 0:
        # The shortest text that reads back as the same float32: 1e-05, not 9.99999974e-06.
        return float(str(np.float32(value.item())))
    return value.tolist()


def gguf_config(metadata: dict, tensors: dict[str, mx.array], source="GGUF") -> dict:
    """A Hub-style llama config.json dict from llama.cpp's `llama.*` metadata keys."""
    arch = metadata["general.architecture"]

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
        "model_type": arch,
        "architectures": ["LlamaForCausalLM"],
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
    weights = {}
    for name, w in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK_NAMES:
            layer, kind, suffix = parts[1], parts[2], parts[3]
            if kind in ("attn_q", "attn_k"):
                key = "num_attention_heads" if kind == "attn_q" else "num_key_value_heads"
                w = _unpermute_rows(w, config[key])
            weights[f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.{suffix}"] = w
        elif len(parts) == 2 and parts[0] in _TOP_NAMES:
            weights[f"{_TOP_NAMES[parts[0]]}.{parts[1]}"] = w
        else:
            raise ModelLoadError(
                f"{source}: unexpected tensor {name!r} {tuple(w.shape)} for a llama model; "
                "the file may use a variant of the architecture this loader does not know."
            )
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


def gguf_tokenizer(metadata: dict, source) -> Tokenizer:
    """Rebuild the tokenizer stored in GGUF metadata as a `tokenizers` byte-level BPE.

    Supports llama.cpp's "gpt2" tokenizer model (byte-level BPE: GPT-2, SmolLM, StarCoder).
    The pre-tokenizer follows `tokenizer.ggml.pre`: "smollm" and "gpt-2" are rebuilt exactly;
    any other value falls back to plain GPT-2 ByteLevel splitting (with a warning), which
    matches most English text but may split digits, long numbers or contractions differently
    from the original tokenizer.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise TokenizerError(
            f"{source}: tokenizer model {kind!r} is not supported for GGUF files. Supported: "
            f"{', '.join(SUPPORTED_TOKENIZERS)} (byte-level BPE). For SentencePiece models "
            "('llama') load the Hugging Face folder, which has tokenizer.json."
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, fuse_unk=False))
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        warnings.warn(
            f"{source}: pre-tokenizer {pre!r} is not known here; splitting text as GPT-2 does, "
            "which can give different token ids than the original tokenizer for some text.",
            stacklevel=2,
        )
    backend.pre_tokenizer = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["gpt-2"])()
    backend.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special; user-defined ones (type 4) match as plain added text.
    # Both keep their ids because each is already in the vocabulary.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    )

    def token(key):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    special = {f"{k}_token": token(k) for k in ("bos", "eos", "padding", "unknown")}
    special["pad_token"] = special.pop("padding_token")
    special["unk_token"] = special.pop("unknown_token")
    backend.post_processor = _post_processor(metadata, special, vocab)
    eos_ids = [vocab[special["eos_token"]]] if special["eos_token"] else []
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot not in eos_ids:
        eos_ids.append(eot)
    config = {"clean_up_tokenization_spaces": False}
    return Tokenizer(backend, special, metadata.get("tokenizer.chat_template"), eos_ids, config)


def _post_processor(metadata: dict, special: dict, vocab: dict):
    """BOS/EOS around encoded text as the file's add_bos_token / add_eos_token ask."""
    wanted = {
        k: special[f"{k}_token"]
        for k in ("bos", "eos")
        if metadata.get(f"tokenizer.ggml.add_{k}_token") and special[f"{k}_token"]
    }
    if not wanted:
        # Byte-level post-processing only fixes offsets; the ids are those of the pre-tokenizer.
        return processors.ByteLevel(trim_offsets=False)

    def sequence(text: str, type_id: int) -> str:
        parts = [wanted.get("bos"), text, wanted.get("eos")]
        return " ".join(f"{p}:{type_id}" for p in parts if p)

    return processors.TemplateProcessing(
        single=sequence("$A", 0),
        pair=f"{sequence('$A', 0)} {sequence('$B', 1)}",
        special_tokens=[(t, vocab[t]) for t in dict.fromkeys(wanted.values())],
    )
