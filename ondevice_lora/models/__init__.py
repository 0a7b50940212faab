"""Model families, chosen by config.json's `model_type` through one registry."""

from __future__ import annotations

from types import ModuleType

from ..errors import ModelLoadError
from . import gemma3, llama, phi3, qwen2, qwen3, smollm3

# Mistral is Llama with a sliding window on every layer (llama.ModelArgs.layer_window).
MODEL_TYPES: dict[str, ModuleType] = {
    "gemma3_text": gemma3,
    "llama": llama,
    "mistral": llama,
    "phi3": phi3,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "smollm3": smollm3,
}


def get_model_module(model_type: str | None, source: str = "config.json") -> ModuleType:
    """The module (with `ModelArgs` and `Model`) for `model_type`, or a clear error."""
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: model_type {model_type!r} is not supported. "
            f"Supported model types: {', '.join(sorted(MODEL_TYPES))}."
        )
    return MODEL_TYPES[model_type]


def build_model(config: dict, source: str = "config.json"):
    """An uninitialised-weights model for a Hub-style config dict."""
    module = get_model_module(config.get("model_type"), source)
    try:
        args = module.ModelArgs.from_dict(config)
    except ModelLoadError as error:
        # The arguments name the config key at fault; say which model it came from too.
        raise ModelLoadError(f"{source}: {error}") from None
    return module.Model(args)
