"""De-quantise-then-matmul for quantised layers on CPU, with the base kept quantised in memory.

On Linux CPU, MLX's quantised matmul kernel runs at 1.5-2 GFLOP/s, while a float32 matmul
through a fast BLAS (see fast_blas) runs at 40-80. For the many rows of a training batch it is
therefore ~30x faster to de-quantise a layer's weight to float32 just before its matmul and
drop it right after. The math is the same: quantized_matmul also multiplies by the
de-quantised weight in float32, so results agree to float32 rounding.

`dequantized_matmuls(model)` switches the quantised layers of a model to this path for the
duration of a block (training, evaluation). Parameter names, shapes and dtypes do not change:
each layer only changes its class to a subclass whose __call__ picks, per call, the faster of
the two ways (few rows, as in token-by-token generation, stay on the quantised kernel). The
Metal path is never changed: the context does nothing unless MLX runs on the CPU of a Linux
machine with a fast BLAS preloaded.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import mlx.core as mx
import mlx.nn as nn

from .fast_blas import fast_blas_active

# Below this many rows (tokens) the quantised kernel wins: it reads 4-bit weights once per row,
# while de-quantising writes and reads a float32 copy of the whole weight. Measured on 2 x86
# cores with OpenBLAS (768 x 2048 weight): crossover between 4 and 8 rows.
MIN_ROWS = 8


def cpu_fast_path_available() -> bool:
    """True on Linux when MLX computes on the CPU and its float32 matmuls use a fast BLAS."""
    return sys.platform.startswith("linux") and mx.default_device() == mx.cpu and fast_blas_active()


def _dequantize_f32(weight, scales, biases, group_size: int, bits: int) -> mx.array:
    # float32 scales give a float32 weight, whatever the model's dtype: float16 and bfloat16
    # matmuls do not go through BLAS on CPU.
    return mx.dequantize(
        weight,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=group_size,
        bits=bits,
    )


@functools.cache
def _matmul_function(group_size: int, bits: int):
    """x @ dequantize(w).T as an mx.custom_function for one (group_size, bits).

    Its backward de-quantises the weight again instead of keeping the float32 copy from the
    forward pass, so the training graph holds only 4-bit weights between the two passes. The
    mx.depends calls tie each de-quantisation to the input it serves: without them MLX is free
    to de-quantise every layer's weight up front and hold them all at once.
    """

    @mx.custom_function
    def matmul(x, weight, scales, biases):
        weight, scales, biases = mx.depends([weight, scales, biases], [x])
        dense = _dequantize_f32(weight, scales, biases, group_size, bits)  # (out, in)
        return (x.astype(mx.float32) @ dense.T).astype(x.dtype)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, _output):
        x, weight, scales, biases = primals
        weight, scales, biases = mx.depends([weight, scales, biases], [cotangent])
        dense = _dequantize_f32(weight, scales, biases, group_size, bits)
        dx = (cotangent.astype(mx.float32) @ dense).astype(x.dtype)
        # The base is frozen: nothing asks for these, so they are never computed.
        return dx, mx.zeros_like(weight), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


def _use_dense(layer, x: mx.array) -> bool:
    rows = x.size // x.shape[-1] if x.ndim else 0
    return layer.mode == "affine" and "biases" in layer and rows >= MIN_ROWS


class DequantizedMatmulLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies many rows by its de-quantised weight (same parameters)."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _use_dense(self, x):
            return super().__call__(x)
        matmul = _matmul_function(self.group_size, self.bits)
        y = matmul(x, self["weight"], self["scales"], self["biases"])
        if "bias" in self:
            y = y + self["bias"]
        return y


class DequantizedMatmulEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose as_linear (a tied output head) takes the de-quantised path."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not _use_dense(self, x):
            return super().as_linear(x)
        matmul = _matmul_function(self.group_size, self.bits)
        return matmul(x, self["weight"], self["scales"], self["biases"])


_SWAPS = {
    nn.QuantizedLinear: DequantizedMatmulLinear,
    nn.QuantizedEmbedding: DequantizedMatmulEmbedding,
}


@contextlib.contextmanager
def dequantized_matmuls(model: nn.Module, enabled: bool | None = None):
    """Within the block, the model's quantised layers de-quantise before large matmuls.

    enabled: None decides by cpu_fast_path_available(); True forces the path (tests), False
    leaves the model alone. Each layer's class is switched in place and restored on exit; only
    layers of exactly MLX's quantised classes are switched.
    """
    if enabled is None:
        enabled = cpu_fast_path_available()
    swapped = []
    if enabled:
        for _, module in model.named_modules():
            cls = type(module)
            if cls in _SWAPS:
                swapped.append((module, cls))
                module.__class__ = _SWAPS[cls]
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls
