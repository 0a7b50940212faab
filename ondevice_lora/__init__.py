"""ondevice-lora: fine-tune LoRA adapters on a 4-bit base with MLX, on your own machine."""

# The public API. Imported eagerly: the function `generate` shadows the submodule of the same
# name, and a lazy import would let the two swap depending on which was imported first.
# `from ondevice_lora.generate import ...` still reaches the module.
from .generation import SamplingConfig, generate, stream_generate
from .loading import load

__version__ = "0.1.0"

__all__ = ["__version__", "load", "generate", "stream_generate", "SamplingConfig"]
