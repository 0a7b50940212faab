"""Build a model from its config and weights: the one step every loader ends in.

Hugging Face and mlx-lm folders (hf.py) and GGUF files (gguf/) each produce a Hub-style
config.json dict and Hub-named weights; this module turns them into one of our models, making
quantised exactly the layers stored quantised.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import ModelLoadError, format_list
from ..models import build_model


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
