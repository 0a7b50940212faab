"""One GGUF model file for llama.cpp, Ollama and LM Studio, written with the `gguf` package's
GGUFWriter from a model we have loaded (fused or converted).

What goes in, as llama.cpp's own converter (convert_hf_to_gguf.py) writes it:
  - `<arch>.*` hyper-parameters under gguf.Keys' names, for the families in gguf_names.py;
  - the tokenizer and chat template (gguf_vocab.py);
  - every tensor under llama.cpp's name, with Llama-style Q/K rows interleaved and Gemma's norms
    stored as 1 + w (gguf_names.py). 1-D tensors (norms, biases) are F32, as llama.cpp keeps
    them. Matrices are F32, F16, BF16, Q8_0, Q4_0 or Q4_1.

Quantised types: Q8_0, Q4_0 and Q4_1 from float weights use gguf.quants' reference encoders,
which gguf-py tests byte for byte against ggml's own quantize_row_*_ref. A layer that is already
quantised in MLX on a GGML grid (affine, groups of 32, float16-exact scales and offsets, as in a
Q4_0/Q4_1/Q8_0 base fused with --requantize) keeps its codes exactly: MLX's 4-bit
w = scale * q + bias is Q4_1's w = d * q + m, and Q4_0's w = d * (q - 8) when bias = -8 * scale;
MLX's 8-bit w = scale * u + bias is Q8_0's w = d * (u - 128) when bias = -128 * scale. A matrix whose rows do not
divide into blocks of 32 falls back to F16, as llama.cpp's converter does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ondevice_lora.atomic import write_atomically
from ondevice_lora.errors import OndeviceLoraError
from ondevice_lora.loading.convert import GGUF_TYPES as TENSOR_TYPES
from ondevice_lora.models.base import _llama3_periods, dequantized_weight

from .gguf_names import (
    PERMUTED,
    gguf_architecture,
    gguf_tensor_name,
    permute_rows,
    require_gguf,
    tensor_name_map,
)
from .gguf_vocab import add_tokenizer

BLOCK = 32  # weights per Q8_0 / Q4_0 / Q4_1 block
# llama.cpp fixes these for two families (no GGUF key carries them): a model that differs
# would load and compute something else, so it is refused.
SMOLLM3_NOPE_STEP = 4  # every 4th layer has no rotation
GEMMA3_SWA_PATTERN = 6  # five sliding-window layers, then one global
GEMMA3_LOCAL_THETA = 10000.0


class GGUFExportError(OndeviceLoraError):
    """The model cannot be written as a GGUF file llama.cpp computes the same way."""


def is_gguf_path(path) -> bool:
    return str(path).lower().endswith(".gguf")


def write_gguf_model(
    out: str | os.PathLike, net: nn.Module, tokenizer, tensor_type: str | None = None, name=None
) -> Path:
    """Write `net` (one of our models) and `tokenizer` as one GGUF file `out`; returns `out`.

    tensor_type: f32, f16, bf16, q8_0, q4_0 or q4_1 for every weight matrix; None keeps each
    layer as it is: layers on a GGML grid as Q4_0/Q4_1/Q8_0, other quantised layers
    de-quantised to F16, float layers in their own dtype. The file is built beside `out` and renamed into place.
    """
    gguf = require_gguf()

    if tensor_type is not None and tensor_type not in TENSOR_TYPES:
        raise GGUFExportError(
            f"GGUF tensor type must be one of {', '.join(TENSOR_TYPES)}, got {tensor_type!r}."
        )
    out = Path(out)
    args = net.args
    arch = gguf_architecture(args.model_type, out)
    check_llama_cpp_computes_it(args, out)
    modules = dict(net.named_modules())
    names = tensor_name_map(arch, args.num_hidden_layers)
    params = dict(tree_flatten(net.parameters()))
    tensors = []  # (GGUF name, numpy data, raw GGML type or None)
    for key in params:
        layer, _, suffix = key.rpartition(".")
        if suffix in ("scales", "biases") and f"{layer}.scales" in params:
            continue  # written with their layer's weight
        target = gguf_tensor_name(names, key)
        if target is None:
            raise GGUFExportError(f"{out}: {key} has no GGUF tensor name for {arch.name}.")
        module = modules.get(layer)
        heads = _permuted_heads(arch, args, key)
        tensors.append((target, *_tensor(key, params, module, tensor_type, heads, arch)))
    tensors += _rope_tensors(args)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_name(name or out.stem)
        _add_hyperparameters(writer, args, arch.name)
        vocab_rows = params["model.embed_tokens.weight"].shape[0]
        if "model.embed_tokens.scales" in params:
            vocab_rows = params["model.embed_tokens.scales"].shape[0]
        add_tokenizer(writer, tokenizer, vocab_rows, out)
        writer.add_file_type(_file_type(tensors))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for target, data, raw in tensors:
            writer.add_tensor(target, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(out, write)


def check_llama_cpp_computes_it(args, source) -> None:
    """Refuse settings llama.cpp's graph does not read from a GGUF (it hard-codes them)."""
    problems = []
    model_type = args.model_type
    if model_type == "smollm3":
        nope = [int((i + 1) % SMOLLM3_NOPE_STEP != 0) for i in range(args.num_hidden_layers)]
        if list(args.no_rope_layers) != nope:
            problems.append(
                f"its NoPE layers {args.no_rope_layers} are not every {SMOLLM3_NOPE_STEP}th "
                "layer, which llama.cpp's smollm3 assumes"
            )
    if model_type == "gemma3_text":
        pattern = [
            "full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention"
            for i in range(args.num_hidden_layers)
        ]
        if list(args.layer_types) != pattern:
            problems.append(
                f"its layer_types are not llama.cpp's fixed pattern (every "
                f"{GEMMA3_SWA_PATTERN}th layer global)"
            )
        local = float(args.layer_ropes["sliding_attention"]["rope_theta"])
        if local != GEMMA3_LOCAL_THETA:
            problems.append(f"rope_local_base_freq {local} is not llama.cpp's {GEMMA3_LOCAL_THETA}")
        if float(args.query_pre_attn_scalar) != float(args.head_dim):
            problems.append(
                f"query_pre_attn_scalar {args.query_pre_attn_scalar} is not head_dim "
                f"{args.head_dim} (llama.cpp scales queries by head_dim ** -0.5)"
            )
    if model_type not in ("gemma3_text", "phi3") and any(
        args.layer_window(i) for i in range(args.num_hidden_layers)
    ):
        problems.append(f"llama.cpp's {model_type} has no sliding-window attention")
    scaling = _rope_scaling(args)
    if scaling is not None and scaling.get("rope_type") not in ("linear", "llama3"):
        problems.append(
            f"RoPE scaling {scaling.get('rope_type')!r} is not written here (linear and llama3 are)"
        )
    if problems:
        raise GGUFExportError(
            f"{source}: this {model_type} model would compute differently in llama.cpp: "
            + "; ".join(problems)
            + ". Export the model folder and convert it with llama.cpp's convert_hf_to_gguf.py "
            "if llama.cpp supports it."
        )


def _rope_scaling(args) -> dict | None:
    if args.model_type == "gemma3_text":
        scaling = {k: v for k, v in args.layer_ropes["full_attention"].items() if k != "rope_theta"}
    else:
        scaling = dict(getattr(args, "rope_scaling", None) or {})
    scaling.pop("rope_theta", None)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    return {**scaling, "rope_type": kind}


def _add_hyperparameters(writer, args, arch: str) -> None:
    """llama.cpp's `<arch>.*` keys, as its converter writes them for each family."""
    head_dim = args.head_dim
    writer.add_block_count(args.num_hidden_layers)
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_rope_freq_base(float(args.rope_theta))
    writer.add_vocab_size(args.vocab_size)
    # Always written, as llama.cpp's converter does for configs that name head_dim: readers'
    # defaults differ (transformers' Qwen3 assumes 128).
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rotary = head_dim
    if arch == "phi3":
        rotary = int(head_dim * args.partial_rotary_factor)
        if getattr(args, "sliding_window", None):
            writer.add_sliding_window(args.sliding_window)
    writer.add_rope_dimension_count(rotary)
    if arch == "gemma3":
        writer.add_sliding_window(args.sliding_window)
        writer.add_rope_freq_base_swa(GEMMA3_LOCAL_THETA)
        if args.final_logit_softcapping:
            writer.add_final_logit_softcapping(args.final_logit_softcapping)
    scaling = _rope_scaling(args)
    if scaling is not None and scaling["rope_type"] == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _rope_tensors(args) -> list:
    """Llama 3.1's frequency scaling, which llama.cpp reads as one divisor per rotated pair."""
    scaling = _rope_scaling(args)
    if scaling is None or scaling["rope_type"] != "llama3":
        return []
    dims, theta = args.head_dim, float(args.rope_theta)
    inv_freq = 1.0 / theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    periods = np.array(_llama3_periods(dims, theta, scaling), dtype=np.float64)
    return [("rope_freqs.weight", (periods * inv_freq).astype(np.float32), None)]


def _permuted_heads(arch, args, key: str) -> int | None:
    if not arch.permuted_qk or not key.startswith("model.layers."):
        return None
    relative = key.split(".", 3)[3].rpartition(".")[0]
    field = PERMUTED.get(relative)
    return getattr(args, field) if field else None


def _tensor(key, params, module, tensor_type, heads, arch):
    """(data, raw GGML type or None) of one parameter as llama.cpp stores it."""
    import gguf

    layer = key.rpartition(".")[0]
    if f"{layer}.scales" in params:
        carried = _carry_blocks(module, tensor_type, heads)
        if carried is not None:
            return carried
        weight = dequantized_weight(module)
        dtype = "f16"
    else:
        weight = params[key]
        dtype = {mx.float16: "f16", mx.bfloat16: "bf16"}.get(weight.dtype, "f32")
    data = np.array(weight.astype(mx.float32))
    if heads is not None:
        data = permute_rows(data, heads)
    if arch.norm_offset and key.endswith("norm.weight"):
        data = data + np.float32(arch.norm_offset)
    if data.ndim == 1:
        return np.ascontiguousarray(data, dtype=np.float32), None
    kind = tensor_type or dtype
    if kind.startswith("q") and data.shape[-1] % BLOCK:
        kind = "f16"
    if kind == "f32":
        return np.ascontiguousarray(data, dtype=np.float32), None
    if kind == "f16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    return gguf.quants.quantize(data, qtype), qtype


def _carry_blocks(module, tensor_type, heads):
    """(raw Q4_0, Q4_1 or Q8_0 blocks, type) holding exactly the quantised MLX layer's values,
    or None when its grid is not one of those."""
    import gguf

    if module.mode != "affine" or module.group_size != BLOCK or module.bits not in (4, 8):
        return None
    allowed = (None, "q8_0") if module.bits == 8 else (None, "q4_0", "q4_1")
    if tensor_type not in allowed:
        return None
    scales = np.array(module.scales.astype(mx.float32))
    biases = np.array(module.biases.astype(mx.float32))
    if not (
        np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
        and np.array_equal(biases.astype(np.float16).astype(np.float32), biases)
    ):
        return None
    # MLX packs codes into uint32s lowest bits first; as little-endian bytes they are in order.
    packed = np.array(module.weight).view(np.uint8)
    rows = packed.shape[0]
    if module.bits == 8:
        # Q8_0: w = d * q with q an int8; MLX: w = scale * u + bias with u = q + 128.
        if not np.array_equal(biases, -128 * scales):
            return None
        codes = packed.astype(np.int16) - 128
    else:
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    if heads is not None:
        codes, scales, biases = (permute_rows(a, heads) for a in (codes, scales, biases))
    groups = scales.shape[1]
    blocks = codes.reshape(rows, groups, BLOCK)
    d = scales.astype(np.float16)[..., None].view(np.uint8)  # (rows, groups, 2)
    if module.bits == 8:
        raw = np.concatenate([d, blocks.astype(np.int8).view(np.uint8)], axis=-1)
        return raw.reshape(rows, -1), gguf.GGMLQuantizationType.Q8_0
    # GGML packs a block's 32 codes as 16 bytes: code j in the low nibble, code j + 16 high.
    nibbles = (blocks[..., : BLOCK // 2] | (blocks[..., BLOCK // 2 :] << 4)).astype(np.uint8)
    if np.array_equal(biases, -8 * scales) and tensor_type != "q4_1":
        # Q4_0: w = d * (q - 8)
        raw, qtype = np.concatenate([d, nibbles], axis=-1), gguf.GGMLQuantizationType.Q4_0
    elif tensor_type == "q4_0":
        return None
    else:
        # Q4_1: w = d * q + m
        m = biases.astype(np.float16)[..., None].view(np.uint8)
        raw, qtype = np.concatenate([d, m, nibbles], axis=-1), gguf.GGMLQuantizationType.Q4_1
    return raw.reshape(rows, -1), qtype


def _file_type(tensors) -> int:
    """general.file_type: the commonest matrix type, as llama.cpp's LlamaFileType names it."""
    import gguf

    kinds = [raw if raw is not None else data.dtype for _, data, raw in tensors if data.ndim > 1]
    common = max(set(map(str, kinds)), key=[str(k) for k in kinds].count) if kinds else "float32"
    table = {
        "float32": gguf.LlamaFileType.ALL_F32,
        "float16": gguf.LlamaFileType.MOSTLY_F16,
        str(gguf.GGMLQuantizationType.BF16): gguf.LlamaFileType.MOSTLY_BF16,
        str(gguf.GGMLQuantizationType.Q8_0): gguf.LlamaFileType.MOSTLY_Q8_0,
        str(gguf.GGMLQuantizationType.Q4_0): gguf.LlamaFileType.MOSTLY_Q4_0,
        str(gguf.GGMLQuantizationType.Q4_1): gguf.LlamaFileType.MOSTLY_Q4_1,
    }
    return int(table.get(common, gguf.LlamaFileType.GUESSED))


def bits_per_weight(path) -> float:
    """Stored bits per weight of a GGUF file's tensors (for the command's summary)."""
    import gguf

    reader = gguf.GGUFReader(path)
    count = sum(math.prod(int(d) for d in t.shape) for t in reader.tensors)
    return 8 * sum(int(t.n_bytes) for t in reader.tensors) / max(count, 1)
