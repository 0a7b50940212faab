"""Several adapters on one loaded base: load them once, then switch, disable or mix them.

Each targeted base layer is wrapped once by a MultiAdapterLinear that holds any number of named
adapters beside the frozen base. What the layer adds to base(x) is chosen by `set_active`: one
adapter, none (the base's own output), or a weighted sum

    y = base(x) + sum_i w_i * scale_i * (x @ A_i.T) @ B_i.T

No base weight is copied or changed, so switching is free and switching back gives the same
outputs bit for bit. One adapter at weight 1 computes exactly what LoRALinear computes.

A DoRA adapter rescales each row of W + scale * B @ A to its learned magnitude. Those rescalings
do not add up across adapters, so a DoRA adapter can only be active alone, at weight 1.

    load_adapters(model, {"chat": "adapters/chat", "sql": "adapters/sql"}, tokenizer)
    set_active(model, "chat")                       # one adapter
    set_active(model, {"chat": 0.7, "sql": 0.3})    # a weighted combination
    set_active(model, None)                         # the base model exactly
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import format_list
from .files import (
    AdapterError,
    check_adapter_base,
    read_adapter_config,
    read_adapter_tensors,
    resolve_targets,
)
from .fingerprint import base_fingerprint
from .layers import (
    ADAPTER_DTYPE,
    AdapterWrapper,
    adapter_modules,
    dense_weight,
    dora_factor,
    dora_output,
    fold_weight,
    low_rank_delta,
    replace_modules,
)

Active = str | Mapping[str, float] | None


class AdapterWeights(nn.Module):
    """One named adapter's tensors on one layer: lora_a (r, in), lora_b (out, r), and DoRA's
    magnitude (out,); `scale` is its alpha / rank, `mix` the weight set_active gave it (0: off)."""

    def __init__(self, lora_a, lora_b, scale: float, magnitude=None):
        super().__init__()
        self.lora_a = lora_a.astype(ADAPTER_DTYPE)
        self.lora_b = lora_b.astype(ADAPTER_DTYPE)
        if magnitude is not None:
            self.magnitude = magnitude.astype(ADAPTER_DTYPE)
        self.scale = scale
        self.mix = 0.0

    @property
    def is_dora(self) -> bool:
        return "magnitude" in self

    def delta(self, x: mx.array) -> mx.array:
        # mix * scale is scale itself at weight 1, so one adapter matches LoRALinear exactly.
        return low_rank_delta(x, self.lora_a, self.lora_b, self.mix * self.scale)

    def delta_weight(self) -> mx.array:
        """mix * scale * B @ A, the (out, in) update this adapter adds at its current weight."""
        return (self.lora_b @ self.lora_a) * (self.mix * self.scale)


class MultiAdapterLinear(AdapterWrapper):
    """A frozen linear layer (`base`) with named adapters (`adapters`), any mix of them active."""

    def __init__(self, base: nn.Module):
        super().__init__()
        base.freeze()
        self.base = base
        self.adapters = {}

    def active(self) -> list[AdapterWeights]:
        """The adapters of this layer with a non-zero weight, in the order they were loaded."""
        return [a for a in self.adapters.values() if a.mix != 0]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        active = self.active()
        if not active:
            return y  # disabled: the base's output itself, not base + 0
        if active[0].is_dora:
            # set_active lets a DoRA adapter be active only alone and at weight 1.
            a = active[0]
            factor = dora_factor(self.base, a.delta_weight(), a.magnitude)
            return dora_output(self.base, y, y, factor, a.delta(x))
        delta = active[0].delta(x)
        for a in active[1:]:
            delta = delta + a.delta(x)
        # Summed in float32, then cast once to the base's dtype, as LoRALinear does.
        return y + delta.astype(y.dtype)

    def fused_weight(self) -> mx.array:
        """The float32 (out, in) weight of one plain layer computing what this layer does now."""
        weight = dense_weight(self.base).astype(mx.float32)
        active = self.active()
        if active and active[0].is_dora:
            a = active[0]
            factor = dora_factor(self.base, a.delta_weight(), a.magnitude)
            return (weight + a.delta_weight()) * factor[:, None]
        for a in active:
            weight = weight + a.delta_weight()
        return weight

    def fuse(self, dequantize: bool = False, dtype: mx.Dtype | None = None) -> nn.Module:
        """A plain or re-quantised layer with the active adapters folded in (see fold_weight)."""
        return fold_weight(self.base, self.fused_weight(), dequantize, dtype)


def multi_adapter_modules(model: nn.Module) -> dict[str, MultiAdapterLinear]:
    """Every MultiAdapterLinear of `model`, by module path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, MultiAdapterLinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters loaded on `model`, sorted."""
    return sorted({n for layer in multi_adapter_modules(model).values() for n in layer.adapters})


def active_adapters(model: nn.Module) -> dict[str, float]:
    """{name: weight} of the active adapters; {} when the model computes its base output."""
    active = {}
    for layer in multi_adapter_modules(model).values():
        active.update({n: a.mix for n, a in layer.adapters.items() if a.mix != 0})
    return active


def names_for(folders: Sequence[str | os.PathLike]) -> list[str]:
    """Adapter names from folder names ("runs/chat" -> "chat"), made unique ("chat_2")."""
    names = []
    for folder in folders:
        # A dot would split the name in parameter paths ("q_proj.adapters.<name>.lora_a").
        stem = Path(folder).resolve().name.replace(".", "_") or "adapter"
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}_{n}"
        names.append(name)
    return names


def load_adapters(
    model: nn.Module,
    adapters: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    tokenizer=None,
    active: Active = None,
    check_base: bool = True,
) -> nn.Module:
    """Load adapter folders onto `model` under names, beside any loaded before; returns `model`.

    adapters: {name: folder}, or a list of folders named after themselves (names_for).
    tokenizer: compared with each adapter's base too, when given. Each adapter is checked
    against base_fingerprint(model) before anything changes (check_base=False skips that, for
    adapters of unknown origin); a bad one leaves the model as it was. The new adapters start
    inactive; `active` is then passed to set_active (None leaves the selection as it was).
    """
    if adapter_modules(model):
        raise AdapterError(
            "this model already has an adapter applied (apply_adapters or load(..., adapter=)); "
            "load the base model without it and pass every adapter to load_adapters."
        )
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    if not isinstance(adapters, Mapping):
        adapters = dict(zip(names_for(adapters), adapters))
    if not adapters:
        raise AdapterError("no adapters to load: pass {name: folder} or a list of folders.")
    loaded_before = adapter_names(model)
    fingerprint = base_fingerprint(model, tokenizer) if check_base else None
    # Read and check every adapter first, so that one bad folder leaves the model untouched.
    read = {}
    for name, folder in adapters.items():
        if not isinstance(name, str) or not name or "." in name:
            raise AdapterError(f"adapter name {name!r} must be a non-empty string without dots.")
        if name in loaded_before:
            raise AdapterError(
                f"an adapter named {name!r} is already loaded; choose another name, or "
                "remove_adapters(model, [name]) first."
            )
        config, saved_base = read_adapter_config(folder)
        if fingerprint is not None:
            check_adapter_base(folder, saved_base, fingerprint)
        read[name] = (config, read_adapter_tensors(model, folder, config))

    model.freeze()  # adapters loaded here are for inference, not training
    for name, (config, tensors) in read.items():
        wrappers = {}
        for path, _, layer in resolve_targets(model, config):
            if not isinstance(layer, MultiAdapterLinear):
                layer = MultiAdapterLinear(layer).train(model.training)
                wrappers[path] = layer
            layer.adapters[name] = AdapterWeights(
                tensors[f"{path}.lora_a"],
                tensors[f"{path}.lora_b"],
                config.scale,
                tensors.get(f"{path}.magnitude"),
            )
            layer.adapters[name].freeze()
        replace_modules(model, wrappers)
    mx.eval(model.parameters())
    if active is not None:
        set_active(model, active)
    return model


def set_active(model: nn.Module, active: Active) -> dict[str, float]:
    """Choose what the loaded adapters add: a name (weight 1), None (nothing: the base model
    exactly), or {name: weight} for the weighted sum of their updates. Returns {name: weight}.

    Weights may be any finite numbers (negative subtracts an adapter); 0 leaves one out. A DoRA
    adapter can only be active alone at weight 1.
    """
    known = adapter_names(model)
    if not known:
        raise AdapterError("this model has no adapters loaded; call load_adapters() first.")
    if active is None:
        weights = {}
    elif isinstance(active, str):
        weights = {active: 1.0}
    elif isinstance(active, Mapping):
        weights = dict(active)
    else:
        raise AdapterError(
            f"active must be an adapter name, None or {{name: weight}}, got {active!r}."
        )
    problems = [f"unknown adapter {n!r}" for n in weights if n not in known]
    problems += [
        f"weight of {n!r} must be a finite number, got {w!r}"
        for n, w in weights.items()
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)
    ]
    if problems:
        raise AdapterError(
            "cannot set the active adapters:\n  - "
            + "\n  - ".join(problems)
            + f"\nLoaded adapters: {format_list(known)}."
        )
    weights = {n: float(w) for n, w in weights.items() if w != 0}
    dora = [n for n in weights if _is_dora(model, n)]
    if dora and (len(weights) > 1 or weights[dora[0]] != 1.0):
        raise AdapterError(
            f"DoRA adapter {format_list(dora)} can only be active alone at weight 1 (got "
            f"{weights}): it rescales the base's rows to its own magnitudes, which does not "
            "add up with other adapters or scale with a weight. Use it on its own."
        )
    for layer in multi_adapter_modules(model).values():
        for name, adapter in layer.adapters.items():
            adapter.mix = weights.get(name, 0.0)
    return weights


def _is_dora(model: nn.Module, name: str) -> bool:
    for layer in multi_adapter_modules(model).values():
        if name in layer.adapters:
            return layer.adapters[name].is_dora
    return False


def remove_adapters(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Drop the named adapters (None: all); layers left without any get their base back."""
    known = adapter_names(model)
    names = known if names is None else list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterError(
            f"no adapter named {format_list(unknown)}; loaded: {format_list(known) or 'none'}."
        )
    unwrapped = {}
    for path, layer in multi_adapter_modules(model).items():
        for name in names:
            layer.adapters.pop(name, None)
        if not layer.adapters:
            unwrapped[path] = layer.base
    replace_modules(model, unwrapped)


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    """{name: folder} from command-line values "NAME=FOLDER" or "FOLDER" (named by names_for)."""
    named, unnamed = {}, []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        # "runs/a=b/x" is a folder: a name holds no path separator.
        if sep and name and "/" not in name and os.sep not in name:
            if name in named:
                raise AdapterError(f"adapter name {name!r} is given twice ({spec!r}).")
            named[name] = folder
        else:
            unnamed.append(spec)
    for name, folder in zip(names_for(unnamed), unnamed):
        while name in named:
            name += "_2"
        named[name] = folder
    return named
