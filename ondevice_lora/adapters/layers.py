"""LoRA and DoRA layers that wrap a frozen `nn.Linear` or `nn.QuantizedLinear`.

The math is PEFT's, so adapter tensors mean the same here, in PEFT and in our Core ML exports:

    LoRA:  y = base(x) + scale * (dropout(x) @ lora_a.T) @ lora_b.T
    DoRA:  y = bias + m / ||W + scale * lora_b @ lora_a||_row * (x @ W.T + scale * lora(x))

with lora_a (r, in), lora_b (out, r), magnitude m (out,), scale = alpha / r (alpha / sqrt(r) with
rsLoRA). The base layer stays as it is (quantised or not) and frozen; adapter tensors are kept in
float32 whatever the base's dtype, so that small optimizer updates are not rounded away.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import OndeviceLoraError
from ..models.base import dequantized_weight

# The adapter's own tensors, by attribute name: every reader and writer of adapters uses these.
ADAPTER_PARAMETER_NAMES = ("lora_a", "lora_b", "magnitude")

# Adapter tensors are created and trained in this dtype, independent of the base's.
ADAPTER_DTYPE = mx.float32


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / rank, or alpha / sqrt(rank) with rsLoRA (which keeps updates stable at high rank)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of an `nn.Linear` or `nn.QuantizedLinear`."""
    out_dims, in_dims = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        # Quantised weights pack 32 // bits values into each uint32.
        in_dims = in_dims * 32 // layer.bits
    return in_dims, out_dims


def dense_weight(layer: nn.Module) -> mx.array:
    """The (out, in) weight of a layer, de-quantised if it is quantised."""
    if isinstance(layer, nn.QuantizedLinear):
        return dequantized_weight(layer)
    return layer.weight


def low_rank_delta(x: mx.array, lora_a: mx.array, lora_b: mx.array, scale: float) -> mx.array:
    """scale * (x @ A.T) @ B.T: (..., in) -> (..., out), never forming the (out, in) B @ A."""
    # swapaxes, not .T: DP training tiles the factors per example, (B, r, in) and (B, out, r).
    return ((x @ lora_a.swapaxes(-1, -2)) @ lora_b.swapaxes(-1, -2)) * scale


def dora_factor(base: nn.Module, delta_weight: mx.array, magnitude: mx.array) -> mx.array:
    """magnitude / ||W + delta_weight|| per output row (out,), in float32.

    The norm is held constant in backpropagation, as in the DoRA paper (section 4.3) and PEFT.
    """
    direction = dense_weight(base).astype(mx.float32) + delta_weight
    return magnitude / mx.stop_gradient(mx.linalg.norm(direction, axis=1))


def dora_output(
    base: nn.Module, y: mx.array, base_out: mx.array, factor: mx.array, delta: mx.array
) -> mx.array:
    """bias + factor * (x W.T + delta), written as a correction to y = base(x).

    base_out is base(x) for the input the direction sees (the dropped-out one in training).
    Written as y + (f - 1) * xW + f * delta, so factor == 1 and delta == 0 give y back bit for bit.
    """
    if "bias" in base:
        # The bias is not part of the direction W, so it must not be rescaled.
        base_out = base_out - base.bias
    update = (factor - 1) * base_out + factor * delta
    return y + update.astype(y.dtype)


def fold_weight(
    base: nn.Module, weight: mx.array, dequantize: bool = False, dtype: mx.Dtype | None = None
) -> nn.Module:
    """A plain layer with `base`'s bias and the (out, in) `weight`, shaped like `base`.

    A quantised base gives a QuantizedLinear with its own group size, bits and mode (so the
    result is as small as the base), unless `dequantize` asks for an nn.Linear. dtype: of the
    dense weight, or of the scales and biases; default the base's.
    """
    if not bool(mx.all(mx.isfinite(weight))):
        # As PEFT's safe_merge: a broken adapter must not silently poison the base.
        raise OndeviceLoraError(
            "fusing this adapter gives non-finite weights (NaN or inf): the adapter is broken; "
            "retrain it, or fuse an earlier checkpoint"
        )
    if dtype is None:
        dtype = base.scales.dtype if isinstance(base, nn.QuantizedLinear) else base.weight.dtype
    in_dims, out_dims = linear_dims(base)
    fused = nn.Linear(in_dims, out_dims, bias="bias" in base)
    fused.weight = weight.astype(dtype)
    if "bias" in base:
        fused.bias = base.bias.astype(dtype)
    if isinstance(base, nn.QuantizedLinear) and not dequantize:
        fused = nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, base.mode)
    return fused


class AdapterWrapper(nn.Module):
    """A layer that keeps a frozen base layer under `base` and adds adapter tensors beside it.

    Code that needs the base model back (base_parameters, the fingerprint, target resolution)
    looks for this class: everything under `<wrapper>.base` is the base, the rest is adapter.
    """


class LoRALinear(AdapterWrapper):
    """A frozen linear layer (`base`) plus a trainable low-rank update lora_b @ lora_a."""

    @classmethod
    def from_base(
        cls,
        layer: nn.Module,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ):
        """Wrap `layer` (`nn.Linear` or `nn.QuantizedLinear`); the wrapper freezes it."""
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            raise TypeError(
                f"{cls.__name__} wraps nn.Linear or nn.QuantizedLinear, not {type(layer).__name__}"
            )
        return cls(layer, rank, alpha, dropout, use_rslora)

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, use_rslora: bool):
        super().__init__()
        base.freeze()
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scale = lora_scale(rank, alpha, use_rslora)
        self.dropout_p = dropout
        # No dropout layer at p = 0: nn.Dropout would still draw a mask (and RNG state) each step.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        in_dims, out_dims = linear_dims(base)
        # Kaiming-uniform with a = sqrt(5), as PEFT and nn.Linear: U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_dims), dtype=ADAPTER_DTYPE)
        # B starts at zero so a fresh adapter leaves the base's output unchanged.
        self.lora_b = mx.zeros((out_dims, rank), dtype=ADAPTER_DTYPE)

    @property
    def adapter_parameter_names(self) -> tuple[str, ...]:
        return ("lora_a", "lora_b")

    def lora_delta(self, x: mx.array) -> mx.array:
        """scale * (x @ A.T) @ B.T, without dropout: (..., in) -> (..., out)."""
        return low_rank_delta(x, self.lora_a, self.lora_b, self.scale)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        # The sum is cast back so the layer's output dtype is the base's (fp16 stays fp16).
        return y + self.lora_delta(self.dropout(x)).astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """scale * B @ A, the (out, in) update that fuse() adds to the base weight."""
        return (self.lora_b @ self.lora_a) * self.scale

    def direction(self) -> mx.array:
        """W + scale * B @ A in float32: the base weight with the update folded in."""
        return dense_weight(self.base).astype(mx.float32) + self.delta_weight()

    def fused_weight(self) -> mx.array:
        """The (out, in) float32 weight of the equivalent plain layer (bias aside)."""
        return self.direction()

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain layer computing base + adapter: `nn.Linear`, or `nn.QuantizedLinear` again.

        A quantised base is de-quantised, updated and re-quantised with its own group size and
        bits (so the result is as small as the base), unless `dequantize` asks for a dense layer.
        """
        return fold_weight(self.base, self.fused_weight(), dequantize)


class DoRALinear(LoRALinear):
    """Weight-decomposed LoRA (Liu et al. 2024): a learned magnitude per output row.

    The direction W + scale * B @ A is normalised row by row and rescaled by `magnitude`. As in
    the paper (section 4.3) and PEFT, the norm is treated as a constant in backpropagation, which
    saves memory and barely changes the result. The base's bias is added after the rescaling.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, use_rslora: bool):
        super().__init__(base, rank, alpha, dropout, use_rslora)
        # The row norms of the (de-quantised) base weight: a fresh adapter is then the identity.
        self.magnitude = self.weight_norm()

    @property
    def adapter_parameter_names(self) -> tuple[str, ...]:
        return ADAPTER_PARAMETER_NAMES

    def weight_norm(self) -> mx.array:
        """||W + scale * B @ A|| over each row (out,), computed in float32, no gradient."""
        return mx.stop_gradient(mx.linalg.norm(self.direction(), axis=1))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        # factor is exactly 1 for a fresh adapter (magnitude was computed by weight_norm()).
        factor = dora_factor(self.base, self.delta_weight(), self.magnitude)  # (out,)
        if self.training and self.dropout_p > 0:
            # PEFT's convention: the rescaled direction sees the dropped-out input, while the
            # base output added back keeps the clean one.
            x = self.dropout(x)
            base_out = self.base(x)
        else:
            base_out = y
        return dora_output(self.base, y, base_out, factor, self.lora_delta(x))

    def fused_weight(self) -> mx.array:
        # Each row of the direction, rescaled to its learned magnitude.
        factor = dora_factor(self.base, self.delta_weight(), self.magnitude)
        return self.direction() * factor[:, None]


# --- adapters inside a model ---------------------------------------------------------------


def wrapped_modules(model: nn.Module) -> dict[str, AdapterWrapper]:
    """Every layer of `model` wrapped by an adapter layer of any kind, by module path."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, AdapterWrapper)
    }


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapter layer in `model`, by module path ("model.layers.0.self_attn.q_proj")."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)
    }


def adapter_tensors(model: nn.Module) -> dict[str, mx.array]:
    """The adapter tensors of `model` under their saved names ("<module path>.lora_a")."""
    return {
        f"{path}.{name}": module[name]
        for path, module in adapter_modules(model).items()
        for name in module.adapter_parameter_names
    }


def base_parameters(model: nn.Module) -> dict[str, mx.array]:
    """The base model's parameters under their original names, whether or not it is wrapped."""
    wrapped = wrapped_modules(model)
    params = {}
    for name, value in tree_flatten(model.parameters()):
        parts = name.split(".")
        # The wrapper owning this parameter, if any: the longest prefix that is one.
        owner = next(
            (i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in wrapped), None
        )
        if owner is not None:
            if parts[owner] != "base":
                continue  # lora_a, lora_b, magnitude, or a named adapter's tensors
            # "q_proj.base.weight" -> "q_proj.weight"
            name = ".".join(parts[:owner] + parts[owner + 1 :])
        params[name] = value
    return params


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Swap modules in place by path ("model.layers.0.self_attn.q_proj"), via their parents."""
    modules = dict(model.named_modules())
    for path, new in replacements.items():
        parent, _, name = path.rpartition(".")
        modules[parent].update_modules({name: new})


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> list[str]:
    """Fold every adapter into its base layer in place (see LoRALinear.fuse); returns the paths."""
    fused = {path: m.fuse(dequantize) for path, m in adapter_modules(model).items()}
    replace_modules(model, fused)
    return list(fused)
