"""The numpy MIL interpreter on small programs built with coremltools' MIL builder and saved.

Each program is converted and saved as a real .mlpackage, read back from disk, evaluated by
converters.coreml.mil_eval, and held to numpy math written here.
"""

from __future__ import annotations

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from converters.coreml.mil_eval import MilEvalError, load_package  # noqa: E402

IOS18 = ct.target.iOS18
rng = np.random.default_rng(0)


def save(program, path) -> str:
    """Convert with the program's own dtypes kept, and save; returns the package path."""
    model = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=IOS18,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )
    model.save(str(path))
    return str(path)


def op_types(package) -> set[str]:
    return {op.type for f in package.functions.values() for op in f.operations}


def silu(x):
    return x / (1 + np.exp(-x))


def test_elementwise_reductions_and_norms(tmp_path):
    gamma, beta = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)

    @mb.program(
        input_specs=[mb.TensorSpec((2, 3, 8)), mb.TensorSpec((2, 3, 8))], opset_version=IOS18
    )
    def prog(x, y):
        return (
            mb.add(x=x, y=y, name="add"),
            mb.sub(x=x, y=y, name="sub"),
            mb.real_div(x=x, y=mb.add(x=mb.abs(x=y), y=1.0), name="div"),
            mb.pow(x=mb.abs(x=x), y=1.5, name="pow"),
            mb.sqrt(x=mb.abs(x=x), name="sqrt"),
            mb.rsqrt(x=mb.abs(x=x), epsilon=1e-3, name="rsqrt"),
            mb.mul(x=mb.silu(x=x), y=mb.sigmoid(x=y), name="act"),
            mb.softmax(x=x, axis=-1, name="softmax"),
            mb.reduce_mean(x=x, axes=[-1], keep_dims=True, name="mean"),
            mb.reduce_sum(x=x, axes=[0, 2], keep_dims=False, name="sum"),
            mb.reduce_max(x=x, axes=[1], keep_dims=False, name="max"),
            mb.layer_norm(x=x, axes=[-1], gamma=gamma, beta=beta, epsilon=1e-5, name="ln"),
            mb.select(cond=mb.greater(x=x, y=y), a=x, b=y, name="select"),
            mb.tanh(x=mb.exp(x=mb.clip(x=x, alpha=-1.0, beta=1.0)), name="tanh_exp"),
            mb.reduce_argmax(x=x, axis=-1, name="argmax"),
        )

    pkg = load_package(save(prog, tmp_path / "ew.mlpackage"))
    x, y = (
        rng.normal(size=(2, 3, 8)).astype(np.float32),
        rng.normal(size=(2, 3, 8)).astype(np.float32),
    )
    out = pkg.predict("main", {"x": x, "y": y})
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    e = np.exp(x - x.max(-1, keepdims=True))
    expected = {
        "add": x + y,
        "sub": x - y,
        "div": x / (np.abs(y) + 1),
        "pow": np.abs(x) ** 1.5,
        "sqrt": np.sqrt(np.abs(x)),
        "rsqrt": 1 / np.sqrt(np.abs(x) + 1e-3),
        "act": silu(x) / (1 + np.exp(-y)),
        "softmax": e / e.sum(-1, keepdims=True),
        "mean": mean,
        "sum": x.sum(axis=(0, 2)),
        "max": x.max(axis=1),
        "ln": (x - mean) / np.sqrt(var + 1e-5) * gamma + beta,
        "select": np.maximum(x, y),
        "tanh_exp": np.tanh(np.exp(np.clip(x, -1, 1))),
        "argmax": x.argmax(-1),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(out[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    assert {"silu", "sigmoid", "layer_norm", "softmax", "select", "rsqrt"} <= op_types(pkg)


def test_shapes_slices_and_gathers(tmp_path):
    table = rng.normal(size=(10, 4)).astype(np.float32)

    @mb.program(
        input_specs=[
            mb.TensorSpec((2, 3, 4)),
            mb.TensorSpec((1, 5), dtype=types.int32),
            mb.TensorSpec((1,), dtype=types.int32),
        ],
        opset_version=IOS18,
    )
    def prog(x, ids, n):
        r = mb.reshape(x=x, shape=[0, -1], name="reshape")  # (3, 8)
        t = mb.transpose(x=x, perm=[2, 0, 1], name="transpose")
        e = mb.squeeze(x=mb.expand_dims(x=x, axes=[1, -1]), axes=[-1], name="expand")
        c = mb.concat(values=[x, mb.mul(x=x, y=2.0)], axis=-1, name="concat")
        s0, s1 = mb.split(x=c, split_sizes=[3, 5], axis=-1, name="split")
        sl = mb.slice_by_index(
            x=x,
            begin=[0, 1, 0],
            end=[2, 3, 4],
            stride=[1, 1, 2],
            squeeze_mask=[True, False, False],
            name="slice",
        )
        sz = mb.slice_by_size(x=x, begin=[1, 0, 1], size=[1, -1, 2], name="slice_size")
        g = mb.gather(x=table, indices=ids, axis=0, name="gather")  # (1, 5, 4)
        ga = mb.gather_along_axis(
            x=x, indices=mb.fill(shape=[2, 3, 1], value=2), axis=2, name="gaa"
        )
        ti = mb.tile(x=x, reps=[1, 2, 1], name="tile")
        rg = mb.range_1d(start=0, end=mb.squeeze(x=n), step=1, name="range")
        pos = mb.cast(x=mb.squeeze(x=n), dtype="fp32")
        mask = mb.band_part(x=mb.add(x=mb.mul(x=x, y=0.0), y=1.0), lower=0, upper=-1, name="band")
        st = mb.stack(values=[x, x], axis=0, name="stack")
        return r, t, e, s0, s1, sl, sz, g, ga, ti, rg, mb.add(x=x, y=pos, name="cast"), mask, st

    pkg = load_package(save(prog, tmp_path / "shapes.mlpackage"))
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    ids = np.array([[1, 9, 0, 3, 3]], np.int32)
    out = pkg.predict("main", {"x": x, "ids": ids, "n": np.array([6], np.int32)})
    c = np.concatenate([x, 2 * x], -1)
    expected = {
        "reshape": x.reshape(3, 8),  # iOS17: a 0 copies the dim at the same place from the right
        "transpose": x.transpose(2, 0, 1),
        "expand": x[:, None],
        "split": c[..., :3],
        "split_1": c[..., 3:],
        "slice": x[0, 1:3, 0:4:2],
        "slice_size": x[1:2, :, 1:3],
        "gather": table[ids],
        "gaa": x[..., 2:3],
        "tile": np.tile(x, (1, 2, 1)),
        "range": np.arange(6),
        "cast": x + 6,
        "band": np.broadcast_to(np.triu(np.ones((3, 4))), (2, 3, 4)),  # no sub-diagonals kept
        "stack": np.stack([x, x]),
    }
    outputs = dict(zip(pkg.functions["main"].outputs, out.values()))
    for (name, value), got in zip(expected.items(), outputs.values()):
        np.testing.assert_allclose(got, value, rtol=1e-6, err_msg=name)


def test_linear_matmul_attention_and_uint4_weights_in_fp16(tmp_path):
    # 4-bit codes with one scale and offset per block of 8 inputs, as an int4 export stores them.
    codes = rng.integers(0, 16, size=(6, 16)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, size=(6, 2)).astype(np.float16)
    offset = rng.uniform(0, 15, size=(6, 2)).astype(np.float16)
    bias = rng.normal(size=6).astype(np.float16)
    weight = (scale.astype(np.float32).repeat(8, 1)) * (
        codes - offset.astype(np.float32).repeat(8, 1)
    )

    @mb.program(
        input_specs=[
            mb.TensorSpec((1, 4, 16), dtype=types.fp16),
            mb.TensorSpec((1, 2, 5, 8), dtype=types.fp16),
        ],
        opset_version=IOS18,
    )
    def prog(x, q):
        w = mb.constexpr_blockwise_shift_scale(
            data=codes.astype(types.np_uint4_dtype), scale=scale, offset=offset
        )
        lin = mb.linear(x=x, weight=w, bias=bias, name="linear")
        mm = mb.matmul(x=x, y=w, transpose_y=True, name="matmul")
        causal = np.tril(np.ones((5, 5), bool))
        att = mb.scaled_dot_product_attention(
            query=q, key=q, value=q, attn_mask=causal, name="sdpa"
        )
        return lin, mm, att

    pkg = load_package(save(prog, tmp_path / "lin.mlpackage"))
    assert "constexpr_blockwise_shift_scale" in op_types(pkg)
    x = rng.normal(size=(1, 4, 16)).astype(np.float16)
    q = rng.normal(size=(1, 2, 5, 8)).astype(np.float16)
    out = pkg.predict("main", {"x": x, "q": q})
    # Declared fp16: the dequantised weight itself is rounded to fp16, then each op's result.
    w16 = weight.astype(np.float16).astype(np.float32)
    lin = x.astype(np.float32) @ w16.T
    assert out["linear"].dtype == np.float16
    np.testing.assert_allclose(out["linear"], (lin + bias).astype(np.float16), atol=2e-3)
    np.testing.assert_allclose(out["matmul"], lin.astype(np.float16), atol=2e-3)
    qf = q.astype(np.float32)
    scores = qf @ qf.swapaxes(-1, -2) / np.sqrt(8) + np.where(np.tril(np.ones((5, 5))), 0, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(out["sdpa"], (p / p.sum(-1, keepdims=True)) @ qf, atol=2e-3)
    # fp32 mode skips the rounding: exact to fp32 against the unrounded weight.
    out32 = pkg.predict("main", {"x": x, "q": q}, mode="fp32")
    assert out32["linear"].dtype == np.float32
    np.testing.assert_allclose(
        out32["matmul"], x.astype(np.float32) @ weight.T, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "dtype, low, high", [("uint4", 0, 16), ("int4", -8, 8), ("int8", -128, 128)]
)
def test_blob_constants_read_back(tmp_path, dtype, low, high):
    # 3 x 5 = 15 four-bit values: the blob ends in a half-used byte.
    data = rng.integers(low, high, size=(3, 5))
    np_dtype = {"uint4": types.np_uint4_dtype, "int4": types.np_int4_dtype, "int8": np.int8}[dtype]
    scale = np.full((3, 1), 0.5, np.float32)

    @mb.program(input_specs=[mb.TensorSpec((3, 5))], opset_version=IOS18)
    def prog(x):
        w = mb.constexpr_blockwise_shift_scale(data=data.astype(np_dtype), scale=scale)
        return mb.add(x=x, y=w)

    pkg = load_package(save(prog, tmp_path / f"{dtype}.mlpackage"))
    (out,) = pkg.predict("main", {"x": np.zeros((3, 5), np.float32)}).values()
    np.testing.assert_array_equal(out, 0.5 * data)


def _cache_program(read_twice: bool):
    """Two 'layers' each append a row at `pos` to their slice of one state and sum it."""

    @mb.program(
        input_specs=[
            mb.TensorSpec((1, 4), dtype=types.fp16),
            mb.TensorSpec((1,), dtype=types.int32),
            mb.StateTensorSpec((2, 6, 4), dtype=types.fp16),
        ],
        opset_version=IOS18,
    )
    def prog(x, pos, cache):
        begin = mb.concat(values=[np.array([0], np.int32), pos, np.array([0], np.int32)], axis=0)
        end = mb.add(x=begin, y=np.array([1, 1, 4], np.int32))
        value = mb.read_state(input=cache)
        outs = []
        for layer in range(2):
            if read_twice and layer:
                # The pattern remove_redundant_ops merges with the first read (coremltools #2786).
                value = mb.read_state(input=cache)
            layer_begin = mb.add(x=begin, y=np.array([layer, 0, 0], np.int32))
            layer_end = mb.add(x=end, y=np.array([layer, 0, 0], np.int32))
            update = mb.expand_dims(x=mb.mul(x=x, y=np.float16(layer + 1)), axes=[0])
            value = mb.slice_update(x=value, update=update, begin=layer_begin, end=layer_end)
            if read_twice:
                mb.coreml_update_state(state=cache, value=value)
            outs.append(mb.reduce_sum(x=value, axes=[1, 2]))
        if not read_twice:
            mb.coreml_update_state(state=cache, value=value)
        return mb.concat(values=outs, axis=0, name="sums")

    return prog


def _cache_reference(xs):
    cache = np.zeros((2, 6, 4), np.float32)
    for pos, x in enumerate(xs):
        cache[0, pos], cache[1, pos] = x, 2 * x
    return cache


def test_state_is_kept_between_calls(tmp_path):
    pkg = load_package(save(_cache_program(read_twice=False), tmp_path / "state.mlpackage"))
    assert {"read_state", "slice_update"} <= op_types(pkg)
    assert op_types(pkg) & {"write_state", "coreml_update_state"}
    state = pkg.make_state()
    xs = rng.normal(size=(3, 4)).astype(np.float16)
    for pos, x in enumerate(xs):
        out = pkg.predict("main", {"x": x[None], "pos": np.array([pos], np.int32)}, state)
    expected = _cache_reference(xs)
    np.testing.assert_allclose(state["cache"], expected, atol=1e-3)
    # The second layer's sums see both layers' rows of the last call.
    np.testing.assert_allclose(out["sums"][2:], expected.sum(axis=(1, 2)), rtol=2e-3)
    # A fresh state starts at zero again.
    assert not pkg.make_state()["cache"].any()


def test_reread_state_miscompilation_is_exposed(tmp_path):
    """A program that reads the state again in each layer: coremltools' remove_redundant_ops
    merges the second read into the first, so layer 1 overwrites layer 0's update. Evaluating
    the saved program faithfully shows the lost update against the intended result."""
    pkg = load_package(save(_cache_program(read_twice=True), tmp_path / "reread.mlpackage"))
    state = pkg.make_state()
    xs = rng.normal(size=(3, 4)).astype(np.float16)
    for pos, x in enumerate(xs):
        pkg.predict("main", {"x": x[None], "pos": np.array([pos], np.int32)}, state)
    expected = _cache_reference(xs)
    reads = sum(op.type == "read_state" for op in pkg.functions["main"].operations)
    if reads == 2:
        pytest.skip("this coremltools keeps both read_state ops; nothing is miscompiled")
    # Layer 1's slice was written, layer 0's was lost.
    np.testing.assert_allclose(state["cache"][1], expected[1], atol=1e-3)
    assert np.abs(state["cache"][0] - expected[0]).max() > 0.1


def test_multifunction_package_shares_state(tmp_path):
    a = save(_cache_program(read_twice=False), tmp_path / "a.mlpackage")
    desc = ct.utils.MultiFunctionDescriptor(a)
    desc.add_function(a, "main", "second")
    desc.default_function_name = "main"
    path = tmp_path / "multi.mlpackage"
    ct.utils.save_multifunction(desc, str(path))
    pkg = load_package(path)
    assert set(pkg.functions) == {"main", "second"}
    state = pkg.make_state()
    xs = rng.normal(size=(2, 4)).astype(np.float16)
    pkg.predict("main", {"x": xs[0][None], "pos": np.array([0], np.int32)}, state)
    pkg.predict("second", {"x": xs[1][None], "pos": np.array([1], np.int32)}, state)
    np.testing.assert_allclose(state["cache"], _cache_reference(xs), atol=1e-3)


def test_unknown_op_and_bad_inputs_are_clear_errors(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((2, 3))], opset_version=IOS18)
    def prog(x):
        return mb.erf(x=mb.add(x=x, y=1.0), name="out")

    pkg = load_package(save(prog, tmp_path / "unknown.mlpackage"))
    erf = next(op for op in pkg.functions["main"].operations if op.type == "erf")
    erf.type = "made_up_op"
    with pytest.raises(MilEvalError, match="does not know MIL op 'made_up_op'"):
        pkg.predict("main", {"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(MilEvalError, match="has shape"):
        pkg.predict("main", {"x": np.zeros((3, 3), np.float32)})
    with pytest.raises(MilEvalError, match="missing input"):
        pkg.predict("main", {})
    with pytest.raises(MilEvalError, match="no function 'decode'"):
        pkg.predict("decode", {})
