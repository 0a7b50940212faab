"""MIL builder for a Llama-family decoder (Llama, Mistral, Qwen2/3, SmolLM3, Phi-3, Gemma 3
text) with a stateful KV cache.

One `convert_<piece>()` per piece of the network, each adding MIL ops for one piece to the
function being built; `convert_decoder()` assembles them into one function (prefill or decode)
and `build_program()` wraps it in a program. The weights arrive as numpy arrays (see
`DecoderWeights`, filled from an MLX model by weights.py), so nothing here depends on MLX. The
package layout is described in export.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, types
from coremltools.converters.mil.mil.var import Var

from .settings import OPSET, STATE_DTYPE, Precision

STATE_NAMES = ("key_cache", "value_cache")
LOW_STATE_NAMES = ("key_cache_low", "value_cache_low")  # fp32 exports only
# The linear layers of a decoder layer, by the submodule that holds them (Hugging Face names).
PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
# Phi-3 stores q, k, v as one qkv_proj and gate, up as one gate_up_proj; the package keeps them
# fused (adapters on them are one branch each, as PEFT trains them) and slices the output.
FUSED_PROJECTIONS = {"self_attn": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")}
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj") + (
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
)


@dataclass
class QuantizedWeight:
    """A (rows, cols) matrix as 4- or 8-bit codes: W = scale * (code - offset) per block of
    group_size columns.

    codes: uint8 (rows, cols) in [0, 2^bits); scales, offsets: fp16 (rows, cols // group_size).
    """

    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray
    bits: int = 4

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.size * self.bits // 8 + self.scales.nbytes + self.offsets.nbytes


@dataclass
class LoraBranch:
    """An unmerged adapter on one linear layer: scale * (x @ a.T) @ b.T.

    a (r, in) and b (out, r) are numpy arrays (constants) or MIL vars (function inputs);
    row_factor (out,) is DoRA's magnitude / ||W + scale * b @ a|| applied to the whole output.
    """

    a: np.ndarray | Var
    b: np.ndarray | Var
    scale: float | Var
    row_factor: np.ndarray | None = None


@dataclass
class LinearWeights:
    weight: np.ndarray | QuantizedWeight  # (out, in)
    bias: np.ndarray | None = None
    lora: LoraBranch | None = None
    # The whole output times this factor, folded into the constants at build time (a power of
    # two: exact in fp16). It carries the residual stream rescaled, see fp16_range.py.
    output_scale: float = 1.0


@dataclass
class LayerWeights:
    """One decoder layer. Its projections are either q/k/v_proj and gate/up_proj, or the fused
    qkv_proj and gate_up_proj (Phi-3); norms are RMSNorm weights as multiplied (Gemma's
    1 + weight already added)."""

    o_proj: LinearWeights
    down_proj: LinearWeights
    input_layernorm: np.ndarray
    post_attention_layernorm: np.ndarray
    q_proj: LinearWeights | None = None
    k_proj: LinearWeights | None = None
    v_proj: LinearWeights | None = None
    gate_proj: LinearWeights | None = None
    up_proj: LinearWeights | None = None
    qkv_proj: LinearWeights | None = None
    gate_up_proj: LinearWeights | None = None
    q_norm: np.ndarray | None = None  # Qwen3, Gemma 3: RMSNorm over each head
    k_norm: np.ndarray | None = None
    # Gemma 3 normalises each sub-layer's output too ("sandwich" norms): then
    # post_attention_layernorm is applied to the attention's output, and these two wrap the MLP.
    pre_feedforward_layernorm: np.ndarray | None = None
    post_feedforward_layernorm: np.ndarray | None = None
    rope: str | None = "default"  # key of DecoderWeights.ropes; None: no rotation (NoPE)
    window: int | None = None  # sliding-window attention over the last `window` positions

    def linears(self) -> dict[str, LinearWeights]:
        """The layer's projections that exist, by name."""
        return {n: getattr(self, n) for n in ALL_PROJECTIONS if getattr(self, n) is not None}


@dataclass
class DecoderWeights:
    """Everything a decoder function needs; lm_head None means it is tied to the embedding."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    embedding: np.ndarray | QuantizedWeight  # (vocab, hidden)
    layers: list[LayerWeights]
    norm: np.ndarray
    lm_head: LinearWeights | None
    # name -> (cos, sin), each (context_length, rotary_dims), rows are positions; sin's first
    # half negated (see convert_rope). Gemma 3 has a local and a global table.
    ropes: dict[str, tuple[np.ndarray, np.ndarray]]
    precision: Precision
    context_length: int  # positions the KV cache holds
    activation: str = "silu"  # the MLP's gate: silu (SwiGLU) or gelu_tanh (GeGLU)
    attention_scale: float | None = None  # None: head_dim ** -0.5
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    # The residual stream is carried divided by this power of two so that it fits fp16; the
    # norms that read it take eps / residual_scale**2 and compute the same function (see
    # fp16_range.rescale_residual, which scales every write into the residual to match).
    residual_scale: float = 1.0

    @property
    def cache_shape(self) -> tuple[int, int, int, int]:
        return (len(self.layers), self.num_kv_heads, self.context_length, self.head_dim)


# --- pieces ---------------------------------------------------------------------------------


def _weight(w: np.ndarray | QuantizedWeight, dtype, factor: float = 1.0) -> Var:
    """A constant weight times `factor`: dense in the compute dtype, or de-quantised from its
    codes (the factor goes into the per-block scales; the codes stay untouched)."""
    if isinstance(w, QuantizedWeight):
        # uint4 codes are stored packed, two per byte; Core ML expands them at load time.
        data_type = types.np_uint4_dtype if w.bits == 4 else np.uint8
        return mb.constexpr_blockwise_shift_scale(
            data=w.codes.astype(data_type),
            scale=(w.scales.astype(np.float32) * factor).astype(np.float16),
            offset=w.offsets.astype(np.float16),
        )
    return mb.const(val=(w * factor if factor != 1.0 else w).astype(dtype))


def convert_embedding(input_ids: Var, table: Var, w: DecoderWeights) -> Var:
    """(1, L) ids -> (1, L, hidden) rows of the embedding table (times Gemma's scale)."""
    h = mb.gather(x=table, indices=input_ids, axis=0)
    if w.embed_scale is None:
        return h
    return mb.mul(x=h, y=np.array(w.embed_scale, w.precision.np_dtype))


def convert_linear(x: Var, lin: LinearWeights, precision: Precision) -> Var:
    """x @ W.T + bias, plus the unmerged adapter branch when there is one."""
    dtype, factor = precision.np_dtype, lin.output_scale
    weight = _weight(lin.weight, dtype, factor)
    bias = None if lin.bias is None else (lin.bias * factor).astype(dtype)
    lora = lin.lora
    if lora is None:
        return mb.linear(x=x, weight=weight, bias=bias)
    y = mb.linear(x=x, weight=weight)
    # matmul, not linear, so that a and b may be function inputs as well as constants.
    a = lora.a.astype(dtype) if isinstance(lora.a, np.ndarray) else lora.a
    b = lora.b.astype(dtype) if isinstance(lora.b, np.ndarray) else lora.b
    down = mb.matmul(x=x, y=a, transpose_y=True)  # (1, L, r)
    up = mb.matmul(x=down, y=b, transpose_y=True)  # (1, L, out)
    if isinstance(lora.scale, (int, float)):
        scale = np.array(lora.scale * factor, dtype)
    else:  # a function input (swappable packages)
        scale = lora.scale if factor == 1.0 else mb.mul(x=lora.scale, y=np.array(factor, dtype))
    y = mb.add(x=y, y=mb.mul(x=up, y=scale))
    if lora.row_factor is not None:
        y = mb.mul(x=y, y=lora.row_factor.astype(dtype))
    return y if bias is None else mb.add(x=y, y=bias)


def convert_norm(x: Var, weight: np.ndarray, eps: float, precision: Precision) -> Var:
    """RMSNorm over the last axis, x / sqrt(mean(x^2) + eps) * weight. Core ML has no RMSNorm
    op.

    fp16 (int4 and fp16 exports): mean(x^2) overflows fp16 once |x| passes 256 (real models'
    residual streams reach 1e4-1e5), and a kernel that squares in fp16 gives inf. So each row
    is first divided by its own largest |x| (m, floored at fp16's smallest normal number so a
    zero row stays finite): with y = x / m every y^2 <= 1 and the sum of a row <= its width, so
    no step can overflow whatever the input, and
        RMSNorm(x) = y / sqrt(mean(y^2) + (sqrt(eps) / m)^2) * weight
    is the same function. Six cheap ops (abs, reduce_max, maximum, real_div, square, add) more
    than a fused norm; all run on the Neural Engine, unlike fp32 ops, which would split the
    graph between the Neural Engine and the CPU at every norm.
    """
    dtype = precision.np_dtype
    if precision.dtype == types.fp32:
        mean_square = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
        inv_rms = mb.rsqrt(x=mean_square, epsilon=np.array(eps, dtype))
        return mb.mul(x=mb.mul(x=x, y=inv_rms), y=weight.astype(dtype))
    largest = mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True)
    largest = mb.maximum(x=largest, y=np.array(2.0**-14, dtype))  # fp16's smallest normal
    y = mb.real_div(x=x, y=largest)
    mean_square = mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)
    eps_term = mb.real_div(x=np.array(np.sqrt(eps), dtype), y=largest)  # sqrt(eps) / m
    mean_square = mb.add(x=mean_square, y=mb.mul(x=eps_term, y=eps_term))
    inv_rms = mb.rsqrt(x=mean_square, epsilon=np.array(0.0, dtype))
    return mb.mul(x=mb.mul(x=y, y=inv_rms), y=weight.astype(dtype))


def convert_rope(x: Var, cos: Var, sin: Var) -> Var:
    """Rotary embedding, Hugging Face's rotate-half layout: x * cos + rotate_half(x) * sin, over
    the first rotary_dims features of each head (all of them but in Phi-4-mini).

    x: (1, heads, L, head_dim); cos, sin: (L, rotary_dims). sin's first half is stored negated,
    so rotate_half(x) * sin == concat([x2, x1]) * sin, one op fewer than negating x2.
    """
    dims, head_dim = cos.shape[-1], x.shape[-1]
    rotated = x if dims == head_dim else _last_axis(x, 0, dims)
    half = dims // 2
    x1 = _last_axis(rotated, 0, half)
    x2 = _last_axis(rotated, half, dims)
    swapped = mb.concat(values=[x2, x1], axis=-1)
    out = mb.add(x=mb.mul(x=rotated, y=cos), y=mb.mul(x=swapped, y=sin))
    if dims == head_dim:
        return out
    return mb.concat(values=[out, _last_axis(x, dims, head_dim)], axis=-1)


def _last_axis(x: Var, begin: int, end: int) -> Var:
    """x[..., begin:end]; end None: to the end."""
    rank = len(x.shape)
    end = x.shape[-1] if end is None else end
    return mb.slice_by_index(x=x, begin=[0] * (rank - 1) + [begin], end=[*x.shape[:-1], end])


@dataclass
class Step:
    """What every layer of one function shares: the call's positions and the threaded caches.

    caches maps each state name to the latest value of that state: each state is read once at
    the start and every layer works on the value the previous layer produced. Reading a state
    again per layer is miscompiled by coremltools' common::remove_redundant_ops (PR 2786).
    """

    length: int
    position: Var  # (1,) int32
    ropes: dict[str, tuple[Var, Var]]  # name -> this call's (cos, sin) rows, (L, rotary_dims)
    masks: dict[int | None, Var]  # window -> (n_rep * L, context) bool, True where a query
    caches: dict[str, Var]  # may see a key


def convert_kv_cache(step: Step, index: int, keys: Var, values: Var, w: DecoderWeights):
    """Write this call's keys and values into layer `index` of the caches; return the layer's
    full (1, kv_heads, context, head_dim) keys and values in the compute dtype."""
    _, kv_heads, context, head_dim = w.cache_shape
    begin = mb.concat(
        values=[np.array([index, 0], np.int32), step.position, np.array([0], np.int32)], axis=0
    )
    end = mb.add(x=begin, y=np.array([1, kv_heads, step.length, head_dim], np.int32))
    layer = {"begin": [index, 0, 0, 0], "end": [index + 1, kv_heads, context, head_dim]}
    out = []
    for new, name, low_name in zip((keys, values), STATE_NAMES, LOW_STATE_NAMES):
        high = mb.cast(x=new, dtype="fp16") if new.dtype != STATE_DTYPE else new
        step.caches[name] = mb.slice_update(x=step.caches[name], update=high, begin=begin, end=end)
        full = mb.slice_by_index(x=step.caches[name], **layer)
        if w.precision.split_cache:
            # fp16(x) + fp16(x - fp16(x)) keeps ~22 bits of x: fp32 parity with fp16 states.
            low = mb.cast(x=mb.sub(x=new, y=mb.cast(x=high, dtype="fp32")), dtype="fp16")
            step.caches[low_name] = mb.slice_update(
                x=step.caches[low_name], update=low, begin=begin, end=end
            )
            full_low = mb.slice_by_index(x=step.caches[low_name], **layer)
            full = mb.add(x=mb.cast(x=full, dtype="fp32"), y=mb.cast(x=full_low, dtype="fp32"))
        out.append(full)
    return out


def convert_attention(x: Var, layer: LayerWeights, index: int, step: Step, w: DecoderWeights):
    """Grouped-query attention over the cache: (1, L, hidden) -> (1, L, hidden)."""
    p, L = w.precision, step.length
    heads, kv_heads, head_dim = w.num_heads, w.num_kv_heads, w.head_dim

    if layer.qkv_proj is not None:  # Phi-3: rows are the query heads, key heads, value heads
        qkv = convert_linear(x, layer.qkv_proj, p)
        q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
        q, k, v = (_last_axis(qkv, b, e) for b, e in ((0, q_end), (q_end, k_end), (k_end, None)))
    else:
        q, k, v = (convert_linear(x, lin, p) for lin in (layer.q_proj, layer.k_proj, layer.v_proj))

    def heads_first(y, n, norm):
        y = mb.reshape(x=y, shape=[1, L, n, head_dim])
        if norm is not None:  # Qwen3 and Gemma 3 normalise each head before the rotation
            y = convert_norm(y, norm, w.rms_norm_eps, p)
        return mb.transpose(x=y, perm=[0, 2, 1, 3])  # (1, n, L, head_dim)

    queries = heads_first(q, heads, layer.q_norm)
    keys = heads_first(k, kv_heads, layer.k_norm)
    values = heads_first(v, kv_heads, None)
    if layer.rope is not None:  # SmolLM3's NoPE layers do not rotate
        cos, sin = step.ropes[layer.rope]
        queries, keys = convert_rope(queries, cos, sin), convert_rope(keys, cos, sin)
    if w.attention_scale is not None:
        # The attention op scales by head_dim ** -0.5; Gemma scales by its own factor.
        factor = w.attention_scale * head_dim**0.5
        queries = mb.mul(x=queries, y=np.array(factor, p.np_dtype))
    keys, values = convert_kv_cache(step, index, keys, values, w)
    # Query heads h*n_rep .. h*n_rep + n_rep - 1 share KV head h: fold them into the query
    # length, (1, heads, L, d) -> (1, kv_heads, n_rep * L, d), instead of repeating the cache.
    grouped = mb.reshape(x=queries, shape=[1, kv_heads, heads // kv_heads * L, head_dim])
    out = mb.scaled_dot_product_attention(
        query=grouped, key=keys, value=values, attn_mask=step.masks[layer.window]
    )
    out = mb.reshape(x=out, shape=[1, heads, L, head_dim])
    out = mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[1, L, heads * head_dim])
    return convert_linear(out, layer.o_proj, p)


def convert_mlp(x: Var, layer: LayerWeights, w: DecoderWeights) -> Var:
    """SwiGLU, down(silu(gate(x)) * up(x)), or GeGLU with gelu_tanh in silu's place."""
    p = w.precision
    if layer.gate_up_proj is not None:  # Phi-3: the first half of the rows is the gate
        both = convert_linear(x, layer.gate_up_proj, p)
        inner = both.shape[-1] // 2
        gate, up = _last_axis(both, 0, inner), _last_axis(both, inner, 2 * inner)
    else:
        gate, up = convert_linear(x, layer.gate_proj, p), convert_linear(x, layer.up_proj, p)
    if w.activation == "gelu_tanh":
        gate = mb.gelu(x=gate, mode="TANH_APPROXIMATION")
    else:
        gate = mb.silu(x=gate)
    return convert_linear(mb.mul(x=gate, y=up), layer.down_proj, p)


def convert_layer(h: Var, layer: LayerWeights, index: int, step: Step, w: DecoderWeights):
    """One decoder layer: pre-norm residual blocks, or Gemma's sandwich-normed ones.

    h is the residual stream divided by w.residual_scale: the norms that read it take eps
    divided by its square, the others (Gemma's post-norms, over sub-layer outputs) eps itself.
    The residual adds are named, so that the validator can say which layer overflowed.
    """
    eps, p = w.rms_norm_eps, w.precision
    residual_eps = eps / w.residual_scale**2
    attended = convert_attention(
        convert_norm(h, layer.input_layernorm, residual_eps, p), layer, index, step, w
    )
    names = {
        "attention": f"layers_{index}_residual_attention",
        "mlp": f"layers_{index}_residual_mlp",
    }
    if layer.pre_feedforward_layernorm is None:
        h = mb.add(x=h, y=attended, name=names["attention"])
        normed = convert_norm(h, layer.post_attention_layernorm, residual_eps, p)
        return mb.add(x=h, y=convert_mlp(normed, layer, w), name=names["mlp"])
    h = mb.add(
        x=h,
        y=convert_norm(attended, layer.post_attention_layernorm, eps, p),
        name=names["attention"],
    )
    mlp = convert_mlp(convert_norm(h, layer.pre_feedforward_layernorm, residual_eps, p), layer, w)
    return mb.add(
        x=h, y=convert_norm(mlp, layer.post_feedforward_layernorm, eps, p), name=names["mlp"]
    )


def convert_lm_head(h: Var, w: DecoderWeights, embedding: Var) -> Var:
    """(1, L, hidden) -> (1, L, vocab) logits; a tied head reuses the embedding constant."""
    if w.lm_head is None:
        logits = mb.linear(x=h, weight=embedding)
    else:
        logits = convert_linear(h, w.lm_head, w.precision)
    cap = w.final_logit_softcapping
    if cap is not None:
        dtype = w.precision.np_dtype
        logits = mb.mul(
            x=mb.tanh(x=mb.mul(x=logits, y=np.array(1 / cap, dtype))), y=np.array(cap, dtype)
        )
    return mb.identity(x=logits, name="logits")


def _step(w: DecoderWeights, length: int, position: Var, caches: dict[str, Var]) -> Step:
    """Positions, rotary rows and the causal masks (one per window) for one call of `length`
    tokens."""
    offsets = np.arange(length, dtype=np.int32)
    positions = mb.add(x=position, y=offsets)  # (L,) absolute positions of this call
    dtype = w.precision.np_dtype
    ropes = {
        name: tuple(mb.gather(x=t.astype(dtype), indices=positions, axis=0) for t in tables)
        for name, tables in w.ropes.items()
    }
    # Rows follow the grouped query layout of convert_attention: n_rep blocks of L queries.
    n_rep = w.num_heads // w.num_kv_heads
    query_positions = mb.add(x=position, y=np.tile(offsets, n_rep).reshape(-1, 1))  # (n_rep*L, 1)
    key_index = np.arange(w.context_length, dtype=np.int32).reshape(1, -1)  # (1, context)
    masks = {}
    for window in sorted({layer.window for layer in w.layers}, key=lambda x: x or 0):
        causal = mb.less_equal(x=key_index, y=query_positions)  # (n_rep * L, context)
        if window is not None:  # and query - key < window, i.e. key > query - window
            oldest = mb.sub(x=query_positions, y=np.array(window, np.int32))
            causal = mb.logical_and(x=causal, y=mb.greater(x=key_index, y=oldest))
        masks[window] = causal
    return Step(length, position, ropes, masks, caches)


def state_names(precision: Precision) -> tuple[str, ...]:
    return STATE_NAMES + (LOW_STATE_NAMES if precision.split_cache else ())


# bind(weights, function inputs) -> the weights to build with (see convert_decoder).
Binder = Callable[[DecoderWeights, dict[str, Var]], DecoderWeights]


def convert_decoder(
    w: DecoderWeights,
    length: int,
    extra_inputs: dict[str, mb.TensorSpec] | None = None,
    bind: Binder | None = None,
) -> Function:
    """One function: input_ids (1, length), position (1,) and the cache states -> logits.

    extra_inputs: more inputs by name (a swappable package's LoRA matrices). bind(w, inputs)
    returns the weights to build with, e.g. with LoRA branches that read those inputs; it runs
    inside the function, so the ops it adds (slicing an input per layer) belong to it.
    """
    specs = {
        "input_ids": mb.TensorSpec((1, length), dtype=types.int32),
        "position": mb.TensorSpec((1,), dtype=types.int32),
        **(extra_inputs or {}),
    }
    for name in state_names(w.precision):
        specs[name] = mb.StateTensorSpec(w.cache_shape, dtype=STATE_DTYPE)
    with Function(specs, opset_version=OPSET) as func:
        if bind is not None:
            w = bind(w, func.inputs)
        states = {name: func.inputs[name] for name in state_names(w.precision)}
        caches = {name: mb.read_state(input=state) for name, state in states.items()}
        step = _step(w, length, func.inputs["position"], caches)
        embedding = _weight(w.embedding, w.precision.np_dtype)
        h = convert_embedding(func.inputs["input_ids"], embedding, w)
        for index, layer in enumerate(w.layers):
            h = convert_layer(h, layer, index, step, w)
        # One write per state, after the last layer has threaded its update through.
        for name, state in states.items():
            mb.coreml_update_state(state=state, value=step.caches[name])
        h = convert_norm(h, w.norm, w.rms_norm_eps / w.residual_scale**2, w.precision)
        func.set_outputs([convert_lm_head(h, w, embedding)])
    return func


def build_program(
    w: DecoderWeights,
    length: int,
    extra_inputs: dict[str, mb.TensorSpec] | None = None,
    bind: Binder | None = None,
) -> Program:
    """A single-function ("main") program for calls of `length` tokens (see convert_decoder)."""
    program = Program()
    program.add_function("main", convert_decoder(w, length, extra_inputs, bind))
    return program
