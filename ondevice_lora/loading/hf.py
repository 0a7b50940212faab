"""Load a base model from a Hugging Face folder, an mlx-lm quantised folder, a Hub id or a GGUF."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelLoadError, OndeviceLoraError
from ..models import get_model_module
from .build import load_model_from_weights
from .weights import load_weights, read_json

# Files a model folder needs; weights of other formats (.bin, .pth, .gguf) are not fetched.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A local folder or file for `name`: a path if it exists, else a Hub id fetched or cached.

    The Hub is contacted only for a name that is not a local path, and never when HF_HUB_OFFLINE
    is set: then only the local cache answers.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    text = str(name)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith(".gguf"):
        raise ModelLoadError(
            f"{text}: no such file or folder (and not a Hub id of the form 'org/name')."
        )
    return _snapshot(text)


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline))
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{repo_id}: not in the local Hugging Face cache"
            + (" and HF_HUB_OFFLINE is set" if offline else ", and the Hub could not be reached")
            + ". Download it once with network access, or pass a local folder."
        ) from None
    except HfHubHTTPError as e:
        raise ModelLoadError(f"{repo_id}: the Hugging Face Hub refused it: {e}") from None


def load_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise ModelLoadError(
            f"{folder}: no config.json. Expected a Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer.json) or a .gguf file."
        )
    return read_json(path)


def load_model(folder: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load the model of a Hugging Face or mlx-lm folder; returns (model, config)."""
    folder = Path(folder)
    config = load_config(folder)
    # Check model_type before reading the weights, and name the file that holds it.
    get_model_module(config.get("model_type"), source=str(folder / "config.json"))
    model = load_model_from_weights(config, load_weights(folder), source=folder)
    return model, config


def load_gguf(path: str | os.PathLike, dtype: mx.Dtype = mx.float32):
    """Load a GGUF file; returns (model, tokenizer, config).

    Layers stored in a 4-bit or 8-bit type MLX holds exactly stay quantised; `dtype` is the type
    of everything floating (see gguf.read_gguf_model). config is the Hub-style config.json dict
    the model was built from, with mlx-lm's `quantization` entry when a layer is quantised.
    """
    from .gguf import read_gguf_model

    try:
        config, weights, tokenizer = read_gguf_model(path, dtype)
    except OndeviceLoraError:
        raise  # already says what is wrong with the file
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        # A readable file whose metadata lacks or mistypes what a model needs.
        raise ModelLoadError(
            f"{path}: the GGUF metadata does not describe a model this loader reads "
            f"({type(e).__name__}: {e}). Use a GGUF written by llama.cpp's converter."
        ) from None
    return load_model_from_weights(config, weights, source=Path(path)), tokenizer, config


def load(name: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None):
    """Load (model, tokenizer) from a folder, a .gguf file or a Hub id; None: the built-in default.

    adapter: an adapter folder to apply; it is refused if it was trained on another base.
    """
    model, tokenizer = _load_base(name)
    if adapter is not None:
        from ..adapters.files import load_adapter
        from ..adapters.fingerprint import base_fingerprint

        load_adapter(model, adapter, base_fingerprint(model, tokenizer))
        model.eval()
    return model, tokenizer


def _load_base(name):
    from .tokenizer import Tokenizer

    if name is None:
        from .defaults import default_model_path

        name = default_model_path()
    path = resolve_model_path(name)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"{path}: a model is a folder (config.json, *.safetensors, tokenizer.json) "
                "or a .gguf file."
            )
        model, tokenizer, _ = load_gguf(path)
        return model, tokenizer
    model, _ = load_model(path)
    return model, Tokenizer.from_folder(path)
