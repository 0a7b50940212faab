"""PEFT (Hugging Face) LoRA adapters: a folder with adapter_config.json and
adapter_model.safetensors, which `peft.PeftModel.from_pretrained` loads onto a transformers model.

PEFT's tensors are ours under other names and the same orientation: lora_A (r, in), lora_B
(out, r) and DoRA's magnitude (out,), keyed by "base_model.model." + the module path. PEFT scales
by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), our formula, so rank and alpha carry
over unchanged and the effective scale is exactly the same number.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from ondevice_lora.adapters.files import ALL_LINEAR, AdapterError, LoraConfig
from ondevice_lora.errors import format_list
from ondevice_lora.loading.weights import read_safetensors

from .common import (
    AdapterFormatError,
    check_and_write,
    check_distinct,
    export_folder,
    is_layer_path,
    layer_indices,
    layer_relative_paths,
    num_layers_for,
    read_json_object,
    read_our_adapter,
    require,
    resolve_base,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# Our tensor name -> PEFT's name after the module path.
TENSOR_NAMES = {
    "lora_a": "lora_A.weight",
    "lora_b": "lora_B.weight",
    "magnitude": "lora_magnitude_vector",
}
# adapter_config.json keys. The settings PEFT shares with LoraConfig: our field -> (PEFT's key,
# PEFT's default when the key is absent).
SHARED_KEYS = {"rank": ("r", 8), "alpha": ("lora_alpha", 8), "dropout": ("lora_dropout", 0.0)}
PEFT_TYPE_KEY, TASK_TYPE_KEY, BASE_MODEL_KEY = "peft_type", "task_type", "base_model_name_or_path"
TARGET_MODULES, USE_DORA, USE_RSLORA = "target_modules", "use_dora", "use_rslora"
LAYERS_TO_TRANSFORM, LAYERS_PATTERN = "layers_to_transform", "layers_pattern"
AUTO_MAPPING = "auto_mapping"  # {"base_model_class": "LlamaForCausalLM", ...}, PEFT's own
PEFT_TYPE = "LORA"
TASK_TYPE = "CAUSAL_LM"
# PEFT options our layers do not have, with the values that leave them off. An adapter that
# turns one on computes something else, so importing it is refused rather than approximated.
NEUTRAL_SETTINGS = {
    "bias": ("none",),  # trained biases
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),  # GPT-2's transposed Conv1D weights
    "modules_to_save": (None, []),  # full copies of other layers
    "rank_pattern": ({}, None),  # per-module ranks and alphas
    "alpha_pattern": ({}, None),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "use_qalora": (False, None),
}


def export_peft(adapter_folder, out, base_model_name_or_path: str | None = None) -> Path:
    """Write our adapter folder as a PEFT adapter folder `out`; returns `out`.

    base_model_name_or_path: recorded in adapter_config.json for PEFT's `AutoPeftModel`
    (a Hub id or a folder); PeftModel.from_pretrained onto a loaded model does not need it.
    """
    config, _, modules = read_our_adapter(adapter_folder)
    check_distinct(adapter_folder, out)
    tensors = {
        f"{KEY_PREFIX}{path}.{TENSOR_NAMES[name]}": value
        for path, parts in modules.items()
        for name, value in parts.items()
    }
    relative = layer_relative_paths(modules)
    leaves = [r.rsplit(".", 1)[-1] for r in relative]
    # PEFT matches a target against the end of a module's path: the bare names ("q_proj") are
    # what users expect, and suffice unless two modules in a layer share one.
    targets = leaves if len(set(leaves)) == len(leaves) else relative
    layers = layer_indices(modules) if config.num_layers is not None else None
    peft_config = {
        PEFT_TYPE_KEY: PEFT_TYPE,
        TASK_TYPE_KEY: TASK_TYPE,
        BASE_MODEL_KEY: base_model_name_or_path,
        **{key: getattr(config, field) for field, (key, _) in SHARED_KEYS.items()},
        USE_RSLORA: config.use_rslora,
        USE_DORA: config.fine_tune_type == "dora",
        TARGET_MODULES: targets,
        LAYERS_TO_TRANSFORM: layers,
        LAYERS_PATTERN: "layers" if layers is not None else None,
        "init_lora_weights": True,
        "inference_mode": True,
        **{key: values[0] for key, values in NEUTRAL_SETTINGS.items()},
    }
    with export_folder(out, WEIGHTS_FILE, CONFIG_FILE) as tmp:
        # "pt" is what transformers and PEFT write, and what their loaders expect to find.
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), tensors, {"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return Path(out)


def import_peft(path, out, model) -> Path:
    """Turn a PEFT LoRA / rsLoRA / DoRA adapter folder into our adapter folder `out`.

    model: the base it is imported onto (a path, Hub id, or a loaded (model, tokenizer) pair).
    The adapter is checked against it (target modules, layers, every tensor's shape) and `out`
    is fingerprinted against it. Returns `out`.
    """
    path = Path(path)
    check_distinct(path, out)
    config_path = path / CONFIG_FILE
    data = read_json_object(config_path, "a PEFT adapter folder")
    peft_type = data.get(PEFT_TYPE_KEY)
    if peft_type != PEFT_TYPE:
        raise AdapterFormatError(
            f"{config_path}: peft_type is {peft_type!r}; only {PEFT_TYPE!r} adapters are supported."
        )
    unsupported = [
        f"{key}={data[key]!r}"
        for key, neutral in NEUTRAL_SETTINGS.items()
        if key in data and data[key] not in neutral
    ]
    if unsupported:
        raise AdapterFormatError(
            f"{config_path}: PEFT options ondevice-lora adapters do not have: "
            f"{', '.join(unsupported)}. Merge the adapter with PEFT instead."
        )
    base, tokenizer = resolve_base(model)
    tensors = _read_tensors(path)
    layers = data.get(LAYERS_TO_TRANSFORM)
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    targets = require(data, TARGET_MODULES, config_path)
    if isinstance(targets, str) and targets != ALL_LINEAR:
        # A regular expression in PEFT: the tensors say which modules it matched.
        targets = layer_relative_paths(_modules(tensors))
    elif isinstance(targets, list) and targets and all(map(is_layer_path, targets)):
        # PEFT saves "all-linear" expanded to full module paths; they also say which layers.
        layers = layer_indices(targets) if layers is None else layers
        targets = layer_relative_paths(targets)
    total = base.args.num_hidden_layers
    try:
        config = LoraConfig(
            **{field: data.get(key, default) for field, (key, default) in SHARED_KEYS.items()},
            target_modules=targets,
            num_layers=None if layers is None else num_layers_for(layers, total, config_path),
            fine_tune_type="dora" if data.get(USE_DORA) else "lora",
            use_rslora=bool(data.get(USE_RSLORA, False)),
        ).validate(str(config_path))
    except AdapterError as e:
        raise AdapterFormatError(str(e)) from None
    made_for = data.get(BASE_MODEL_KEY) or (data.get(AUTO_MAPPING) or {}).get("base_model_class")
    hint = f" ({made_for})" if made_for else ""
    return check_and_write(out, tensors, config, (base, tokenizer), str(path), hint)


def _modules(tensors: dict) -> list[str]:
    return sorted({key.rpartition(".")[0] for key in tensors})


def _read_tensors(folder: Path) -> dict[str, mx.array]:
    """PEFT's tensors under our names ("<module path>.lora_a")."""
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickle = " (adapter_model.bin is a pickle: re-save it with safetensors)"
        raise AdapterFormatError(
            f"{folder}: {WEIGHTS_FILE} is missing"
            + (pickle if (folder / "adapter_model.bin").exists() else "")
            + "."
        )
    ours, unexpected = {}, []
    for key, value in read_safetensors(weights_path).items():
        for name, suffix in TENSOR_NAMES.items():
            if key.startswith(KEY_PREFIX) and key.endswith("." + suffix):
                ours[f"{key[len(KEY_PREFIX) : -len(suffix) - 1]}.{name}"] = value
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise AdapterFormatError(
            f"{weights_path}: tensors that are not LoRA tensors: {format_list(unexpected)}. "
            f"Expected {KEY_PREFIX}<module>.{{{', '.join(TENSOR_NAMES.values())}}}."
        )
    return ours
