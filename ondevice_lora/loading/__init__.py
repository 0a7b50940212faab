"""Loading base models: Hugging Face and mlx-lm folders, Hub ids, GGUF files, and their tokenizers.

    model, tokenizer = load()                        # the built-in SmolLM2-135M-Instruct, 4-bit
    model, tokenizer = load("path/to/folder-or.gguf", adapter="my-adapter")

Every source becomes a Hub-style config dict and Hub-named weights, and build.py turns those into
one of the model families in `ondevice_lora.models`; `convert` writes folders back out.
"""

from .build import load_model_from_weights
from .hf import load, load_config, load_gguf, load_model, resolve_model_path
from .tokenizer import Tokenizer

__all__ = [
    "Tokenizer",
    "load",
    "load_config",
    "load_gguf",
    "load_model",
    "load_model_from_weights",
    "resolve_model_path",
]
