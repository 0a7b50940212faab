"""Adapters on a model: configuration, wrapping, counting, the base's identity, the adapter folder.

An adapter folder holds two files, named once below: the trained tensors (adapters.safetensors,
keys like "model.layers.0.self_attn.q_proj.lora_a") and adapter_config.json (the LoraConfig
fields plus `base`, the identity of the model the adapter was trained on). Loading refuses an
adapter whose base differs from the model it is loaded onto, saying what differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..atomic import write_atomically
from ..errors import OndeviceLoraError, format_list
from ..loading.weights import read_safetensors
from .fingerprint import base_fingerprint, fingerprint_differences
from .layers import (
    AdapterWrapper,
    DoRALinear,
    LoRALinear,
    adapter_modules,
    adapter_tensors,
    base_parameters,
    fuse_adapters,
    linear_dims,
    replace_modules,
    wrapped_modules,
)

# The public API; the model-level helpers of layers.py are re-exported so one import serves.
__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AdapterError",
    "LoraConfig",
    "adapter_modules",
    "adapter_tensors",
    "apply_adapters",
    "base_fingerprint",
    "base_parameters",
    "check_adapter_base",
    "count_trainable",
    "expected_trainable",
    "fingerprint_differences",
    "fuse_adapters",
    "load_adapter",
    "read_adapter_config",
    "read_adapter_tensors",
    "resolve_targets",
    "save_adapter",
]

ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
BASE_KEY = "base"  # adapter_config.json key holding base_fingerprint()
ALL_LINEAR = "all-linear"
FINE_TUNE_TYPES: dict[str, type[LoRALinear]] = {"lora": LoRALinear, "dora": DoRALinear}


class AdapterError(OndeviceLoraError):
    """An adapter configuration, folder or file is invalid, or does not fit the model."""


# PEFT's default targets for Llama-like models; a family may name its own (default_lora_targets).
DEFAULT_TARGETS = ["q_proj", "v_proj"]


@dataclass
class LoraConfig:
    """Which layers get adapters and how they are shaped; stored in adapter_config.json."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module names ("q_proj", or a dotted suffix such as "self_attn.q_proj"), or "all-linear":
    # every Linear / QuantizedLinear inside the decoder layers (lm_head is not one of them).
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    num_layers: int | None = None  # None: every decoder layer; N: the last N
    fine_tune_type: str = "lora"
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        """The factor on B @ A: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / self.rank**0.5 if self.use_rslora else self.alpha / self.rank

    def validate(self, source: str = "adapter configuration") -> LoraConfig:
        """Raise one AdapterError listing every invalid field; returns self when all are valid."""
        problems = []

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):  # NaN and infinity are no scale: they would train and save NaN
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.rank) or self.rank < 1:
            problems.append(f"rank must be a positive integer, got {self.rank!r}")
        if not is_number(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha must be a positive number, got {self.alpha!r}")
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            problems.append(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if targets != ALL_LINEAR and (
            not isinstance(targets, (list, tuple))
            or not targets
            or not all(isinstance(t, str) and t for t in targets)
        ):
            problems.append(
                f"target_modules must be a non-empty list of module names (e.g. "
                f'["q_proj", "v_proj"]) or "{ALL_LINEAR}", got {targets!r}'
            )
        if self.num_layers is not None and (not is_int(self.num_layers) or self.num_layers < 1):
            problems.append(
                f"num_layers must be a positive integer or null (all layers), got {self.num_layers!r}"
            )
        if not isinstance(self.fine_tune_type, str) or self.fine_tune_type not in FINE_TUNE_TYPES:
            problems.append(
                f"fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}, "
                f"got {self.fine_tune_type!r}"
            )
        if not isinstance(self.use_rslora, bool):
            problems.append(f"use_rslora must be true or false, got {self.use_rslora!r}")
        if problems:
            raise AdapterError(f"{source}: invalid settings:\n  - " + "\n  - ".join(problems))
        return self

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if isinstance(self.target_modules, tuple):
            data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "adapter configuration") -> LoraConfig:
        """A validated config from a dict; unknown keys are reported (they are usually typos)."""
        if not isinstance(data, dict):
            raise AdapterError(f"{source}: expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise AdapterError(
                f"{source}: unknown keys {format_list(unknown)}; known keys: {', '.join(names)}"
            )
        return cls(**data).validate(source)


# --- wrapping -----------------------------------------------------------------------------------


def _candidate_layers(model: nn.Module, num_layers: int | None):
    """(path in the model, path inside its decoder layer, layer) for every linear layer of the
    chosen decoder layers; a layer already wrapped counts as one linear, its `base` is skipped."""
    paths = {id(m): name for name, m in model.named_modules()}
    layers = model.layers
    if num_layers is not None and num_layers > len(layers):
        raise AdapterError(
            f"num_layers is {num_layers} but the model has {len(layers)} decoder layers; "
            f"use at most {len(layers)}, or null for all."
        )
    chosen = layers if num_layers is None else layers[len(layers) - num_layers :]
    found = []
    for block in chosen:
        prefix = paths[id(block)]
        wrapped = []
        for rel, module in sorted(block.named_modules(), key=lambda item: item[0]):
            if any(rel.startswith(w + ".") for w in wrapped):
                continue
            if isinstance(module, AdapterWrapper):
                wrapped.append(rel)
            elif not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                continue
            found.append((f"{prefix}.{rel}", rel, module))
    return found


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, str, nn.Module]]:
    """The layers `config` selects, as (model path, path inside the decoder layer, layer).

    Raises AdapterError naming the targets that match nothing and the names that exist.
    """
    config.validate()
    candidates = _candidate_layers(model, config.num_layers)
    family_defaults = list(getattr(model, "default_lora_targets", DEFAULT_TARGETS))
    if list(config.target_modules) == DEFAULT_TARGETS and family_defaults != DEFAULT_TARGETS:
        # The default names layers this family does not have (Phi-3 fuses q, k and v into
        # qkv_proj): use the family's own default, as PEFT does, and record it in the config.
        config.target_modules = family_defaults
    if config.target_modules == ALL_LINEAR:
        return candidates

    def matches(rel: str, target: str) -> bool:
        return rel == target or rel.endswith("." + target)

    unmatched = [
        t for t in config.target_modules if not any(matches(r, t) for _, r, _ in candidates)
    ]
    if unmatched:
        available = sorted({rel.rsplit(".", 1)[-1] for _, rel, _ in candidates})
        raise AdapterError(
            f"target_modules {format_list(unmatched)} match no linear layer of this "
            f"{model.args.model_type} model. Available: {', '.join(available)}, or "
            f'"{ALL_LINEAR}".'
        )
    return [c for c in candidates if any(matches(c[1], t) for t in config.target_modules)]


def apply_adapters(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze `model` and wrap the layers `config` selects in place; returns their paths.

    Afterwards only the adapter tensors (lora_a, lora_b, and DoRA's magnitude) are trainable.
    """
    if wrapped_modules(model):
        raise AdapterError(
            "this model already has adapters; load a fresh base model to apply new ones."
        )
    targets = resolve_targets(model, config)
    model.freeze()
    wrapper = FINE_TUNE_TYPES[config.fine_tune_type]
    adapters = {}
    for path, _, layer in targets:
        adapter = wrapper.from_base(
            layer, config.rank, config.alpha, config.dropout, config.use_rslora
        )
        # New modules start in training mode; follow the model's (eval after loading).
        adapters[path] = adapter.train(model.training)
    replace_modules(model, adapters)
    mx.eval(model.trainable_parameters())
    return [path for path, _, _ in targets]


def count_trainable(model: nn.Module) -> int:
    """The number of trainable scalars in `model`."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def expected_trainable(model: nn.Module, config: LoraConfig) -> int:
    """What `count_trainable` must be after `apply_adapters(model, config)`:
    rank * (in + out) per wrapped layer, plus `out` for DoRA's magnitude."""
    return sum(math.prod(shape) for shape in expected_adapter_shapes(model, config).values())


def expected_adapter_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple]:
    """The adapter tensors `config` gives `model`, by saved name, with their shapes."""
    shapes = {}
    for path, _, layer in resolve_targets(model, config):
        in_dims, out_dims = linear_dims(layer.base if isinstance(layer, AdapterWrapper) else layer)
        shapes[f"{path}.lora_a"] = (config.rank, in_dims)
        shapes[f"{path}.lora_b"] = (out_dims, config.rank)
        if config.fine_tune_type == "dora":
            shapes[f"{path}.magnitude"] = (out_dims,)
    return shapes


# --- the adapter folder -------------------------------------------------------------------------


def save_adapter(folder, model: nn.Module, config: LoraConfig, fingerprint: dict) -> Path:
    """Write adapters.safetensors (adapter tensors only) and adapter_config.json to `folder`."""
    folder = Path(folder)
    tensors = adapter_tensors(model)
    if not tensors:
        raise AdapterError("this model has no adapters to save; call apply_adapters() first.")
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(
        folder / ADAPTER_WEIGHTS_FILE,
        lambda tmp: mx.save_safetensors(str(tmp), tensors, {"format": "mlx"}),
    )
    text = json.dumps({**config.to_dict(), BASE_KEY: fingerprint}, indent=2) + "\n"
    # The config goes last: a folder whose config is readable has its weights complete.
    write_atomically(folder / ADAPTER_CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return folder


def read_adapter_config(folder) -> tuple[LoraConfig, dict | None]:
    """(LoraConfig, base fingerprint or None) from a folder's adapter_config.json."""
    path = Path(folder) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise AdapterError(
            f"{folder}: not an adapter folder (no {ADAPTER_CONFIG_FILE}); expected "
            f"{ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}, as written by save_adapter."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}."
        ) from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    return LoraConfig.from_dict(data, source=str(path)), base


def load_adapter(model: nn.Module, folder, fingerprint: dict | None) -> LoraConfig:
    """Wrap a fresh base `model` with the adapter saved in `folder` and load its tensors.

    `fingerprint` is base_fingerprint(model, tokenizer); an adapter made for another base is
    refused with what differs. None skips that check (for adapters of unknown origin).
    """
    folder = Path(folder)
    config, base = read_adapter_config(folder)
    if fingerprint is not None:
        check_adapter_base(folder, base, fingerprint)
    loaded = read_adapter_tensors(model, folder, config)
    apply_adapters(model, config)
    current = adapter_tensors(model)
    model.update(tree_unflatten([(k, loaded[k].astype(v.dtype)) for k, v in current.items()]))
    mx.eval(model.trainable_parameters())
    return config


def check_adapter_base(folder, saved_base: dict | None, fingerprint: dict) -> None:
    """Raise AdapterError, saying what differs, unless the adapter in `folder` was trained on
    the base whose base_fingerprint() is `fingerprint`; saved_base is its config's "base"."""
    if saved_base is None:
        raise AdapterError(
            f"{Path(folder) / ADAPTER_CONFIG_FILE} does not say which base model it was trained "
            f'on (no "{BASE_KEY}" entry), so it cannot be checked against this model.'
        )
    diffs = fingerprint_differences(saved_base, fingerprint)
    if diffs:
        raise AdapterError(
            f"{folder}: this adapter was trained on another base model:\n  - "
            + "\n  - ".join(diffs)
            + "\nLoad it with the base model it was trained on."
        )


def tensor_mismatches(tensors: dict, expected: dict, needed: str) -> list[str]:
    """One line per kind of mismatch between `tensors` and the `expected` name -> shape map:
    missing, unexpected and misshapen names (each shape followed by "(<needed> <shape>)")."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshapen = [
        f"{k} {tuple(tensors[k].shape)} ({needed} {shape})"
        for k, shape in expected.items()
        if k in tensors and tuple(tensors[k].shape) != shape
    ]
    found = {"missing": missing, "unexpected": unexpected, "misshapen": misshapen}
    return [f"{label} {len(v)}: {format_list(v)}" for label, v in found.items() if v]


def check_finite(tensors: dict[str, mx.array], source) -> None:
    """Refuse adapter tensors holding NaN or infinity: applied, they turn every logit into NaN
    (and `generate` would print the token of id 0 over and over)."""
    bad = [name for name, value in tensors.items() if not mx.all(mx.isfinite(value)).item()]
    if bad:
        raise AdapterError(
            f"{source}: non-finite weights (NaN or infinity) in {len(bad)} adapter tensor(s): "
            f"{format_list(sorted(bad))}. The training that wrote them diverged; use an earlier "
            "checkpoint, or train again with a lower learning rate."
        )


def read_adapter_tensors(model: nn.Module, folder, config: LoraConfig) -> dict[str, mx.array]:
    """The tensors of `folder`'s adapters.safetensors, checked against the names and shapes
    `config` gives `model`; raises AdapterError listing every missing, extra or misshapen one."""
    folder = Path(folder)
    weights_path = folder / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"{folder}: {ADAPTER_WEIGHTS_FILE} is missing.")
    loaded = read_safetensors(weights_path)
    check_finite(loaded, weights_path)
    # Check the file against the shapes the config implies before touching the model.
    problems = tensor_mismatches(loaded, expected_adapter_shapes(model, config), "expected")
    if problems:
        raise AdapterError(
            f"{weights_path}: the tensors do not fit the settings in {ADAPTER_CONFIG_FILE}:\n  "
            + "\n  ".join(problems)
        )
    return loaded
