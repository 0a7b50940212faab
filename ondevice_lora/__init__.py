"""ondevice-lora: fine-tune LoRA adapters on a 4-bit base with MLX, on your own machine."""

__version__ = "0.1.0"
