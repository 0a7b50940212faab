"""GGUF for llama.cpp, Ollama and LM Studio: `fuse`/`convert --out model.gguf` read back by the
gguf package, by transformers' GGUF loader (which we did not write) and by our reader; GGUF LoRA
export and import round trips for every family."""

from __future__ import annotations

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from mlx.utils import tree_flatten

from converters.formats import AdapterFormatError, export_gguf_lora, import_gguf_lora
from converters.formats.gguf_model import GGUFExportError, write_gguf_model
from converters.formats.gguf_vocab import add_tokenizer
from ondevice_lora.adapters.files import ADAPTER_WEIGHTS_FILE, LoraConfig, read_adapter_config
from ondevice_lora.adapters.fuse import fuse
from ondevice_lora.cli import main
from ondevice_lora.loading import load, load_gguf
from ondevice_lora.loading.convert import convert
from ondevice_lora.loading.gguf.reader import GGUFFile
from ondevice_lora.loading.gguf.tokenizer import gguf_tokenizer
from ondevice_lora.loading.weights import read_safetensors
from tests.adapter_fixtures import write_adapter
from tests.hf_fixtures import COMMON, VARIANTS, VOCAB_SIZE, write_hf_model
from tests.real_models import gemma3_270m_path, smollm2_path
from tests.tiny_tokenizer import write_tiny_tokenizer

Q = gguf.GGMLQuantizationType
IDS = np.random.default_rng(0).integers(0, VOCAB_SIZE, size=(2, 8))
ADAPTER = LoraConfig(rank=4, alpha=8, target_modules="all-linear")

# Our fixture variant per family -> llama.cpp's architecture. transformers' GGUF loader reads
# all but smollm3, which is checked with the gguf package's reader and ours.
FAMILIES = {
    "llama": "llama",
    "llama_tied_bias_head_dim": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma3_llama_cpp": "gemma3",
    "smollm3_llama_cpp": "smollm3",
}

# What transformers' GGUF loader does not read from a file that has it, given as config overrides:
# Llama's biases (llama.cpp finds them by their tensors), head_dim (attention.key_length) for
# Qwen3, and Gemma 3's query scale (llama.cpp uses head_dim ** -0.5; transformers keeps
# query_pre_attn_scalar's default, 256).
TRANSFORMERS_GAPS = {
    "llama_tied_bias_head_dim": {"attention_bias": True, "mlp_bias": True},
    "qwen3": {"head_dim": 32},
    "gemma3_llama_cpp": {"query_pre_attn_scalar": 16},
}


# Shaped as llama.cpp runs them: Gemma 3 with every 6th layer global and queries scaled by
# head_dim ** -0.5; SmolLM3 with every 4th layer unrotated.
LLAMA_CPP_SHAPED = {
    "gemma3_llama_cpp": ("gemma3_text", dict(num_hidden_layers=6, query_pre_attn_scalar=16)),
    "smollm3_llama_cpp": ("smollm3", dict(num_hidden_layers=4, no_rope_layer_interval=4)),
}


def write_base(folder, variant: str):
    """A tiny random base of `variant`, or of one of LLAMA_CPP_SHAPED."""
    if variant not in LLAMA_CPP_SHAPED:
        return write_hf_model(folder, variant)
    family, changes = LLAMA_CPP_SHAPED[variant]
    config_name, model_name, extra = VARIANTS[family]
    extra = {k: v for k, v in extra.items() if k != "layer_types"}
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **changes})
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder, template="chatml", vocab_size=VOCAB_SIZE)
    return model


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)))


def transformers_logits(path, **config) -> np.ndarray:
    """Logits of a GGUF file as transformers' own GGUF loader reads it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **config
    ).eval()
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("variant", list(FAMILIES))
def test_fused_gguf_matches_the_fused_model(tmp_path, variant):
    base = tmp_path / "base"
    write_base(base, variant)
    adapter = write_adapter(base, tmp_path / "adapter", ADAPTER)
    fuse(base, [adapter], tmp_path / "fused", dtype="float32")
    expected = logits(load(tmp_path / "fused")[0])

    path = tmp_path / "fused.gguf"
    fuse(base, [adapter], path, dtype="float32")
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == FAMILIES[variant]
    # llama.cpp refuses a token_type array of any other element type.
    token_type = reader.fields["tokenizer.ggml.token_type"]
    assert token_type.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert field(reader, "tokenizer.chat_template") == load(base)[1].chat_template
    assert {t.tensor_type for t in reader.tensors} == {Q.F32}

    if variant != "smollm3_llama_cpp":  # transformers' GGUF loader has no smollm3
        extra = TRANSFORMERS_GAPS.get(variant, {})
        np.testing.assert_allclose(transformers_logits(path, **extra), expected, atol=1e-4)
    ours, tokenizer, _ = load_gguf(path)
    np.testing.assert_allclose(logits(ours), expected, atol=1e-5, rtol=0)
    text = "What is the capital of France? 42"
    assert tokenizer.encode(text) == load(base)[1].encode(text)


def rounded_like_gguf(model, tensor_type: str):
    """`model` with every weight matrix put through gguf.quants' encoder and decoder for
    `tensor_type`: what a file of that type holds, by the reference we did not write."""
    qtype = Q[tensor_type.upper()]
    updates = []
    for name, w in tree_flatten(model.parameters()):
        if w.ndim == 2:
            data = np.array(w.astype(mx.float32))
            data = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
            updates.append((name, mx.array(data.reshape(w.shape).astype(np.float32))))
    model.load_weights(updates, strict=False)
    return model


# tensor type -> largest norm of (logits error) / norm of logits against the unrounded model,
# on weights drawn with std 0.1: fp16 and bf16 round to 11 and 8 significant bits, Q8_0 to
# 1/127 of each block's largest weight.
ROUNDING = {"f16": 2e-3, "bf16": 1.5e-2, "q8_0": 4e-2}


@pytest.mark.parametrize("tensor_type", list(ROUNDING))
def test_fused_gguf_in_smaller_types(tmp_path, tensor_type):
    base = tmp_path / "base"
    write_hf_model(base, "llama")
    adapter = write_adapter(base, tmp_path / "adapter", ADAPTER)
    fuse(base, [adapter], tmp_path / "fused", dtype="float32")
    unrounded = logits(load(tmp_path / "fused")[0])
    expected = logits(rounded_like_gguf(load(tmp_path / "fused")[0], tensor_type))
    path = tmp_path / "fused.gguf"
    fuse(base, [adapter], path, dtype="float32", gguf_type=tensor_type)
    reader = gguf.GGUFReader(path)
    matrices = {t.tensor_type for t in reader.tensors if len(t.shape) == 2}
    assert matrices == {Q[tensor_type.upper()]}
    actual = transformers_logits(path)
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits(load_gguf(path)[0]), expected, atol=1e-4, rtol=0)
    error = np.linalg.norm(actual - unrounded) / np.linalg.norm(unrounded)
    assert 0 < error < ROUNDING[tensor_type]


def test_cli_fuse_writes_one_gguf_file(tmp_path):
    base = tmp_path / "base"
    write_hf_model(base, "qwen2")
    adapter = write_adapter(base, tmp_path / "adapter", ADAPTER)
    out = tmp_path / "fused.gguf"
    args = ["fuse", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
    assert f"Wrote {out}" in result.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "exists" in again.output and "--force" in again.output
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0
    folder_args = [*args[:-1], str(tmp_path / "folder"), "--gguf-type", "q8_0"]
    result = CliRunner().invoke(main, folder_args)
    assert result.exit_code == 1 and "--gguf-type applies to a .gguf --out" in result.output
    (tmp_path / "folder.gguf").mkdir()
    args[-1] = str(tmp_path / "folder.gguf")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "is a folder" in result.output


def test_convert_to_gguf_quantises_as_llama_cpp(tmp_path):
    base = tmp_path / "base"
    write_hf_model(base, "qwen3_untied")
    path = convert(base, tmp_path / "model.gguf", bits=4)
    reader = gguf.GGUFReader(path)
    weights = {t.name: t for t in reader.tensors}
    # gguf.quants' Q4_1 encoder is the reference llama.cpp's is tested against: same bytes.
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    q = hf.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
    stored = weights["blk.1.ffn_down.weight"]
    assert stored.tensor_type == Q.Q4_1
    np.testing.assert_array_equal(np.asarray(stored.data), gguf.quants.quantize(q, Q.Q4_1))
    assert weights["blk.1.attn_norm.weight"].tensor_type == Q.F32
    np.testing.assert_allclose(
        logits(load_gguf(path)[0]), transformers_logits(path, head_dim=16), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("tensor_type", ["q4_0", "q4_1", "q8_0"])
def test_gguf_blocks_read_as_mlx_layers_are_written_back_byte_for_byte(tmp_path, tensor_type):
    base = tmp_path / "base"
    write_hf_model(base, "llama")  # Q/K rows permuted on the way out and back
    source = convert(base, tmp_path / "source.gguf", gguf_type=tensor_type)
    net, tokenizer, _ = load_gguf(source)
    assert isinstance(net.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    again = write_gguf_model(tmp_path / "again.gguf", net, tokenizer)
    theirs = {t.name: t for t in gguf.GGUFReader(source).tensors}
    ours = gguf.GGUFReader(again).tensors
    assert {t.name for t in ours} == set(theirs)
    for t in ours:
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        np.testing.assert_array_equal(t.data, theirs[t.name].data, err_msg=t.name)


def test_settings_llama_cpp_hard_codes_are_refused(tmp_path):
    write_hf_model(tmp_path / "base", "gemma3_text")  # query_pre_attn_scalar 24, pattern 2
    net, tokenizer = load(tmp_path / "base")
    with pytest.raises(GGUFExportError, match="query_pre_attn_scalar 24 is not head_dim 16"):
        write_gguf_model(tmp_path / "m.gguf", net, tokenizer)
    for variant, message in [
        ("smollm3", r"NoPE layers \[1, 0\] are not every 4th layer"),
        ("mistral_sliding", "llama.cpp's mistral has no sliding-window attention"),
    ]:
        write_hf_model(tmp_path / variant, variant)
        net, tokenizer = load(tmp_path / variant)
        with pytest.raises(GGUFExportError, match=message):
            write_gguf_model(tmp_path / "m.gguf", net, tokenizer)
    assert not (tmp_path / "m.gguf").exists()


# --- GGUF LoRA both ways -------------------------------------------------------------------------

LORA_FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "smollm3": "smollm3",
    "phi3": "phi3",
    "gemma3_text": "gemma3",
}


@pytest.mark.parametrize("variant", list(LORA_FAMILIES))
def test_gguf_lora_round_trip(tmp_path, variant):
    base = tmp_path / "base"
    write_hf_model(base, variant)
    config = LoraConfig(rank=3, alpha=7, target_modules="all-linear", use_rslora=True)
    adapter = write_adapter(base, tmp_path / "adapter", config, seed=1)
    path = export_gguf_lora(adapter, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == LORA_FAMILIES[variant]
    names = {t.name for t in reader.tensors}
    if variant == "phi3":  # fused projections, as llama.cpp's phi3 names them
        assert {"blk.0.attn_qkv.weight.lora_a", "blk.0.ffn_up.weight.lora_b"} <= names

    back = import_gguf_lora(path, tmp_path / "back", model=str(base))
    original = read_safetensors(adapter / ADAPTER_WEIGHTS_FILE)
    imported = read_safetensors(back / ADAPTER_WEIGHTS_FILE)
    assert set(imported) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(np.array(imported[key]), np.array(value), err_msg=key)
    ours, theirs = read_adapter_config(adapter)[0], read_adapter_config(back)[0]
    assert np.float32(theirs.scale) == np.float32(ours.scale)
    assert (theirs.rank, theirs.num_layers) == (3, None)
    np.testing.assert_allclose(
        logits(load(base, adapter=back)[0]), logits(load(base, adapter=adapter)[0]), atol=1e-5
    )


def test_gguf_lora_in_float16_as_llama_cpp_converts_it(tmp_path):
    """llama.cpp's convert_lora_to_gguf.py writes F16 by default; a file rewritten in F16 imports
    as the float16-rounded adapter."""
    base = tmp_path / "base"
    write_hf_model(base, "llama")
    config = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], num_layers=1)
    adapter = write_adapter(base, tmp_path / "adapter", config)
    source = gguf.GGUFReader(export_gguf_lora(adapter, tmp_path / "f32.gguf"))
    writer = gguf.GGUFWriter(tmp_path / "f16.gguf", "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, field(source, "adapter.lora.alpha"))
    for t in source.tensors:
        writer.add_tensor(t.name, np.asarray(t.data).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = import_gguf_lora(tmp_path / "f16.gguf", tmp_path / "back", model=str(base))
    original = read_safetensors(adapter / ADAPTER_WEIGHTS_FILE)
    for key, value in read_safetensors(back / ADAPTER_WEIGHTS_FILE).items():
        rounded = np.array(original[key]).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(np.array(value), rounded)
    assert read_adapter_config(back)[0].num_layers == 1


def test_gguf_lora_import_checks_the_base(tmp_path):
    write_hf_model(tmp_path / "llama", "llama")
    write_hf_model(tmp_path / "qwen2", "qwen2")
    adapter = write_adapter(tmp_path / "llama", tmp_path / "adapter", ADAPTER)
    path = export_gguf_lora(adapter, tmp_path / "adapter.gguf")
    with pytest.raises(AdapterFormatError, match="made for a 'llama' model, but the base is"):
        import_gguf_lora(path, tmp_path / "back", model=str(tmp_path / "qwen2"))
    fused = tmp_path / "model.gguf"
    fuse(tmp_path / "llama", [adapter], fused)
    with pytest.raises(AdapterFormatError, match="A model GGUF is loaded with --model"):
        import_gguf_lora(fused, tmp_path / "back", model=str(tmp_path / "llama"))
    assert not (tmp_path / "back").exists()


# --- the built-in model (slow tier) --------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_fused_gguf_keeps_its_codes(tmp_path):
    """The built-in Q4_1 SmolLM2 GGUF, fused (the MLX folder `fuse` writes) and written as GGUF:
    untouched layers are the source's bytes, and transformers' GGUF loader computes the file as
    the fused MLX model. (`fuse --out x.gguf` runs the same writer on the same fused model, as
    the tiny models' tests show; fusing once keeps this test short.)"""
    source = smollm2_path()
    config = LoraConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"], num_layers=2)
    adapter = write_adapter(source, tmp_path / "adapter", config, lora_b_std=0.02)
    # One short sample keeps fuse's own loss measurement quick.
    fuse(source, [adapter], tmp_path / "fused", samples=["The capital of France is Paris."])
    fused, tokenizer = load(tmp_path / "fused")
    path = write_gguf_model(tmp_path / "fused.gguf", fused, tokenizer)
    fused.set_dtype(mx.float32)  # exact; MLX's CPU computes float32 fastest

    theirs = {t.name: t for t in gguf.GGUFReader(source).tensors}
    adapted = {f"blk.{i}.attn_{p}.weight" for i in (28, 29) for p in "qv"}
    kept = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.name in adapted:  # re-quantised on the base's grid: still Q4_1
            assert t.tensor_type == Q.Q4_1
            assert not np.array_equal(t.data, theirs[t.name].data)
        elif t.tensor_type in (Q.Q4_1, Q.Q8_0):
            assert t.tensor_type == theirs[t.name].tensor_type, t.name
            np.testing.assert_array_equal(t.data, theirs[t.name].data, err_msg=t.name)
            kept += 1
    assert kept == 211 - len(adapted)  # every other matrix, the Q8_0 embedding included

    ids = np.array([tokenizer.encode("The capital of France is Paris. Fine-tuning on a Mac")])
    expected = np.array(fused(mx.array(ids)))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="fused.gguf", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        actual = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(actual, expected, atol=2e-3, rtol=0)
    np.testing.assert_allclose(np.array(load_gguf(path)[0](mx.array(ids))), expected, atol=2e-3)

    # Q8_0 re-encodes the 4-bit layers: 1/127 of each block's largest weight is ~0.7% of a
    # weight here (fp16: 0.03%), which moves SmolLM2's logits by ~3% of their norm (fp16: 0.1%).
    # The greedy tokens stay the same.
    q8 = write_gguf_model(tmp_path / "q8.gguf", fused, tokenizer, "q8_0")
    actual = np.array(load_gguf(q8)[0](mx.array(ids)))
    error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert 0 < error < 5e-2
    assert (actual.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.slow
def test_fuse_and_convert_default_to_the_built_in_model(tmp_path):
    smollm2_path()  # skips when it is not installed
    out = tmp_path / "smollm2.gguf"
    result = CliRunner().invoke(main, ["convert", "--out", str(out), "--gguf-type", "f16"])
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "tokenizer.ggml.pre") == "smollm"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    assert {t.tensor_type for t in reader.tensors} == {Q.F16, Q.F32}
    # An adapter for another base is refused by the built-in one: fuse loaded it.
    write_hf_model(tmp_path / "tiny", "llama")
    adapter = write_adapter(tmp_path / "tiny", tmp_path / "adapter", ADAPTER)
    args = ["fuse", "--adapter", str(adapter), "--out", str(tmp_path / "f.gguf")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "512 tokens for the adapter, 49152 for this model" in (
        result.output
    )
    assert not (tmp_path / "f.gguf").exists()


@pytest.mark.slow
def test_sentencepiece_vocabulary_round_trips(tmp_path):
    """Gemma 3's SentencePiece vocabulary (llama.cpp's "llama" kind), written from the tokenizer
    rebuilt out of its GGUF, gives the same tokens, types and token ids."""
    source = gemma3_270m_path()
    metadata = GGUFFile(source).metadata
    tokenizer = gguf_tokenizer(metadata, source)
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "gemma3")
    add_tokenizer(writer, tokenizer, len(metadata["tokenizer.ggml.tokens"]), source)
    # Our reader refuses a file without tensors (a vocabulary alone is no model): one small one.
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    written = GGUFFile(tmp_path / "vocab.gguf").metadata
    for key in ("model", "tokens", "token_type", "add_space_prefix", "bos_token_id"):
        assert written[f"tokenizer.ggml.{key}"] == metadata[f"tokenizer.ggml.{key}"], key
    again = gguf_tokenizer(written, tmp_path / "vocab.gguf")
    for text in [
        "Hello world! What's the capital of France?  Ünïcödé 漢字 🙂",
        "<start_of_turn>user\nhi<end_of_turn>\n",
        " leading space, 1234567 numbers\n\ttabs",
    ]:
        assert again.encode(text) == tokenizer.encode(text), text
