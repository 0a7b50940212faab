"""Read a llama.cpp GGUF LoRA file (ours from `export gguf-lora`, or one from llama.cpp's
convert_lora_to_gguf.py) back as our adapter folder: the inverse of gguf_lora.py.

The file says its architecture, alpha and tensors; rank, target modules and layers come from
the tensors. llama.cpp applies alpha / rank with no rsLoRA (alpha 0 or absent: scale 1), so the
adapter imports as a plain LoRA with that alpha: the same float32 scale, the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ondevice_lora.adapters.files import AdapterError, LoraConfig
from ondevice_lora.errors import format_list

from .common import (
    AdapterFormatError,
    check_and_write,
    check_distinct,
    layer_indices,
    layer_relative_paths,
    num_layers_for,
    resolve_base,
    split_layer_path,
)
from .gguf_lora import ADAPTER_TYPE, LORA_A, LORA_B
from .gguf_names import (
    PERMUTED,
    gguf_architecture,
    gguf_tensor_name,
    require_gguf,
    tensor_name_map,
    unpermute_rows,
)

GENERAL_TYPE, ADAPTER_KEY, ALPHA_KEY = "general.type", "adapter.type", "adapter.lora.alpha"


def _field(reader, key):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _read_gguf(path: Path):
    gguf = require_gguf()

    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such file (a GGUF LoRA adapter is one .gguf file).")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise AdapterFormatError(f"{path}: not a readable GGUF file ({e}).") from None


def _as_float32(tensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy in PEFT's orientation: (r, in) or (out, r)."""
    import gguf

    kind = tensor.tensor_type
    if kind == gguf.GGMLQuantizationType.F32:
        return np.array(tensor.data, dtype=np.float32)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    return gguf.quants.dequantize(np.asarray(tensor.data), kind).reshape(shape).astype(np.float32)


def import_gguf_lora(path, out, model) -> Path:
    """Turn a GGUF LoRA file into our adapter folder `out` for base `model` (a path, Hub id,
    None for the built-in model, or a loaded (model, tokenizer) pair); returns `out`.

    The file is checked against the base: its architecture, every tensor's name and shape.
    """
    path = Path(path)
    check_distinct(path, out)
    reader = _read_gguf(path)
    kind, adapter = _field(reader, GENERAL_TYPE), _field(reader, ADAPTER_KEY)
    if kind != "adapter" or adapter != ADAPTER_TYPE:
        raise AdapterFormatError(
            f"{path}: general.type is {kind!r} and adapter.type {adapter!r}; a GGUF LoRA "
            f"adapter has 'adapter' and {ADAPTER_TYPE!r}. A model GGUF is loaded with --model, "
            "not imported."
        )
    base, tokenizer = resolve_base(model)
    args = base.args
    arch = gguf_architecture(args.model_type, "the base model")
    file_arch = _field(reader, "general.architecture")
    if file_arch != arch.name:
        raise AdapterFormatError(
            f"{path}: made for a {file_arch!r} model, but the base is {arch.name!r} "
            f"({args.model_type}). Import it onto the base it was made for."
        )

    # GGUF tensor name -> our module path, for every Linear inside the base's decoder layers.
    names = tensor_name_map(arch, args.num_hidden_layers)
    ours = {}
    for module_path, _ in base.named_modules():
        if module_path.startswith("model.layers.") and module_path.count(".") >= 3:
            target = gguf_tensor_name(names, f"{module_path}.weight")
            if target is not None:
                ours[target] = module_path

    tensors, unexpected, ranks = {}, [], set()
    for tensor in reader.tensors:
        target, _, part = tensor.name.rpartition(".")
        if part not in (LORA_A, LORA_B) or target not in ours:
            unexpected.append(tensor.name)
            continue
        module_path = ours[target]
        data = _as_float32(tensor)
        if part == LORA_A:
            ranks.add(data.shape[0])
        heads_field = PERMUTED.get(split_layer_path(module_path)[1])
        if part == LORA_B and arch.permuted_qk and heads_field:
            data = unpermute_rows(data, getattr(args, heads_field))
        tensors[f"{module_path}.{part}"] = mx.array(np.ascontiguousarray(data))
    if unexpected:
        raise AdapterFormatError(
            f"{path}: tensors that are not LoRA tensors of this {arch.name} base's decoder "
            f"layers: {format_list(unexpected)}. Expected blk.<i>.<name>.weight.{LORA_A} / "
            f".{LORA_B} (LoRA on embeddings or the output head is not supported)."
        )
    if not tensors:
        raise AdapterFormatError(f"{path}: holds no LoRA tensors.")
    if len(ranks) != 1:
        raise AdapterFormatError(
            f"{path}: its matrices have ranks {sorted(ranks)}; ondevice-lora adapters have one "
            "rank for every layer."
        )
    rank = ranks.pop()
    alpha = _field(reader, ALPHA_KEY)
    modules = sorted({key.rpartition(".")[0] for key in tensors})
    try:
        config = LoraConfig(
            rank=rank,
            # llama.cpp: scale = alpha / rank, or 1 when alpha is 0 or absent.
            alpha=float(np.float32(alpha)) if alpha else float(rank),
            target_modules=layer_relative_paths(modules),
            num_layers=num_layers_for(layer_indices(modules), args.num_hidden_layers, path),
        ).validate(str(path))
    except AdapterError as e:
        raise AdapterFormatError(str(e)) from None
    return check_and_write(out, tensors, config, (base, tokenizer), str(path))
