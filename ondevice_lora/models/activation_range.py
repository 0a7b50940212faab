"""The largest activations a model of ours produces in float32, measured on sample text.

Every norm's input is recorded while the model runs: the norms that read the residual stream
see it entering each layer and between its two sub-layers, the final norm sees it leaving the
last layer, and Gemma's post-norms see each sub-layer's output. Exporters and `fuse` use it to
tell whether a model fits float16 (largest value 65,504) before they write one.

    ranges = measure_ranges(model, [tokenizer.encode(text) for text in texts])
    ranges.largest_residual, ranges.largest
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from ..errors import OndeviceLoraError

FP16_MAX = 65504.0
# Norms that read the residual stream, by the module name our models (and Hugging Face) give
# them; the others (Gemma's post-norms, q/k norms) read a sub-layer's output.
RESIDUAL_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")
ALL_LAYER_NORMS = RESIDUAL_NORMS + ("post_feedforward_layernorm",)


class ActivationRangeError(OndeviceLoraError):
    """The model's activations are not finite even in float32."""


@dataclass
class NormInput:
    """What one RMSNorm saw: the largest |x| and the largest mean(x^2) of a row."""

    max_abs: float = 0.0
    max_mean_square: float = 0.0

    def update(self, x: mx.array) -> None:
        x = x.astype(mx.float32)
        self.max_abs = max(self.max_abs, mx.abs(x).max().item())
        self.max_mean_square = max(self.max_mean_square, mx.mean(x * x, axis=-1).max().item())


@dataclass
class ActivationRanges:
    """Per decoder layer, the inputs of its norms (by name) in float32 on the calibration
    text; `final` is the last norm's input (the residual after the last layer)."""

    layers: list[dict[str, NormInput]]
    final: NormInput
    tokens: int = 0

    @property
    def residual(self) -> list[float]:
        """Largest |residual| per layer (entering it or between its two sub-layers), then the
        residual leaving the last layer."""
        per_layer = [
            max(n.max_abs for name, n in layer.items() if name in RESIDUAL_NORMS)
            for layer in self.layers
        ]
        return per_layer + [self.final.max_abs]

    @property
    def largest_residual(self) -> float:
        return max(self.residual)

    @property
    def largest(self) -> float:
        """The largest |value| any norm saw (Gemma's post-norm inputs included)."""
        inputs = [n.max_abs for layer in self.layers for n in layer.values()]
        return max([self.final.max_abs, *inputs])

    def summary(self) -> str:
        residual = self.residual
        worst = int(np.argmax(residual))
        where = f"layer {worst}" if worst < len(self.layers) else "the final norm"
        square = max(
            [self.final.max_mean_square]
            + [n.max_mean_square for layer in self.layers for n in layer.values()]
        )
        return (
            f"float32 calibration on {self.tokens} tokens: largest |residual| "
            f"{max(residual):.4g} (at {where}), largest norm mean square {square:.4g}; "
            f"fp16 holds up to {FP16_MAX:.0f}"
        )


class _Recorder:
    """Stands in for a norm module while measuring: records its input, then calls it."""

    def __init__(self, module, record: NormInput):
        self.module, self.record = module, record

    def __call__(self, x):
        self.record.update(x)
        return self.module(x)


@contextmanager
def _float32(model):
    """The model with every floating-point parameter in float32, restored afterwards."""
    params = model.parameters()

    def widen(a):
        return a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a

    model.update(tree_map(widen, params))
    try:
        yield model
    finally:
        model.update(params)


@contextmanager
def _recording(model, ranges: ActivationRanges):
    """Put a _Recorder in place of every norm of the model, and the norms back afterwards."""
    swapped = [(model.model, "norm", ranges.final)]
    for block, records in zip(model.model.layers, ranges.layers):
        for name in ALL_LAYER_NORMS:
            if name in block:
                records[name] = NormInput()
                swapped.append((block, name, records[name]))
    originals = [getattr(owner, name) for owner, name, _ in swapped]
    for (owner, name, record), module in zip(swapped, originals):
        setattr(owner, name, _Recorder(module, record))
    try:
        yield
    finally:
        for (owner, name, _), module in zip(swapped, originals):
            setattr(owner, name, module)


def measure_ranges(model, texts_ids: list[list[int]]) -> ActivationRanges:
    """Run `model` (ours) in float32 on each token list and record its norms' inputs."""
    ranges = ActivationRanges([{} for _ in model.model.layers], NormInput())
    with _float32(model), _recording(model, ranges):
        for ids in texts_ids:
            if ids:
                mx.eval(model(mx.array([ids], dtype=mx.int32)))
                ranges.tokens += len(ids)
    if not math.isfinite(ranges.largest_residual):
        raise ActivationRangeError(
            "the model's activations are not finite even in float32 on the calibration text; "
            "its weights are broken (check the checkpoint)."
        )
    return ranges
