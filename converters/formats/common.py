"""What every adapter format shares: reading our adapter folder, writing one, checking a
foreign adapter against the base it is imported onto, and keeping the scale exact.

Our adapter tensors are keyed by module path ("model.layers.3.self_attn.q_proj.lora_a"); each
format module only renames, transposes and re-describes them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ondevice_lora.adapters.files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    BASE_KEY,
    AdapterError,
    LoraConfig,
    base_fingerprint,
    check_finite,
    expected_adapter_shapes,
    read_adapter_config,
    tensor_mismatches,
)
from ondevice_lora.adapters.layers import ADAPTER_DTYPE, ADAPTER_PARAMETER_NAMES
from ondevice_lora.atomic import atomic_folder
from ondevice_lora.errors import format_list
from ondevice_lora.loading.weights import check_safetensors_file, read_safetensors

# A decoder-layer module path: "model.layers.<index>.<path inside the layer>".
_LAYER_PATH = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class AdapterFormatError(AdapterError):
    """A file in another tool's adapter format is malformed or cannot be expressed here."""


# --- reading and writing our own adapter folder -------------------------------------------------


def read_our_adapter(folder) -> tuple[LoraConfig, dict | None, dict[str, dict[str, mx.array]]]:
    """(config, base fingerprint or None, {module path: {"lora_a": A, "lora_b": B, ...}})."""
    folder = Path(folder)
    config, base = read_adapter_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"{folder}: {ADAPTER_WEIGHTS_FILE} is missing.")
    modules: dict[str, dict[str, mx.array]] = {}
    tensors = read_safetensors(weights_path)
    check_finite(tensors, weights_path)
    for key, value in tensors.items():
        path, _, name = key.rpartition(".")
        if name not in ADAPTER_PARAMETER_NAMES or not _LAYER_PATH.match(path):
            raise AdapterError(
                f"{weights_path}: unexpected tensor {key!r}; an adapter holds "
                f"model.layers.<i>.<module>.{{{', '.join(ADAPTER_PARAMETER_NAMES)}}}."
            )
        modules.setdefault(path, {})[name] = value
    needed = {"lora_a", "lora_b"} | ({"magnitude"} if config.fine_tune_type == "dora" else set())
    incomplete = [
        f"{path} (no {', '.join(sorted(needed - set(parts)))})"
        for path, parts in modules.items()
        if needed - set(parts)
    ]
    if incomplete or not modules:
        raise AdapterError(
            f"{weights_path}: incomplete adapter: {format_list(incomplete) or 'no tensors'}."
        )
    return config, base, dict(sorted(modules.items(), key=lambda kv: module_order(kv[0])))


def write_our_adapter(out, tensors: dict[str, mx.array], config: LoraConfig, fingerprint) -> Path:
    """Write an adapter folder as `save_adapter` does, from tensors rather than a wrapped model;
    whole or not at all (see export_folder)."""
    tensors = {k: v.astype(ADAPTER_DTYPE) for k, v in tensors.items()}
    data = {**config.to_dict(), BASE_KEY: fingerprint}
    with export_folder(out, ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS_FILE), tensors, {"format": "mlx"})
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return Path(out)


@contextlib.contextmanager
def export_folder(out, weights_file: str, config_file: str):
    """A temporary folder to write an adapter export into; on leaving, its two files are read
    back, and the folder replaces `out` in one rename (ondevice_lora.atomic.atomic_folder).

    So `out` holds the old export or the new one, never new weights beside an old config,
    whatever stops the run. An `out` holding files other than an export's is refused: the
    whole folder is replaced.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdapterFormatError(f"{out} is a file; --out must be a folder (new or empty).")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in (weights_file, config_file))
        if others:
            raise AdapterFormatError(
                f"{out} holds other files ({format_list(others)}); an export replaces its folder "
                "whole, so choose a new or empty --out."
            )
    with atomic_folder(out) as tmp:
        yield tmp
        check_safetensors_file(tmp / weights_file)
        read_json_object(tmp / config_file, "a complete export")


# --- module paths -------------------------------------------------------------------------------


def split_layer_path(path: str) -> tuple[int, str]:
    """ "model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj")."""
    match = _LAYER_PATH.match(path)
    if match is None:
        raise AdapterFormatError(f"{path!r} is not a module inside a decoder layer.")
    return int(match.group(1)), match.group(2)


def is_layer_path(path: str) -> bool:
    return _LAYER_PATH.match(path) is not None


def module_order(path: str) -> tuple:
    # Layer 10 after layer 9, not after layer 1.
    match = _LAYER_PATH.match(path)
    return (int(match.group(1)), match.group(2)) if match else (-1, path)


def layer_relative_paths(modules) -> list[str]:
    """The distinct paths inside a decoder layer that `modules` (model paths) cover, sorted."""
    return sorted({split_layer_path(p)[1] for p in modules})


def layer_indices(modules) -> list[int]:
    return sorted({split_layer_path(p)[0] for p in modules})


def num_layers_for(indices, total: int, source: str) -> int | None:
    """Our `num_layers` (the last N decoder layers; None for all) for a set of layer indices."""
    if not isinstance(indices, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in indices
    ):
        raise AdapterFormatError(f"{source}: layer indices must be integers, got {indices!r}.")
    indices = sorted(set(indices))
    if not indices or indices == list(range(total)):
        return None
    if indices != list(range(total - len(indices), total)):
        raise AdapterFormatError(
            f"{source}: the adapter covers decoder layers {indices} of {total}; ondevice-lora "
            f"adapters cover all layers or the last N, so this one cannot be imported."
        )
    return len(indices)


# --- the base model and the imported adapter -----------------------------------------------------


def check_distinct(source, out) -> None:
    """Refuse to write a conversion over its source, or over a folder holding it: the output
    folder is replaced whole."""
    source, target = Path(source).resolve(), Path(out).resolve()
    if target == source or target in source.parents:
        raise AdapterFormatError(
            f"{out}: is or holds the folder being converted, whose files would be overwritten "
            "(the output folder is replaced whole). Choose another --out."
        )


def resolve_base(model) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a model path or Hub id (None: the built-in default model), or a
    (model, tokenizer) pair that is already loaded."""
    if isinstance(model, tuple):
        return model
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError("model must be a path, a Hub id, None, or a (model, tokenizer) pair")
    from ondevice_lora.loading import load

    return load(model)


def check_and_write(
    out, tensors: dict[str, mx.array], config: LoraConfig, base, source: str, hint: str = ""
) -> Path:
    """Check converted tensors against what `config` gives the base, then write our folder.

    `base` is what resolve_base accepts. The base model is only inspected, never wrapped.
    """
    check_finite(tensors, source)
    model, tokenizer = resolve_base(base)
    try:
        expected = expected_adapter_shapes(model, config)
    except AdapterError as e:  # target modules this base does not have; name the source
        raise AdapterFormatError(f"{source}: {e}") from None
    problems = tensor_mismatches(tensors, expected, "this base needs")
    if problems:
        raise AdapterFormatError(
            f"{source}: the adapter does not fit this {model.args.model_type} base model "
            f"({model.args.num_hidden_layers} layers, hidden {model.args.hidden_size}):\n  "
            + "\n  ".join(problems)
            + f"\nIt was probably made for another base model{hint}; import it onto that one."
        )
    return write_our_adapter(out, tensors, config, base_fingerprint(model, tokenizer))


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from `path`; errors name the file, and the line and column when malformed."""
    if not path.is_file():
        raise AdapterFormatError(f"{path.parent}: not {what} (no {path.name}).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterFormatError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}."
        ) from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise AdapterFormatError(f"{path}: not a JSON text ({e}).") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def require(data: dict, key: str, path) -> object:
    """data[key]; a missing key is an error naming the file (values are checked by LoraConfig)."""
    if key not in data:
        raise AdapterFormatError(f"{path}: {key!r} is missing.")
    return data[key]


# --- scale --------------------------------------------------------------------------------------


def alpha_for_scale(scale: float, rank: int) -> float:
    """An alpha whose alpha / rank (our formula without rsLoRA) is `scale`.

    Exact in float64 whenever some alpha gives it. Division by a rank that is not a power of two
    skips some float64 values (no double alpha has alpha / 3 == 0.1); then alpha / rank is the
    nearest double, one ulp away, and still the same float32 number: the scale our layers and
    mlx-lm's apply, since MLX multiplies float32 tensors by it in float32.
    """
    start = scale * rank
    candidates = [start]
    for direction in (math.inf, -math.inf):
        alpha = start
        for _ in range(4):
            alpha = math.nextafter(alpha, direction)
            candidates.append(alpha)
    alpha = min(candidates, key=lambda a: abs(a / rank - scale))
    if np.float32(alpha / rank) != np.float32(scale):
        raise AdapterFormatError(f"no alpha gives scale {scale!r} at rank {rank}")
    return alpha


def float32_alpha_for_scale(scale: float, rank: int) -> np.float32:
    """The float32 alpha whose float32 alpha / rank (llama.cpp's arithmetic) is closest to
    float32(scale), the factor our layers apply.

    Exact for most scales, and always for ranks that are powers of two; float32 division by
    other ranks skips some values, and then it is one float32 ulp away, the best any alpha gives.
    """
    target, rank32 = np.float32(scale), np.float32(rank)
    start = np.float32(scale * rank)
    candidates = [start]
    for direction in (np.float32(np.inf), np.float32(-np.inf)):
        alpha = start
        for _ in range(4):
            alpha = np.nextafter(alpha, direction)
            candidates.append(alpha)
    return min(candidates, key=lambda a: abs(float(a / rank32) - float(target)))
