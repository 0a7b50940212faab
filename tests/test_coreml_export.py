"""The Core ML package as built: read back from disk and held to the contract in export.py.

Numeric parity with MLX is tested with the validator (tests of converters/coreml/validate.py);
here the package's structure, metadata, storage width and side files are checked, and the
pieces of the weight conversion are compared with MLX directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

pytest.importorskip("coremltools")
import coremltools as ct  # noqa: E402
from coremltools.proto import MIL_pb2  # noqa: E402

from converters.coreml.export import CoreMLExportError, export_coreml  # noqa: E402
from converters.coreml.placement import tokenizer_folder  # noqa: E402
from converters.coreml.settings import get_precision  # noqa: E402
from converters.coreml.weights import (  # noqa: E402
    decoder_weights,
    from_affine,
    quantize_for_int4,
    rope_tables,
    unpack_codes,
)
from ondevice_lora.adapters.files import LoraConfig, adapter_modules, apply_adapters  # noqa: E402
from ondevice_lora.adapters.fingerprint import base_fingerprint  # noqa: E402
from ondevice_lora.loading.tokenizer import Tokenizer  # noqa: E402
from ondevice_lora.models import build_model  # noqa: E402
from ondevice_lora.models.base import RoPE  # noqa: E402
from tests.tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

PREFILL, CONTEXT = 16, 128


def make_model(seed=0, **overrides):
    config = dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        tie_word_embeddings=True,
    )
    config.update(overrides)
    mx.random.seed(seed)
    model = build_model(config)
    mx.eval(model.parameters())
    return model.eval()


def with_adapter(model, kind="lora"):
    apply_adapters(model, LoraConfig(rank=4, target_modules="all-linear", fine_tune_type=kind))
    for module in adapter_modules(model).values():
        module.lora_b = mx.random.normal(module.lora_b.shape) * 0.1  # a trained-looking B
    return model.eval()


def operations(spec, function):
    block = spec.mlProgram.functions[function].block_specializations
    return list(next(iter(block.values())).operations)


def op_count(spec, function, op_type):
    return sum(op.type == op_type for op in operations(spec, function))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder)
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory, tokenizer):
    """A model of a few MB, so weights dominate the package: hidden 256, 4 layers, vocab 4096."""
    model = make_model(
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=1024,
        vocab_size=4096,
        tie_word_embeddings=False,
    )
    nn.quantize(model, group_size=32, bits=4)
    out = tmp_path_factory.mktemp("int4") / "model.mlpackage"
    result = export_coreml(
        model, tokenizer, out, "int4", context_length=CONTEXT, prefill_length=PREFILL
    )
    spec = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    return model, result, spec


def test_package_has_both_functions_inputs_states_and_outputs(int4_export):
    model, result, spec = int4_export
    desc = spec.description
    assert [f.name for f in desc.functions] == ["prefill", "decode"]
    assert desc.defaultFunctionName == "decode"
    cache_shape = [4, 2, CONTEXT, 64]  # layers, kv heads, context, head_dim
    for function, length in zip(desc.functions, (PREFILL, 1)):
        inputs = {i.name: i.type.multiArrayType for i in function.input}
        assert list(inputs["input_ids"].shape) == [1, length]
        assert list(inputs["position"].shape) == [1]
        assert {t.dataType for t in inputs.values()} == {
            ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
        }
        states = {s.name: s.type.stateType.arrayType for s in function.state}
        assert sorted(states) == ["key_cache", "value_cache"]
        for state in states.values():
            assert list(state.shape) == cache_shape
            assert state.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
        (logits,) = function.output
        assert logits.name == "logits"
        assert list(logits.type.multiArrayType.shape) == [1, length, 4096]
        assert (
            logits.type.multiArrayType.dataType
            == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
        )
        for feature in [*function.input, *function.output, *function.state]:
            assert feature.shortDescription, feature.name
        # Each state is read once and written once per function (see build.Step).
        for op_type in ("read_state", "write_state"):
            assert op_count(spec, function.name, op_type) >= 2


def test_metadata(int4_export, tokenizer):
    model, result, spec = int4_export
    meta = dict(spec.description.metadata.userDefined)
    assert meta["ondevice_lora.format_version"] == "1"
    assert meta["ondevice_lora.precision"] == "int4"
    assert meta["ondevice_lora.context_length"] == str(CONTEXT)
    assert meta["ondevice_lora.prefill_length"] == str(PREFILL)
    assert meta["ondevice_lora.model_type"] == "llama"
    assert meta["ondevice_lora.adapter_config"] == "null"
    assert meta["ondevice_lora.adapter_mode"] == "none"
    fingerprint = json.loads(meta["ondevice_lora.base_fingerprint"])
    assert fingerprint == json.loads(json.dumps(base_fingerprint(model, tokenizer)))


def test_int4_weights_are_stored_as_4_bits_and_dominate_the_package(int4_export):
    model, result, spec = int4_export
    for function in ("prefill", "decode"):
        dequantized = [
            op for op in operations(spec, function) if op.type == "constexpr_blockwise_shift_scale"
        ]
        assert len(dequantized) == 4 * 7 + 2  # every projection, the embedding, the lm head
        for op in dequantized:
            # Constexpr inputs are written inline, their data in weight.bin.
            data = op.inputs["data"].arguments[0].value
            assert data.type.tensorType.dataType == MIL_pb2.UINT4
            assert data.blobFileValue.fileName.endswith("weight.bin")
    weight_file = result.path / "Data/com.apple.CoreML/weights/weight.bin"
    # Both functions share one copy of every weight; 8-bit codes would need ~1.8x this.
    assert weight_file.stat().st_size <= 1.05 * result.weight_bytes
    assert result.package_bytes <= 1.10 * result.weight_bytes, result.summary()


def test_side_files_give_the_app_its_tokenizer(int4_export, tokenizer):
    _, result, _ = int4_export
    folder = tokenizer_folder(result.path)
    assert folder == result.path.parent / "model-tokenizer"
    assert all(p.parent == folder for p in result.files)
    assert sorted(p.name for p in result.files) == [
        "config.json",
        "special_tokens.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    reloaded = Tokenizer.from_folder(folder)
    assert reloaded.encode("hello there") == tokenizer.encode("hello there")
    info = json.loads((folder / "special_tokens.json").read_text())
    assert info["eos_token_ids"] == tokenizer.eos_token_ids
    assert info["chat_template"] == tokenizer.chat_template
    assert (info["context_length"], info["prefill_length"]) == (CONTEXT, PREFILL)
    assert info["package"] == "model.mlpackage"
    # swift-transformers reads model_type from config.json to pick the tokenizer.
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


def test_two_exports_into_one_folder_keep_each_their_own_side_files(tmp_path, tokenizer):
    # Two different models (another vocabulary, another context) exported side by side.
    small = make_model()
    other = make_model(model_type="qwen2")
    first = export_coreml(small, tokenizer, tmp_path / "a.mlpackage", "fp16", 16, prefill_length=4)
    second = export_coreml(other, tokenizer, tmp_path / "b.mlpackage", "fp16", 32, prefill_length=4)
    for result, model_type, context in ((first, "llama", 16), (second, "qwen2", 32)):
        folder = tokenizer_folder(result.path)
        info = json.loads((folder / "special_tokens.json").read_text())
        assert info["package"] == result.path.name and info["context_length"] == context
        assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a-tokenizer", "a.mlpackage", "b-tokenizer", "b.mlpackage"]


def test_int4_adapter_stays_an_unmerged_branch_over_the_base_codes(tmp_path):
    model = make_model(model_type="qwen2")
    nn.quantize(model, group_size=32, bits=4)
    base_codes = unpack_codes(model.layers[0].self_attn.q_proj.weight)
    with_adapter(model)
    config = {"rank": 4, "alpha": 16.0}
    result = export_coreml(
        model, None, tmp_path / "a.mlpackage", "int4", CONTEXT, adapter_config=config
    )
    spec = ct.models.MLModel(str(result.path), skip_model_load=True).get_spec()
    meta = dict(spec.description.metadata.userDefined)
    assert meta["ondevice_lora.adapter_mode"] == "unmerged"
    assert json.loads(meta["ondevice_lora.adapter_config"]) == config
    # Two matmuls (x A^T, then B^T) per adapted projection.
    assert op_count(spec, "decode", "matmul") == 2 * 7 * 2
    weights = decoder_weights(model, get_precision("int4"), CONTEXT)
    np.testing.assert_array_equal(weights.layers[0].q_proj.weight.codes, base_codes)
    assert result.files == []  # no tokenizer given


def test_fp32_merges_the_adapter_and_keeps_the_cache_residual(tmp_path):
    model = with_adapter(make_model(model_type="qwen3"), kind="dora")
    result = export_coreml(model, None, tmp_path / "f.mlpackage", "fp32", CONTEXT)
    spec = ct.models.MLModel(str(result.path), skip_model_load=True).get_spec()
    meta = dict(spec.description.metadata.userDefined)
    assert meta["ondevice_lora.adapter_mode"] == "merged"
    assert op_count(spec, "decode", "matmul") == 0
    decode = spec.description.functions[1]
    assert [s.name for s in decode.state] == [
        "key_cache",
        "value_cache",
        "key_cache_low",
        "value_cache_low",
    ]
    logits = decode.output[0].type.multiArrayType
    assert logits.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    # Exporting again replaces the package.
    again = export_coreml(model, None, result.path, "fp32", CONTEXT)
    assert again.package_bytes == result.package_bytes


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(out="model.bin"), "must end in .mlpackage"),
        (dict(prefill_length=64, context_length=32), "prefill_length"),
        (dict(precision="int8"), "precision 'int8'"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, settings, message):
    out = tmp_path / settings.pop("out", "m.mlpackage")
    with pytest.raises(CoreMLExportError, match=message):
        export_coreml(make_model(), None, out, **settings)


def test_int4_codes_are_mlx_affine_grid():
    w = mx.random.normal((8, 64))
    w[2, :32] = 0.25  # a constant group: scale 0
    packed, scales, biases = mx.quantize(w, group_size=32, bits=4)
    q = from_affine(packed, scales, biases, 4)
    reference = np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=4))
    blocks = np.repeat(q.scales.astype(np.float32), 32, axis=1)
    ours = blocks * (q.codes - np.repeat(q.offsets.astype(np.float32), 32, axis=1))
    step = np.abs(np.repeat(np.array(scales), 32, axis=1))  # MLX scales may be negative
    # fp16 rounding of the offset moves a weight by well under 1% of a quantisation step.
    assert np.all(np.abs(ours - reference) <= 0.01 * step + 1e-7)
    assert q.codes.max() <= 15 and q.codes.dtype == np.uint8
    assert q.nbytes == 8 * 64 // 2 + q.scales.nbytes + q.offsets.nbytes


def test_quantize_for_int4_makes_the_codes_an_int4_export_keeps():
    model = make_model()
    dense = model.layers[1].mlp.up_proj.weight
    # The embedding at 8 bits (as GGUF Q8_0 gives it) is kept; 2-bit is re-quantised to 4.
    model.model.embed_tokens = model.model.embed_tokens.to_quantized(group_size=32, bits=8)
    model.layers[0].mlp.down_proj = model.layers[0].mlp.down_proj.to_quantized(32, bits=2)
    assert quantize_for_int4(model) == 2 * 7  # every projection
    layer = model.layers[1].mlp.up_proj
    assert isinstance(layer, nn.QuantizedLinear) and layer.bits == 4
    assert model.layers[0].mlp.down_proj.bits == 4
    packed, _, _ = mx.quantize(dense, group_size=32, bits=4)
    np.testing.assert_array_equal(unpack_codes(layer.weight), unpack_codes(packed))
    assert quantize_for_int4(model) == 0
    weights = decoder_weights(model, get_precision("int4"), CONTEXT)
    embed = model.model.embed_tokens
    assert weights.embedding.bits == 8
    np.testing.assert_array_equal(weights.embedding.codes, unpack_codes(embed.weight, bits=8))
    np.testing.assert_array_equal(
        weights.layers[1].up_proj.weight.codes, unpack_codes(layer.weight)
    )


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
            "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 64,
            "max_position_embeddings": 512,
        },
    ],
)
def test_rope_tables_match_mlx_rope(scaling):
    rope = RoPE(16, 500.0, scaling)
    cos, sin = rope_tables(rope, 64)
    x = mx.random.normal((1, 1, 64, 16))
    expected = np.array(rope(x))
    x = np.array(x)
    swapped = np.concatenate([x[..., 8:], x[..., :8]], axis=-1)
    np.testing.assert_allclose(x * cos + swapped * sin, expected, atol=2e-5)


def test_sizes_are_reported(int4_export):
    _, result, _ = int4_export
    text = result.summary()
    assert "MiB on disk" in text and "int4" in text
    assert isinstance(result.path, Path) and result.seconds > 0


def test_cli_exports_an_adapter_and_validates_the_package(tmp_path):
    from click.testing import CliRunner

    from converters.coreml.cli import coreml_command
    from ondevice_lora.adapters.files import save_adapter
    from ondevice_lora.loading import load
    from tests.hf_fixtures import write_hf_model

    write_hf_model(tmp_path / "model", "llama_tied_bias_head_dim")
    model, tokenizer = load(tmp_path / "model")
    config = LoraConfig(rank=4, target_modules=["q_proj", "down_proj"])
    apply_adapters(model, config)
    for module in adapter_modules(model).values():
        module.lora_b = mx.random.normal(module.lora_b.shape) * 0.1
    save_adapter(tmp_path / "adapter", model, config, base_fingerprint(model, tokenizer))
    out = tmp_path / "export" / "model.mlpackage"
    args = ["--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter")]
    args += ["--out", str(out), "--context", "64", "--prefill-length", "8"]
    result = CliRunner().invoke(coreml_command, args)
    assert result.exit_code == 0, result.output
    assert "quantised 15 unquantised layers" in result.output  # 2 x 7 projections + embedding
    assert "package size:" in result.output and "PASSED" in result.output
    spec = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    meta = dict(spec.description.metadata.userDefined)
    assert json.loads(meta["ondevice_lora.adapter_config"]) == config.to_dict()
    assert meta["ondevice_lora.adapter_mode"] == "unmerged"
    # The fingerprint is the base's as loaded, before the export quantised it.
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base"]
    assert json.loads(meta["ondevice_lora.base_fingerprint"])["fingerprint"] == saved["fingerprint"]
