"""GGUF files (llama.cpp's format): the reader, the tensors as Hub-named weights, the tokenizer.

Nothing here builds a model: `read_gguf_model` returns (config, weights, tokenizer), and
`ondevice_lora.loading.load_gguf` builds the model from them like any other source.
"""

from .model import ARCHITECTURES, SUPPORTED_ARCHITECTURES, read_gguf, read_gguf_model
from .reader import SUPPORTED_TYPES, GGUFFile
from .tokenizer import gguf_tokenizer

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TYPES",
    "GGUFFile",
    "gguf_tokenizer",
    "read_gguf",
    "read_gguf_model",
]
