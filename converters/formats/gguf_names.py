"""What llama.cpp calls our model families and their tensors, declared once for the GGUF model
writer (gguf_model.py) and the GGUF LoRA export and import (gguf_lora.py).

Tensor names come from the `gguf` package's own Hugging Face -> GGUF table
(`gguf.get_tensor_name_map`), the one llama.cpp's converters use. What that table does not say is
how llama.cpp's converter reshapes a family's tensors; that is here:
  - the Llama-style families (llama, mistral, smollm3) have each head's query and key rows
    interleaved (GGML rotates adjacent feature pairs; Hugging Face rotates the two halves);
    the NEOX-rotation families (Qwen, Phi-3, Gemma) keep the Hub's order;
  - Gemma stores its (1 + w) norms as 1 + w.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .common import AdapterFormatError


@dataclasses.dataclass(frozen=True)
class GGUFArchitecture:
    """How one of our model families is written for llama.cpp."""

    name: str  # general.architecture
    permuted_qk: bool = False
    norm_offset: float = 0.0


# Our model_type -> llama.cpp's architecture. Mistral checkpoints convert as llama.
ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", permuted_qk=True),
    "mistral": GGUFArchitecture("llama", permuted_qk=True),
    "smollm3": GGUFArchitecture("smollm3", permuted_qk=True),
    "qwen2": GGUFArchitecture("qwen2"),
    "qwen3": GGUFArchitecture("qwen3"),
    "phi3": GGUFArchitecture("phi3"),
    "gemma3_text": GGUFArchitecture("gemma3", norm_offset=1.0),
}
# Path inside a decoder layer -> the ModelArgs field with its number of heads, for the rows
# llama.cpp permutes.
PERMUTED = {
    "self_attn.q_proj": "num_attention_heads",
    "self_attn.k_proj": "num_key_value_heads",
}


def require_gguf():
    """The gguf package, or a clear error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise AdapterFormatError(
            "GGUF files are written and read with the gguf package, a dependency of "
            "ondevice-lora that is missing here: pip install gguf."
        ) from None
    return gguf


def gguf_architecture(model_type: str | None, source) -> GGUFArchitecture:
    if model_type not in ARCHITECTURES:
        raise AdapterFormatError(
            f"{source}: model_type {model_type!r} has no GGUF form here; supported: "
            f"{', '.join(ARCHITECTURES)}."
        )
    return ARCHITECTURES[model_type]


def tensor_name_map(architecture: GGUFArchitecture, blocks: int):
    """gguf's Hugging Face -> GGUF tensor-name table for `architecture` with `blocks` layers."""
    gguf = require_gguf()

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture.name)
    return gguf.get_tensor_name_map(arch, blocks)


def gguf_tensor_name(names, hub_name: str) -> str | None:
    """ "model.layers.0.self_attn.q_proj.weight" -> "blk.0.attn_q.weight" (None: no GGUF name)."""
    return names.get_name(hub_name, try_suffixes=(".weight", ".bias"))


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from Hugging Face's halves to GGML's adjacent pairs.

    Only whole rows move, so it applies alike to weights, biases, LoRA B matrices and the rows
    of quantised codes and scales.
    """
    head_dim = w.shape[0] // n_heads
    # (rows, ...) -> (heads, 2, head_dim/2, ...) -> (heads, head_dim/2, 2, ...) -> (rows, ...)
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of permute_rows."""
    head_dim = w.shape[0] // n_heads
    # (rows, ...) -> (heads, head_dim/2, 2, ...) -> (heads, 2, head_dim/2, ...) -> (rows, ...)
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
