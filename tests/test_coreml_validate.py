"""Exported Core ML packages, read back from disk and computed in numpy, against MLX.

The packages come from converters.coreml.export; the validator (converters.coreml.validate)
evaluates them with its own interpreter, never the builder's code. Linux cannot run Core ML, so
the runtime comparison is skipped here and checked on macOS only.
"""

from __future__ import annotations

import platform
import shutil
import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

from converters.coreml.export import export_coreml  # noqa: E402
from converters.coreml.mil_eval import load_package  # noqa: E402
from converters.coreml.validate import (  # noqa: E402
    FP32_MAX_ABS,
    TOLERANCES,
    CoreMLValidationError,
    PackageRunner,
    compare_logits,
    validate_package,
)
from ondevice_lora.adapters.files import LoraConfig, adapter_modules, apply_adapters  # noqa: E402
from ondevice_lora.loading import load  # noqa: E402
from tests.hf_fixtures import VOCAB_SIZE, write_hf_model  # noqa: E402

ARCHITECTURES = ["llama", "llama3_rope_scaling", "qwen2", "qwen3"]
PRECISIONS = ["fp32", "fp16", "int4"]
CONTEXT, PREFILL = 64, 16
PROMPT = [int(t) for t in np.random.default_rng(7).integers(1, VOCAB_SIZE, size=32)]
EXPORTS = {}  # (variant, precision, adapter) -> (package path, MLX reference model)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export a fixture model once per (variant, precision, adapter) and keep its reference.

    The int4 reference is the MLX model quantised by MLX itself (4-bit, groups of 32): an int4
    export must carry exactly those codes, so it is held to that model, not the fp32 one.
    """

    def make(variant: str, precision: str, adapter: str | None = None):
        key = (variant, precision, adapter)
        if key not in EXPORTS:
            folder = tmp_path_factory.mktemp(f"{variant}-hf")
            write_hf_model(folder, variant)
            model, tokenizer = load(str(folder))
            if precision == "int4":
                nn.quantize(model, group_size=32, bits=4)
            if adapter is not None:
                add_trained_adapter(model, adapter)
            out = tmp_path_factory.mktemp(f"{variant}-{precision}") / "model.mlpackage"
            export_coreml(
                model, tokenizer, out, precision, context_length=CONTEXT, prefill_length=PREFILL
            )
            EXPORTS[key] = (out, model)
        return EXPORTS[key]

    return make


def add_trained_adapter(model, kind: str) -> None:
    # Seeded before A's initialisation too, so the case does not depend on which tests ran
    # before it in the same process.
    mx.random.seed(3)
    apply_adapters(
        model, LoraConfig(rank=4, alpha=8, target_modules="all-linear", fine_tune_type=kind)
    )
    for module in adapter_modules(model).values():
        # B starts at zero; give it values so the adapter changes every output.
        module.lora_b = mx.random.normal(module.lora_b.shape) * 0.05
    model.eval()


def test_compare_logits_forgives_only_near_ties():
    reference = np.array([[1.0, 1.0005, 0.0], [2.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    candidate = np.array([[1.0008, 1.0, 0.0], [0.0, 2.0, 1.0], [np.nan, 0.0, 0.0]])
    comparison = compare_logits(reference, candidate, tie_margin=1e-3)
    # Position 0 flips within the margin (a near-tie); position 1 flips by 2.0 (an error).
    assert comparison.mismatched_positions == [0, 1]
    assert comparison.near_ties == [0]
    assert comparison.decisive_agreement == pytest.approx(2 / 3)
    assert comparison.max_abs_diff == np.inf  # NaN never passes
    tolerance = TOLERANCES["fp16"]
    assert tolerance.bound(30.0) == pytest.approx(0.3) and tolerance.bound(0.5) == 0.01


class PrefixSumModel:
    """A stand-in 'MLX model': logits at position t = scale * sum of table rows of tokens <= t,
    the past kept in its KV cache as a decoder keeps keys."""

    def __init__(self, table: np.ndarray, scale: float):
        self.layers = [None]  # one cache
        self.table, self.scale = mx.array(table), scale

    def __call__(self, inputs, cache):
        rows = self.table[inputs][:, None]  # (1, 1, L, V)
        offset = cache[0].offset
        seen, _ = cache[0].update_and_fetch(rows, rows)
        totals = mx.cumsum(seen[0, 0], axis=0)[offset:]  # (L, V)
        return (self.scale * totals)[None]


def toy_function(table: np.ndarray, context: int, length: int):
    """PrefixSumModel as a stateful MIL function over `length` tokens, with an extra input
    `scale`, the way a swappable package takes its adapter."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    vocab = table.shape[1]

    @mb.program(
        input_specs=[
            mb.TensorSpec((1, length), dtype=types.int32),
            mb.TensorSpec((1,), dtype=types.int32),
            mb.TensorSpec((1,)),
            mb.StateTensorSpec((1, 1, context, vocab), dtype=types.fp16),
        ],
        opset_version=ct.target.iOS18,
    )
    def prog(input_ids, position, scale, key_cache):
        rows = mb.gather(x=table, indices=input_ids, axis=0)  # (1, L, V)
        zero = np.zeros(1, np.int32)
        begin = mb.concat(values=[zero, zero, position, zero], axis=0)
        end = mb.add(x=begin, y=np.array([1, 1, length, vocab], np.int32))
        cache = mb.slice_update(
            x=mb.read_state(input=key_cache),
            update=mb.cast(x=mb.expand_dims(x=rows, axes=[0]), dtype="fp16"),
            begin=begin,
            end=end,
        )
        mb.coreml_update_state(state=key_cache, value=cache)
        # Query i sees the cache up to position + i.
        query = mb.add(x=np.arange(length, dtype=np.int32)[:, None], y=position)
        visible = mb.less_equal(x=np.arange(context, dtype=np.int32)[None], y=query)
        seen = mb.reshape(x=mb.cast(x=cache, dtype="fp32"), shape=[context, vocab])
        totals = mb.matmul(x=mb.cast(x=visible, dtype="fp32"), y=seen)  # (L, V)
        return mb.expand_dims(x=mb.mul(x=totals, y=scale), axes=[0], name="logits")

    return prog


def toy_package(path, table: np.ndarray, context: int, prefill: int):
    """prefill and decode functions of toy_function in one package sharing their state."""
    desc = ct.utils.MultiFunctionDescriptor()
    for name, length in (("prefill", prefill), ("decode", 1)):
        part = path.parent / f"{name}.mlpackage"
        program = toy_function(table, context, length)
        model = ct.convert(program, minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
        model.save(str(part))
        desc.add_function(str(part), src_function_name="main", target_function_name=name)
    desc.default_function_name = "decode"
    ct.utils.save_multifunction(desc, str(path))
    return path


def test_validator_on_a_hand_built_package_with_an_extra_input(tmp_path):
    """Chunked prefill with a padded last chunk, decode steps, one shared state and an input
    fed to every call, on a package built here rather than by the exporter."""
    table = np.random.default_rng(1).normal(size=(12, 6)).astype(np.float32)
    path = toy_package(tmp_path / "toy.mlpackage", table, context=24, prefill=4)
    prompt = [3, 1, 4, 1, 5, 9, 2]  # 4 + 3 tokens: the second chunk is padded
    scale = {"scale": np.array([0.5], np.float32)}
    report = validate_package(
        path,
        PrefixSumModel(table, 0.5),
        prompt,
        4,
        extra_inputs=scale,
        tolerances=TOLERANCES["fp16"],
    )
    assert report.positions == 11 and report.precision == "fp32"
    assert report.max_abs_diff < 0.01, report.summary()
    # The same package fed a different scale no longer computes what the model does.
    with pytest.raises(CoreMLValidationError, match="FAILED"):
        validate_package(
            path,
            PrefixSumModel(table, 0.5),
            prompt,
            4,
            extra_inputs={"scale": np.array([0.6], np.float32)},
        )


@pytest.mark.slow
@pytest.mark.parametrize("variant", ARCHITECTURES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_export_matches_mlx(exported, variant, precision):
    path, model = exported(variant, precision)
    report = validate_package(path, model, PROMPT, decode_steps=8)
    assert report.positions == len(PROMPT) + 8
    # Every argmax agrees, except where MLX's top two are closer than fp16 can tell apart.
    assert report.interpreter.decisive_agreement == 1.0, report.summary()
    if precision == "fp32":
        assert report.max_abs_diff <= FP32_MAX_ABS, report.summary()
    else:
        # The stated bound: 1% of the largest |logit| (FP16_MAX_ABS_RELATIVE).
        assert report.max_abs_diff <= 0.01 * report.logit_scale, report.summary()
    assert report.passed


@pytest.mark.slow
@pytest.mark.parametrize("precision, kind", [("fp32", "lora"), ("int4", "lora"), ("int4", "dora")])
def test_export_with_adapter_matches_mlx(exported, precision, kind):
    # fp32 merges the adapter into the weights; int4 keeps it as a branch over the base codes.
    path, model = exported("llama", precision, kind)
    report = validate_package(path, model, PROMPT, decode_steps=8)
    assert report.interpreter.decisive_agreement == 1.0, report.summary()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_stateful_decode_equals_full_sequence(exported, precision):
    """Prefill of k tokens then single-token decode calls == one full-sequence evaluation."""
    path, model = exported("llama", precision)
    package = load_package(path)
    tokens = PROMPT[:24]
    k = 5  # not a multiple of the prefill length: the padded-chunk path is exercised too
    stepwise = PackageRunner(package)
    rows = [stepwise.prefill(tokens[:k])] + [stepwise.decode(t)[None] for t in tokens[k:]]
    stepwise_logits = np.concatenate(rows)
    full_logits = PackageRunner(package).prefill(tokens)
    mlx_logits = np.array(model(mx.array([tokens])).astype(mx.float32))[0]  # no cache at all
    if precision == "fp32":
        np.testing.assert_allclose(stepwise_logits, full_logits, atol=1e-5)
        np.testing.assert_allclose(stepwise_logits, mlx_logits, atol=FP32_MAX_ABS)
    else:
        # Different call shapes round differently in fp16; the choice of token must not change.
        np.testing.assert_allclose(
            stepwise_logits, full_logits, atol=0.01 * np.abs(mlx_logits).max()
        )
        scale = np.abs(mlx_logits).max()
        comparison = compare_logits(mlx_logits, stepwise_logits, TOLERANCES["fp16"].tie(scale))
        assert comparison.decisive_agreement == 1.0, comparison.describe()


def _first_weight_blob(package_path):
    """(offset of the data, byte count) of the first linear weight stored in weight.bin."""
    package = load_package(package_path)
    ops = package.functions["decode"].operations
    names = {out.name: op for op in ops for out in op.outputs}
    linear = next(op for op in ops if op.type == "linear")
    source = names[linear.inputs["weight"].arguments[0].name]
    value = (
        source.attributes["val"]
        if source.type == "const"
        else source.inputs["data"].arguments[0].value
    )
    offset = value.blobFileValue.offset
    weights = package_path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    with open(weights, "rb") as f:
        f.seek(offset)
        _, _, size, data_offset = struct.unpack("<IIQQ", f.read(24))
    return weights, data_offset, size


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_validator_catches_a_broken_weight(exported, tmp_path, precision):
    path, model = exported("llama", precision)
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(path, broken)
    weights, offset, size = _first_weight_blob(broken)
    data = np.frombuffer(weights.read_bytes(), np.uint8).copy()
    region = data[offset : offset + size]
    if precision == "fp16":
        region.view(np.float16)[:] *= -1  # layer 0's first projection, negated
    else:
        region ^= 0xFF  # every 4-bit code c becomes 15 - c
    weights.write_bytes(data.tobytes())
    with pytest.raises(CoreMLValidationError, match="FAILED") as failure:
        validate_package(broken, model, PROMPT, decode_steps=2)
    assert failure.value.report.max_abs_diff > failure.value.report.max_abs_bound
    # The untouched package still passes: the difference is the broken weight.
    validate_package(path, model, PROMPT, decode_steps=2)


@pytest.mark.slow
def test_functions_of_a_multifunction_package_validate_on_their_own(exported, tmp_path):
    """Two exports merged into one package (as for several adapters): each function pair is
    held to its own model, and the other model's pair fails."""
    base_path, base_model = exported("llama", "fp32")
    tuned_path, tuned_model = exported("llama", "fp32", "lora")
    desc = ct.utils.MultiFunctionDescriptor()
    for tag, source in (("base", base_path), ("tuned", tuned_path)):
        for fn in ("prefill", "decode"):
            desc.add_function(str(source), src_function_name=fn, target_function_name=f"{fn}_{tag}")
    desc.default_function_name = "decode_base"
    merged = tmp_path / "multi.mlpackage"
    ct.utils.save_multifunction(desc, str(merged))
    for tag, model in (("base", base_model), ("tuned", tuned_model)):
        functions = (f"prefill_{tag}", f"decode_{tag}")
        report = validate_package(merged, model, PROMPT[:20], decode_steps=2, functions=functions)
        assert report.max_abs_diff <= FP32_MAX_ABS
    with pytest.raises(CoreMLValidationError):
        validate_package(
            merged, tuned_model, PROMPT[:20], 2, functions=("prefill_base", "decode_base")
        )


@pytest.mark.slow
def test_runtime_check_is_skipped_off_macos_with_a_reason(exported):
    path, model = exported("llama", "fp16")
    report = validate_package(path, model, PROMPT[:8], decode_steps=1)
    if platform.system() == "Darwin":
        pytest.skip("on macOS the runtime is checked (test_core_ml_runtime_matches_mlx)")
    assert not report.runtime_checked
    assert "macOS" in report.runtime_skip_reason and "not run" in report.summary()


@pytest.mark.slow
@pytest.mark.skipif(
    platform.system() != "Darwin", reason="the Core ML runtime exists only on macOS"
)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_core_ml_runtime_matches_mlx(exported, precision):
    path, model = exported("llama", precision)
    report = validate_package(path, model, PROMPT, decode_steps=8)
    assert report.runtime_checked, report.runtime_skip_reason
    assert report.runtime.decisive_agreement == 1.0, report.summary()
