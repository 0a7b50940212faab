"""Load a base model from a Hugging Face folder, an mlx-lm quantised folder, a Hub id or a GGUF."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import ModelLoadError, format_list
from .models import build_model, get_model_module
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


def quantization_of(config: dict) -> dict | None:
    """The mlx-lm quantisation settings of a config (`quantization`, or its HF-side copy)."""
    quant = config.get("quantization") or config.get("quantization_config")
    if quant and "bits" in quant and "group_size" in quant:
        return quant
    return None


def quantize_to_match(model: nn.Module, quant: dict, weights: dict) -> None:
    """Turn exactly the layers stored quantised in `weights` into quantised layers, in place.

    mlx-lm folders may quantise some layers differently, or not at all: a per-layer entry in the
    config, keyed by module path, overrides the global settings; `false` leaves a layer alone.
    """
    defaults = {
        "group_size": quant["group_size"],
        "bits": quant["bits"],
        "mode": quant.get("mode", "affine"),
    }

    def settings(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        override = quant.get(path)
        if override is False:
            return False
        return {**defaults, **override} if isinstance(override, dict) else dict(defaults)

    nn.quantize(model, class_predicate=settings)


def check_weights(model: nn.Module, weights: dict[str, mx.array], source) -> None:
    """Raise once, listing every missing, unexpected and misshapen weight."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshapen = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {format_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {format_list(unexpected)}")
    if misshapen:
        problems.append(f"misshapen {len(misshapen)}: {format_list(misshapen)}")
    if problems:
        raise ModelLoadError(
            f"{source}: the weights do not fit the model its config describes "
            f"({model.args.model_type}, {model.args.num_hidden_layers} layers, hidden "
            f"{model.args.hidden_size}):\n  " + "\n  ".join(problems) + "\n"
            "Check that the config belongs to these weights."
        )


def load_model_from_weights(config: dict, weights: dict[str, mx.array], source) -> nn.Module:
    """Build the model `config` describes and fill it with `weights`, quantised ones staying so."""
    model = build_model(config, source=f"{source}")
    weights = model.sanitize(weights)
    quant = quantization_of(config)
    if quant is not None:
        quantize_to_match(model, quant, weights)
    check_weights(model, weights, source)
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    model.eval()
    return model


def load_model(folder: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load the model of a Hugging Face or mlx-lm folder; returns (model, config)."""
    folder = Path(folder)
    config = load_config(folder)
    # Check model_type before reading the weights, and name the file that holds it.
    get_model_module(config.get("model_type"), source=str(folder / "config.json"))
    model = load_model_from_weights(config, load_weights(folder), source=folder)
    return model, config


def load(name: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None):
    """Load (model, tokenizer) from a folder, a .gguf file or a Hub id; None: the built-in default.

    adapter: an adapter folder to apply; it is refused if it was trained on another base.
    """
    model, tokenizer = _load_base(name)
    if adapter is not None:
        from .adapters import load_adapter
        from .fingerprint import base_fingerprint

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
        from .gguf import load_gguf

        model, tokenizer, _ = load_gguf(path)
        return model, tokenizer
    model, _ = load_model(path)
    return model, Tokenizer.from_folder(path)
