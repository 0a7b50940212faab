"""GGUF LoRA adapters for llama.cpp (`llama-cli --lora`, `llama-server --lora`), written with
the `gguf` package; gguf_lora_read.py reads them back.

What llama.cpp's adapter loader expects, and what llama.cpp's own converter writes:
  - metadata general.type = "adapter", adapter.type = "lora", general.architecture = the
    base's GGUF architecture, adapter.lora.alpha (float32);
  - per adapted weight, "<GGUF tensor name>.lora_a" and ".lora_b" (blk.0.attn_q.weight.lora_a)
    in PEFT's orientation: numpy (r, in) and (out, r), which GGUF records as ne [in, r] and
    [r, out] (it lists dimensions innermost first);
  - llama.cpp scales by alpha / r in float32, with r read from the tensors and no rsLoRA: we
    store alpha = scale * r (so rsLoRA carries over), picking the float32 alpha whose alpha / r
    is our float32 scale: exact for power-of-two ranks and most others, else one ulp away;
  - names and layouts per family are gguf_names.py's. For the Llama-style families llama.cpp's
    converter reorders each head's query and key rows (GGML rotates adjacent feature pairs,
    Hugging Face rotates the two halves). The base GGUF's attn_q and attn_k rows are permuted,
    so lora_b's rows, which index the same outputs, must be too; lora_a indexes inputs and is
    left alone. Phi-3's fused projections (qkv_proj, gate_up_proj) are llama.cpp's attn_qkv and
    ffn_up as they are.
DoRA has no GGUF form: llama.cpp's adapters carry no magnitude vector.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ondevice_lora.adapters.files import ADAPTER_CONFIG_FILE
from ondevice_lora.adapters.layers import lora_scale
from ondevice_lora.atomic import write_atomically

from .common import (
    AdapterFormatError,
    float32_alpha_for_scale,
    layer_indices,
    read_our_adapter,
    split_layer_path,
)
from .gguf_names import PERMUTED, gguf_architecture, gguf_tensor_name, permute_rows, tensor_name_map

ADAPTER_TYPE = "lora"
LORA_A, LORA_B = "lora_a", "lora_b"  # suffixes after the GGUF tensor name


def export_gguf_lora(adapter_folder, out) -> Path:
    """Write our LoRA adapter folder as a llama.cpp GGUF LoRA file `out`; returns `out`.

    The adapter's config must record its base (adapter folders from `train` do), since the
    GGUF architecture and the Q/K head counts come from it. Tensors are stored as float32.
    """
    try:
        import gguf  # optional: only this export needs it
    except ImportError:
        raise AdapterFormatError(
            "the GGUF export needs the gguf package: pip install gguf"
        ) from None

    adapter_folder = Path(adapter_folder)
    config, base, modules = read_our_adapter(adapter_folder)
    config_path = adapter_folder / ADAPTER_CONFIG_FILE
    if config.fine_tune_type != "lora":
        raise AdapterFormatError(
            f"{config_path}: a {config.fine_tune_type} adapter has no GGUF form (llama.cpp's "
            "adapters have no magnitude vector). Fuse it into the model instead, or export it "
            "to PEFT."
        )
    architecture = (base or {}).get("architecture")
    if not architecture:
        raise AdapterFormatError(
            f'{config_path}: does not record its base model\'s architecture (no "base" entry), '
            "which the GGUF export needs (architecture name and attention head counts)."
        )
    arch = gguf_architecture(architecture.get("model_type"), config_path)
    blocks = architecture.get("num_hidden_layers") or max(layer_indices(modules)) + 1
    # gguf's own table of Hugging Face -> GGUF tensor names, the one llama.cpp's converter uses.
    names = tensor_name_map(arch, blocks)

    tensors = {}
    for path, parts in modules.items():
        gguf_name = gguf_tensor_name(names, f"{path}.weight")
        if gguf_name is None:
            raise AdapterFormatError(f"{adapter_folder}: {path} has no GGUF tensor name.")
        lora_a = np.array(parts["lora_a"], dtype=np.float32)
        lora_b = np.array(parts["lora_b"], dtype=np.float32)
        heads_field = PERMUTED.get(split_layer_path(path)[1])
        if arch.permuted_qk and heads_field:
            lora_b = permute_rows(lora_b, architecture[heads_field])
        tensors[f"{gguf_name}.{LORA_A}"] = np.ascontiguousarray(lora_a)
        tensors[f"{gguf_name}.{LORA_B}"] = np.ascontiguousarray(lora_b)

    scale = lora_scale(config.rank, config.alpha, config.use_rslora)
    alpha = float32_alpha_for_scale(scale, config.rank)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, ADAPTER_TYPE)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, value in tensors.items():
            writer.add_tensor(name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(out, write)
