"""Pieces every decoder family shares: config parsing, rotary embeddings, masks and the KV cache."""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelLoadError

# config.json keys every model needs: a default for them would build some other model.
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Sizes that must be positive integers wherever they are given.
POSITIVE_SIZES = REQUIRED_KEYS + (
    "intermediate_size", "num_key_value_heads", "head_dim", "max_position_embeddings",
)  # fmt: skip


@dataclasses.dataclass
class BaseModelArgs:
    """A model's hyper-parameters; field names are the keys of the Hub's config.json."""

    @classmethod
    def from_dict(cls, config: dict):
        """The arguments a config.json dict gives; a missing required key, or a value of the
        wrong type, is a ModelLoadError naming the key, never a default or a traceback."""
        if not isinstance(config, dict):
            raise ModelLoadError(
                f"config.json must be a JSON object {{...}}, got a JSON {type(config).__name__}."
            )
        # Hub configs carry many keys we do not use (torch_dtype, architectures, ...): ignore them.
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in fields}
        problems = [f"{key} is missing" for key in REQUIRED_KEYS if key not in values]
        for key, value in values.items():
            problems += _type_problems(key, value, str(fields[key].type))
        if problems:
            raise ModelLoadError(
                "config.json does not describe a model: " + "; ".join(problems) + ". Fix it, or "
                "fetch the model's config.json again."
            )
        try:
            return cls(**values)
        except ModelLoadError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as e:
            raise ModelLoadError(
                f"config.json holds settings that do not fit together: {e!r}."
            ) from None


def _type_problems(key: str, value, annotation: str) -> list[str]:
    """What is wrong with one config.json value, judged by its field's annotation."""
    if value is None:
        return [] if "None" in annotation else [f"{key} is null"]
    kinds = annotation.split(" | ")
    if "int" in kinds and "float" not in kinds:
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{key} must be an integer, got {value!r}"]
        if key in POSITIVE_SIZES and value <= 0:
            return [f"{key} must be a positive integer, got {value}"]
    elif "float" in kinds:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return [f"{key} must be a number, got {value!r}"]
        if not math.isfinite(value):
            return [f"{key} must be a finite number, got {value!r}"]
    elif kinds[0] == "bool" and not isinstance(value, bool):
        return [f"{key} must be true or false, got {value!r}"]
    elif kinds[0] == "str" and not isinstance(value, str):
        return [f"{key} must be a string, got {value!r}"]
    elif kinds[0].startswith("dict") and not isinstance(value, dict):
        return [f"{key} must be an object, got {value!r}"]
    elif kinds[0].startswith("list") and not isinstance(value, list):
        return [f"{key} must be a list, got {value!r}"]
    return []


def dequantized_weight(module: nn.Module) -> mx.array:
    """The float weight a quantised Linear or Embedding stands for."""
    return mx.dequantize(
        module.weight,
        module.scales,
        module.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
    )


def rope_settings(rope_theta: float, rope_scaling: dict | None, rope_parameters: dict | None):
    """Return (theta, scaling) from either config convention.

    Hub configs keep `rope_theta` and `rope_scaling` at the top level; configs written by
    transformers 5 nest both in `rope_parameters`.
    """
    if rope_parameters:
        rope_theta = rope_parameters.get("rope_theta", rope_theta)
        rope_scaling = rope_parameters
    return float(rope_theta), rope_scaling


class RoPE(nn.Module):
    """Rotary position embedding (Su et al. 2021) over the first `dims` features of each head.

    Supports the default rotation, linear position scaling, Llama 3.1's frequency-dependent
    scaling, which stretches only the low frequencies so long contexts keep local detail, and
    Phi-3's LongRoPE, which scales each frequency by a fitted factor (one list for sequences
    within the pretraining length, another beyond it) and the rotated features by a constant.
    """

    SCALING_TYPES = ("default", "linear", "llama3", "longrope")

    def __init__(self, dims: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.dims = dims
        scaling = scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it
        if kind not in self.SCALING_TYPES:
            raise ModelLoadError(
                f"rope scaling type {kind!r} (config.json rope_scaling) is not supported; "
                f"supported: {', '.join(self.SCALING_TYPES)}."
            )
        self.position_scale = 1.0 / scaling["factor"] if kind == "linear" else 1.0
        self.theta = theta
        self._scaling = {**scaling, "rope_type": kind}  # underscore: not a parameter
        # mx.fast.rope takes either a base or the wavelengths/(2*pi) per rotated pair.
        self._periods = _llama3_periods(dims, theta, scaling) if kind == "llama3" else None
        self._longrope = longrope_settings(dims, theta, scaling) if kind == "longrope" else None

    def __call__(self, x: mx.array, offset: int = 0, positions: mx.array | None = None):
        """Rotate x (B, n_heads, L, head_dim) for positions offset.. offset + L - 1, or, when
        `positions` (B, L) is given, for those explicit positions (packed rows, where each
        example's positions restart at 0)."""
        if positions is None:
            return self._rope(x, offset, offset + x.shape[2])
        B, H, L, D = x.shape
        # mx.fast.rope takes one offset per batch entry: make every token its own entry, of
        # length 1, whose offset is its position. The same kernel as the fast path, so the
        # rotation is bit-for-bit the one an unpacked example gets.
        per_token = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
        positions = positions.reshape(-1).astype(mx.int32)
        length = int(positions.max().item()) + 1 if self._longrope else L
        rotated = self._rope(per_token, positions, length)
        return rotated.reshape(B, L, H, D).transpose(0, 2, 1, 3)

    def settings(self) -> tuple[int, float, dict]:
        """(rotated features, theta, rope_scaling with its rope_type), for exporters."""
        return self.dims, self.theta, dict(self._scaling)

    def _rope(self, x: mx.array, offset, length: int) -> mx.array:
        periods = self._periods
        if self._longrope is not None:
            # transformers picks the factors by the longest position of the call.
            periods = self._longrope.periods(length)
        # HF's rotate_half layout is MLX's non-traditional one.
        rotated = mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None if periods is not None else self.theta,
            scale=self.position_scale,
            offset=offset,
            freqs=periods,
        )
        if self._longrope is None or self._longrope.attention_factor == 1.0:
            return rotated
        # LongRoPE scales cos and sin, i.e. the rotated features only.
        factor = mx.array(self._longrope.attention_factor, x.dtype)
        if self.dims == x.shape[-1]:
            return rotated * factor
        return mx.concatenate(
            [rotated[..., : self.dims] * factor, rotated[..., self.dims :]], axis=-1
        )


@dataclasses.dataclass
class LongRoPE:
    """Phi-3's LongRoPE: per-frequency factors, short within the pretraining context, long
    beyond it, and a constant on cos and sin (sqrt(1 + ln(factor) / ln(original context)))."""

    short_periods: mx.array
    long_periods: mx.array
    original_context: int
    attention_factor: float

    def periods(self, length: int) -> mx.array:
        return self.long_periods if length > self.original_context else self.short_periods


def longrope_settings(dims: int, theta: float, scaling: dict) -> LongRoPE:
    """LongRoPE from a rope_scaling dict carrying short_factor, long_factor and
    original_max_position_embeddings (and max_position_embeddings for the default factor)."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or scaling["max_position_embeddings"] / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    base_periods = theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    for name in ("short_factor", "long_factor"):
        if len(scaling[name]) != dims // 2:
            raise ModelLoadError(
                f"config.json rope_scaling.{name} has {len(scaling[name])} values; this model "
                f"rotates {dims} features of each head, so it needs {dims // 2}."
            )
    return LongRoPE(
        short_periods=mx.array(scaling["short_factor"], mx.float32) * base_periods,
        long_periods=mx.array(scaling["long_factor"], mx.float32) * base_periods,
        original_context=original,
        attention_factor=float(attention_factor),
    )


def _llama3_periods(dims: int, theta: float, scaling: dict) -> mx.array:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)

    inv_freq = 1.0 / (theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = old_context / low_freq_factor
    high_freq_wavelength = old_context / high_freq_factor
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    smooth = (old_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = mx.where(wavelength > low_freq_wavelength, inv_freq / factor, blended)
    scaled = mx.where(wavelength < high_freq_wavelength, inv_freq, scaled)
    return 1.0 / scaled


class KVCache:
    """Keys and values of one layer, grown in blocks so decoding does not copy on every token."""

    block = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # keys, values: (B, n_kv_heads, L, head_dim)
        new = keys.shape[2]
        end = self.offset + new
        if self.keys is None or end > self.keys.shape[2]:
            grow = self.block * ((new + self.block - 1) // self.block)
            shape = (*keys.shape[:2], grow, keys.shape[3])
            more_k = mx.zeros(shape, keys.dtype)
            more_v = mx.zeros((*shape[:3], values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = more_k, more_v
            else:
                kept_k = self.keys[..., : self.offset, :]
                kept_v = self.values[..., : self.offset, :]
                self.keys = mx.concatenate([kept_k, more_k], axis=2)
                self.values = mx.concatenate([kept_v, more_v], axis=2)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def trim(self, length: int) -> None:
        """Keep only the first `length` positions; the next update overwrites the rest."""
        self.offset = max(0, min(self.offset, length))


def make_cache(model) -> list[KVCache]:
    """One empty KV cache per decoder layer of `model`."""
    return [KVCache() for _ in model.layers]


def make_attention_mask(
    length: int,
    offset: int,
    padding_mask: mx.array | None,
    dtype: mx.Dtype,
    window: int | None = None,
) -> mx.array | str | None:
    """The additive mask for `length` new queries after `offset` cached positions.

    padding_mask: optional (B, offset + length) array, 1 for real tokens and 0 for padding.
    window: a sliding-window layer's `sliding_window`: query t sees keys t - window + 1 .. t
    (by index in the sequence, as transformers counts it), None for full causal attention.
    """
    fits_window = window is None or offset + length <= window
    if padding_mask is None and fits_window:
        return "causal" if length > 1 else None
    query_positions = offset + mx.arange(length)[:, None]  # (L, 1)
    key_positions = mx.arange(offset + length)[None]  # (1, L_kv)
    allowed = within_window(query_positions, key_positions, window)[None, None]  # (1,1,L,L_kv)
    if padding_mask is not None:
        allowed = allowed & padding_mask.astype(mx.bool_)[:, None, None, :]  # (B, 1, L, L_kv)
    # A finite minimum, not -inf: a padding query that may see no key then gets a uniform
    # softmax instead of NaN, and NaN would otherwise leak into real positions' gradients.
    return mx.where(allowed, mx.array(0, dtype), mx.array(mx.finfo(dtype).min, dtype))


def within_window(query_positions: mx.array, key_positions: mx.array, window: int | None):
    """Causal visibility, True where a key may be seen: key <= query, and, in a sliding-window
    layer, query - key < window."""
    allowed = key_positions <= query_positions
    if window is not None:
        allowed = allowed & (query_positions - key_positions < window)
    return allowed


def make_segment_mask(segment_ids: mx.array, dtype: mx.Dtype, window: int | None = None):
    """The additive mask of packed rows: causal attention within each segment only.

    segment_ids: (B, L) integers, equal for the tokens of one example (padding forms a segment
    of its own). Returns (B, 1, L, L): 0 where query t may see key s (s <= t, same segment,
    and t - s < window for a sliding-window layer), a large negative number elsewhere, so each
    example attends as if it were alone in its row.
    """
    L = segment_ids.shape[1]
    causal = within_window(mx.arange(L)[:, None], mx.arange(L)[None, :], window)  # (L_q, L_k)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, L_q, L_k)
    allowed = (same & causal)[:, None]  # (B, 1, L_q, L_k)
    return mx.where(allowed, mx.array(0, dtype), mx.array(mx.finfo(dtype).min, dtype))


class NoRoPE(nn.Module):
    """The identity in RoPE's place, for layers without positional rotation (SmolLM3's NoPE
    layers): their attention sees positions only through the causal mask."""

    def __call__(self, x: mx.array, offset: int = 0, positions: mx.array | None = None):
        return x
