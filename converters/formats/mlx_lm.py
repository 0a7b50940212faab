"""mlx-lm LoRA adapters: a folder with adapters.safetensors and adapter_config.json, which
`mlx_lm.load(model, adapter_path=folder)` and `mlx_lm.generate --adapter-path` load.

mlx-lm multiplies from the right (x @ lora_a @ lora_b), so its matrices are ours transposed:
lora_a (in, r), lora_b (r, out); DoRA's magnitude is called `m`. Its config holds a raw `scale`
and no alpha: we write our effective scale (alpha / r, or alpha / sqrt(r) with rsLoRA) as it is,
and on import pick the alpha whose alpha / r is exactly that scale. `num_layers` counts decoder
layers from the end (any value <= 0 means all of them) and `keys` names modules by their path
inside a decoder layer ("self_attn.q_proj"); no keys means every linear layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx

from ondevice_lora.adapters.files import ALL_LINEAR, AdapterError, LoraConfig
from ondevice_lora.adapters.layers import lora_scale
from ondevice_lora.errors import format_list
from ondevice_lora.loading.weights import read_safetensors

from .common import (
    AdapterFormatError,
    alpha_for_scale,
    check_and_write,
    check_distinct,
    export_folder,
    layer_relative_paths,
    read_json_object,
    read_our_adapter,
    require,
    resolve_base,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
# Our tensor name -> mlx-lm's; the matrices among them are stored transposed.
TENSOR_NAMES = {"lora_a": "lora_a", "lora_b": "lora_b", "magnitude": "m"}
TRANSPOSED = ("lora_a", "lora_b")
FINE_TUNE_TYPES = ("lora", "dora")
# adapter_config.json keys, and those of its "lora_parameters" entry.
FINE_TUNE_TYPE, NUM_LAYERS, LORA_PARAMETERS = "fine_tune_type", "num_layers", "lora_parameters"
RANK, SCALE, DROPOUT, KEYS = "rank", "scale", "dropout", "keys"
ALL_LAYERS = -1  # mlx-lm takes model.layers[-max(n, 0):], so -1 selects every layer


def export_mlx_lm(adapter_folder, out) -> Path:
    """Write our adapter folder as an mlx-lm adapter folder `out`; returns `out`."""
    config, base, modules = read_our_adapter(adapter_folder)
    check_distinct(adapter_folder, out)
    tensors = {
        f"{path}.{TENSOR_NAMES[name]}": value.T if name in TRANSPOSED else value
        for path, parts in modules.items()
        for name, value in parts.items()
    }
    num_layers = config.num_layers
    if num_layers is None:
        # A count reads better than -1; the base's fingerprint knows it when it was recorded.
        num_layers = ((base or {}).get("architecture") or {}).get("num_hidden_layers", ALL_LAYERS)
    mlx_config = {
        FINE_TUNE_TYPE: config.fine_tune_type,
        NUM_LAYERS: num_layers,
        LORA_PARAMETERS: {
            RANK: config.rank,
            # What our layers multiply by (lora_scale), so the very same float.
            SCALE: lora_scale(config.rank, config.alpha, config.use_rslora),
            DROPOUT: config.dropout,
            # Exact paths, not our "all-linear" or suffixes: mlx-lm compares them with ==.
            KEYS: layer_relative_paths(modules),
        },
    }
    with export_folder(out, WEIGHTS_FILE, CONFIG_FILE) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), tensors, {"format": "mlx"})
        (tmp / CONFIG_FILE).write_text(json.dumps(mlx_config, indent=4) + "\n")
    return Path(out)


def import_mlx_lm(path, out, model) -> Path:
    """Turn an mlx-lm LoRA or DoRA adapter folder into our adapter folder `out`.

    model: the base it is imported onto (a path, Hub id, or a loaded (model, tokenizer) pair);
    the adapter is checked against it and `out` is fingerprinted against it. Returns `out`.
    """
    path = Path(path)
    check_distinct(path, out)
    config_path = path / CONFIG_FILE
    data = read_json_object(config_path, "an mlx-lm adapter folder")
    fine_tune_type = data.get(FINE_TUNE_TYPE, "lora")
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise AdapterFormatError(
            f"{config_path}: fine_tune_type {fine_tune_type!r} is not an adapter ondevice-lora "
            f"can import; supported: {', '.join(FINE_TUNE_TYPES)}."
        )
    params = require(data, LORA_PARAMETERS, config_path)
    if not isinstance(params, dict):
        raise AdapterFormatError(f"{config_path}: {LORA_PARAMETERS!r} must be a JSON object.")
    source = f"{config_path} {LORA_PARAMETERS}"
    rank, scale = require(params, RANK, source), require(params, SCALE, source)
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise AdapterFormatError(f"{source}: rank must be a positive integer, got {rank!r}.")
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise AdapterFormatError(f"{source}: scale must be a positive number, got {scale!r}.")
    if not math.isfinite(scale):
        raise AdapterFormatError(f"{source}: scale must be finite, got {scale!r}.")
    base, tokenizer = resolve_base(model)
    num_layers = require(data, NUM_LAYERS, config_path)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise AdapterFormatError(f"{config_path}: num_layers must be an integer.")
    if num_layers <= 0 or num_layers >= base.args.num_hidden_layers:
        num_layers = None
    keys = params.get(KEYS)
    try:
        config = LoraConfig(
            rank=rank,
            alpha=alpha_for_scale(float(scale), rank),
            dropout=params.get(DROPOUT, 0.0),
            target_modules=ALL_LINEAR if keys is None else keys,
            num_layers=num_layers,
            fine_tune_type=fine_tune_type,
        ).validate(source)
    except AdapterError as e:
        raise AdapterFormatError(str(e)) from None
    return check_and_write(out, _read_tensors(path), config, (base, tokenizer), str(path))


def _read_tensors(folder: Path) -> dict[str, mx.array]:
    """mlx-lm's tensors under our names and in our orientation."""
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterFormatError(f"{folder}: {WEIGHTS_FILE} is missing.")
    names = {theirs: ours for ours, theirs in TENSOR_NAMES.items()}
    tensors, unexpected = {}, []
    for key, value in read_safetensors(weights_path).items():
        module, _, name = key.rpartition(".")
        if name not in names:
            unexpected.append(key)
            continue
        ours = names[name]
        tensors[f"{module}.{ours}"] = value.T if ours in TRANSPOSED else value
    if unexpected:
        raise AdapterFormatError(
            f"{weights_path}: tensors that are not adapter tensors: {format_list(unexpected)}. "
            f"Expected <module>.{{{', '.join(TENSOR_NAMES.values())}}}."
        )
    return tensors
