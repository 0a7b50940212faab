"""LoRA and DoRA adapters: the layers, their files, several on one base, and folding them in.

    config = LoraConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
    apply_adapters(model, config)                     # wraps the targets; only A and B train
    save_adapter("my-adapter", model, config, base_fingerprint(model, tokenizer))
    load_adapters(model, {"a": "adapter-a", "b": "adapter-b"}, tokenizer)   # a switchable mix

layers.py holds the wrappers (W + s·B·A, DoRA's magnitude), files.py the adapter folder
(adapter_config.json, adapters.safetensors), mix.py several adapters on one base,
fingerprint.py what identifies the base an adapter belongs to, fuse.py the `fuse` command.
"""

from .files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterError,
    LoraConfig,
    apply_adapters,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from .fingerprint import base_fingerprint
from .layers import DoRALinear, LoRALinear, fuse_adapters
from .mix import active_adapters, load_adapters, set_active

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AdapterError",
    "DoRALinear",
    "LoRALinear",
    "LoraConfig",
    "active_adapters",
    "apply_adapters",
    "base_fingerprint",
    "fuse_adapters",
    "load_adapter",
    "load_adapters",
    "read_adapter_config",
    "save_adapter",
    "set_active",
]
