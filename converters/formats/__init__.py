"""Adapter formats other tools read and write: PEFT, mlx-lm and llama.cpp's GGUF LoRA.

One module per format, each with `export_<format>(adapter_folder, out, ...)` and, where the
format can be read back, `import_<format>(path, out_adapter_folder, model=...)`. Every
conversion keeps the adapter's effective scale exactly. `export_adapter` / `import_adapter`
pick the module by format name.
"""

from __future__ import annotations

from .common import AdapterFormatError
from .gguf_lora import export_gguf_lora
from .gguf_lora_read import import_gguf_lora
from .mlx_lm import export_mlx_lm, import_mlx_lm
from .peft import export_peft, import_peft

__all__ = [
    "EXPORTERS",
    "IMPORTERS",
    "AdapterFormatError",
    "export_adapter",
    "export_gguf_lora",
    "export_mlx_lm",
    "export_peft",
    "import_adapter",
    "import_gguf_lora",
    "import_mlx_lm",
    "import_peft",
]

# Format name (as the CLI spells it) -> function.
EXPORTERS = {"peft": export_peft, "mlx-lm": export_mlx_lm, "gguf-lora": export_gguf_lora}
IMPORTERS = {"peft": import_peft, "mlx-lm": import_mlx_lm, "gguf-lora": import_gguf_lora}


def _pick(table: dict, fmt: str, what: str):
    if fmt not in table:
        raise AdapterFormatError(
            f"unknown adapter format {fmt!r} to {what}; known formats: {', '.join(table)}."
        )
    return table[fmt]


def export_adapter(fmt: str, adapter_folder, out, **options):
    """Export our adapter folder to `fmt` ("peft", "mlx-lm", "gguf-lora"); returns `out`."""
    return _pick(EXPORTERS, fmt, "export to")(adapter_folder, out, **options)


def import_adapter(fmt: str, path, out, model):
    """Import a `fmt` ("peft", "mlx-lm", "gguf-lora") adapter as our adapter folder `out` for
    base `model` (a path, Hub id, None for the built-in model, or a loaded (model, tokenizer)
    pair); returns `out`."""
    return _pick(IMPORTERS, fmt, "import from")(path, out, model=model)
