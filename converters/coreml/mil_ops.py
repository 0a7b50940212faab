"""numpy implementations of the MIL operations a decoder package uses, one function per op.

Each takes an OpArgs (the op's inputs by parameter name) and returns its result, or a tuple for
ops with several outputs. Floating-point inputs are widened to fp32 before computing; the
evaluator then rounds every result to the dtype the program declares (mil_eval.py), which is
what the device does: compute each op, store its result in the declared type.

Semantics follow the MIL op reference (coremltools.converters.mil.mil.ops.defs), default
values included; an op missing here is reported by name rather than guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_MISSING = object()


@dataclass
class StateRef:
    """A function input of state type: the name of one entry of the caller's state dict."""

    name: str
    states: dict

    def read(self) -> np.ndarray:
        return self.states[self.name].copy()

    def write(self, value: np.ndarray) -> None:
        target = self.states[self.name]
        if value.shape != target.shape:
            raise ValueError(f"writes shape {value.shape} into state {self.name} of {target.shape}")
        self.states[self.name] = value.astype(target.dtype)


class OpArgs:
    """An op's resolved inputs: args["x"] for one value, args.many("values") for a list."""

    def __init__(self, inputs: dict[str, list], where: str):
        self._inputs = inputs
        self.where = where

    def __getitem__(self, name: str):
        value = self.get(name, _MISSING)
        if value is _MISSING:
            raise ValueError(f"required input {name!r} is missing")
        return value

    def get(self, name: str, default=None):
        values = self._inputs.get(name)
        if not values:
            return default
        return _widen(values[0])

    def many(self, name: str) -> list:
        return [_widen(v) for v in self._inputs.get(name, [])]

    def raw(self, name: str):
        """The input as stored, not widened (state references, sub-byte codes)."""
        return self._inputs[name][0]

    def ints(self, name: str, default=None) -> list[int] | None:
        value = self.get(name)
        return default if value is None else [int(v) for v in np.ravel(value)]

    def scalar(self, name: str, default=None):
        value = self.get(name)
        return default if value is None else np.asarray(value).item()


def _widen(value):
    # fp16 values are computed in fp32; the evaluator rounds the result back.
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    return value


def registry(table: dict):
    """A decorator registering a function in `table` under its own name or the given ones."""

    def op(*names):
        def register(fn):
            for name in names or (fn.__name__,):
                table[name] = fn
            return fn

        return register

    return op


OPS = {}  # op type -> implementation; mil_eval adds the tensor ops of mil_tensor_ops
op = registry(OPS)


# -- elementwise ---------------------------------------------------------------------------

_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.divide,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "floor_div": np.floor_divide,
    "mod": np.mod,
    "equal": np.equal,
    "not_equal": np.not_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}
for _name, _fn in _BINARY.items():
    OPS[_name] = lambda a, fn=_fn: fn(a["x"], a["y"])

_UNARY = {
    "abs": np.abs,
    "ceil": np.ceil,
    "floor": np.floor,
    "round": np.round,
    "sign": np.sign,
    "sqrt": np.sqrt,
    "square": np.square,
    "exp": np.exp,
    "exp2": np.exp2,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "tanh": np.tanh,
    "logical_not": np.logical_not,
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "sigmoid": lambda x: _sigmoid(x),
    "silu": lambda x: x * _sigmoid(x),
    "softplus": lambda x: np.logaddexp(0, x),
    "erf": lambda x: np.vectorize(math.erf, otypes=[np.float64])(x),
}
for _name, _fn in _UNARY.items():
    OPS[_name] = lambda a, fn=_fn: fn(a["x"])


def _sigmoid(x):
    # Written so neither branch overflows in exp.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


@op()
def rsqrt(a):
    return 1 / np.sqrt(a["x"] + a.scalar("epsilon", 1e-12))


@op()
def inverse(a):
    return 1 / (a["x"] + a.scalar("epsilon", 1e-4))


@op()
def log(a):
    return np.log(a["x"] + a.scalar("epsilon", 1e-45))


@op()
def clip(a):
    return np.clip(a["x"], a.scalar("alpha"), a.scalar("beta"))


@op()
def threshold(a):
    return np.maximum(a["x"], a.scalar("alpha"))


@op()
def gelu(a):
    x, mode = a["x"], a.get("mode", "EXACT")
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    return 0.5 * x * (1 + np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2)))


@op()
def softmax(a):
    x = a["x"]
    axis = a.scalar("axis", -1)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


@op()
def select(a):
    return np.where(a["cond"], a["a"], a["b"])


@op()
def cast(a):
    # The target dtype is the declared output type, which the evaluator applies.
    return a["x"]


# -- reductions ----------------------------------------------------------------------------

_REDUCE = {
    "reduce_mean": np.mean,
    "reduce_sum": np.sum,
    "reduce_max": np.max,
    "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_sum_square": lambda x, **k: np.sum(x * x, **k),
    "reduce_l2_norm": lambda x, **k: np.sqrt(np.sum(x * x, **k)),
    "reduce_log_sum_exp": lambda x, **k: np.log(np.sum(np.exp(x), **k)),
}
for _name, _fn in _REDUCE.items():

    def _reduce(a, fn=_fn):
        axes = a.ints("axes")
        return fn(
            a["x"],
            axis=None if axes is None else tuple(axes),
            keepdims=bool(a.get("keep_dims", False)),
        )

    OPS[_name] = _reduce


def _arg_reduce(fn):
    def run(a):
        axis = a.scalar("axis", -1)
        result = fn(a["x"], axis=axis)
        return np.expand_dims(result, axis) if a.get("keep_dims", False) else result

    return run


OPS["reduce_argmax"] = _arg_reduce(np.argmax)
OPS["reduce_argmin"] = _arg_reduce(np.argmin)


@op()
def cumsum(a):
    x, axis = a["x"], a.scalar("axis", 0)
    if a.get("reverse", False):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if a.get("exclusive", False):
        out = out - x
    return np.flip(out, axis) if a.get("reverse", False) else out


# -- linear algebra and normalisation ------------------------------------------------------


@op()
def linear(a):
    out = np.matmul(a["x"], a["weight"].T)
    bias = a.get("bias")
    return out if bias is None else out + bias


@op()
def matmul(a):
    x, y = a["x"], a["y"]
    if a.get("transpose_x", False) and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y", False) and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op()
def einsum(a):
    return np.einsum(a["equation"], *a.many("values"))


@op()
def layer_norm(a):
    x = a["x"]
    axes = tuple(a.ints("axes", list(range(x.ndim))))
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + a.scalar("epsilon", 1e-5))
    gamma, beta = a.get("gamma"), a.get("beta")
    out = out if gamma is None else out * gamma
    return out if beta is None else out + beta


@op()
def l2_norm(a):
    x = a["x"]
    axes = tuple(a.ints("axes", [-1]))
    norm = np.sqrt(np.sum(x * x, axis=axes, keepdims=True))
    return x / np.maximum(norm, a.scalar("epsilon", 1e-6))


@op()
def scaled_dot_product_attention(a):
    # query (..., L, E), key (..., S, E), value (..., S, EV); scale is fixed at 1/sqrt(E).
    q, k, v = a["query"], a["key"], a["value"]
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
    mask = a.get("attn_mask")
    if mask is not None:
        # A bool mask says which keys take part; a float mask is added to the scores.
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    e = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    return np.matmul(e / np.sum(e, axis=-1, keepdims=True), v)


# -- compressed constants ------------------------------------------------------------------


def _blocks(data: np.ndarray, small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views of data (n0, n1, ...) as (m0, b0, m1, b1, ...) and of small (m0, m1, ...) as
    (m0, 1, m1, 1, ...): one value of `small` per block of b_i = n_i / m_i elements."""
    data_shape, small_shape = [], []
    for axis, (n, m) in enumerate(zip(data.shape, small.shape)):
        if n % m:
            raise ValueError(f"axis {axis}: {m} blocks do not divide {n} elements")
        data_shape += [m, n // m]
        small_shape += [m, 1]
    return data.reshape(data_shape), small.reshape(small_shape)


@op()
def constexpr_blockwise_shift_scale(a):
    # output = scale * (data - offset), with scale and offset constant over blocks.
    data = a["data"]
    blocks, scale = _blocks(data, a["scale"].astype(np.float32))
    out = blocks.astype(np.float32)
    offset = a.get("offset")
    if offset is not None:
        out = out - _blocks(data, offset.astype(np.float32))[1]
    return (out * scale).reshape(data.shape)


@op()
def constexpr_affine_dequantize(a):
    data = a["quantized_data"].astype(np.float32)
    axis = a.scalar("axis") % data.ndim
    shape = [1] * data.ndim
    shape[axis] = -1
    zero_point = np.reshape(
        a["zero_point"].astype(np.float32), shape if a["zero_point"].size > 1 else ()
    )
    scale = np.reshape(a["scale"].astype(np.float32), shape if a["scale"].size > 1 else ())
    return scale * (data - zero_point)


@op()
def constexpr_lut_to_dense(a):
    # iOS18: indices (..., ) pick entries of a per-block lookup table lut (blocks..., 2^n, vec).
    indices, lut = a["indices"].astype(np.int64), a["lut"]
    if a.get("vector_axis") is not None or lut.shape[-1] != 1:
        raise ValueError("vector-valued lookup tables are not supported")
    table = lut[..., 0]  # (blocks per axis..., palette)
    per_element = table
    for axis, n in enumerate(indices.shape):
        per_element = np.repeat(per_element, n // table.shape[axis], axis=axis)
    return np.take_along_axis(per_element, indices[..., None], axis=-1)[..., 0]


@op()
def constexpr_cast(a):
    return a["source_val"]
