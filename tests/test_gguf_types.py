"""The GGUF block types llama.cpp's presets write besides Q4_K_M's: the fallbacks for widths that
are not multiples of 256 (Q5_0, Q5_1, IQ4_NL), the i-quant IQ4_XS, and the Q2_K / Q3_K presets.

Tiny files are written with the `gguf` package (gguf.GGUFWriter; its quantiser where it has one,
otherwise random valid blocks) and read back two ways: ours, and gguf-py's own reader and
de-quantiser (llama.cpp's numpy reference). They must agree exactly; the 5-bit types must also
stay quantised in MLX with the same values. Then whole tiny Llamas against transformers, and the
types still refused.
"""

from __future__ import annotations

import contextlib
import zlib

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import transformers
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten

from ondevice_lora.adapters.files import LoraConfig, apply_adapters
from ondevice_lora.adapters.layers import adapter_modules, fuse_adapters
from ondevice_lora.errors import ModelLoadError
from ondevice_lora.loading import load_gguf
from ondevice_lora.loading.gguf.reader import (
    BLOCKS,
    KEPT_QUANTISED,
    GGUFFile,
    decode_affine,
    decode_float,
)
from tests import test_gguf
from tests.hf_fixtures import COMMON, VOCAB_SIZE, make_hf_model
from tests.test_gguf import max_logit_difference, write_gguf
from tests.tiny_tokenizer import write_tiny_tokenizer

Q = gguf.GGMLQuantizationType
NEW_TYPES = ["Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K"]
# Byte offsets of each block's float16 super-scales (d, dmin), which random bytes would make
# NaN or huge; everything else in a block is codes or small integer scales, valid at any value.
SCALE_OFFSETS = {
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q5_K": [0, 2],
}
ROWS, COLUMNS = 6, 512


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder, template="chatml", vocab_size=VOCAB_SIZE)
    return folder


def random_blocks(name: str, rng) -> np.ndarray:
    """(ROWS, bytes) of valid random blocks of `name`: gguf-py's quantiser where it has one."""
    kind = Q[name]
    with contextlib.suppress(NotImplementedError):  # no quantiser: random valid blocks below
        return quantize(rng.standard_normal((ROWS, COLUMNS)).astype(np.float32) * 0.02, kind)
    per_block, block_bytes = BLOCKS[name]
    blocks = rng.integers(0, 256, size=(ROWS * COLUMNS // per_block, block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[name]:
        d = rng.uniform(1e-4, 1e-3, size=(blocks.shape[0], 1)).astype(np.float16)
        blocks[:, offset : offset + 2] = d.view(np.uint8)
    return blocks.reshape(ROWS, -1)


def write_tensors(path, tensors: dict[str, tuple[np.ndarray, Q]], file_type=None) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    for name, (raw, kind) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_new_types_decode_exactly_like_gguf_py(tmp_path):
    rng = np.random.default_rng(0)
    names = NEW_TYPES + ["Q5_K"]
    path = tmp_path / "types.gguf"
    write_tensors(path, {f"{n}.weight": (random_blocks(n, rng), Q[n]) for n in names})
    theirs = {t.name: t for t in gguf.GGUFReader(path).tensors}
    ours = GGUFFile(path)
    ours.check_types()
    for name in names:
        tensor = ours.tensors[f"{name}.weight"]
        reference = theirs[f"{name}.weight"]
        assert tensor.type_name == name and tensor.shape == (ROWS, COLUMNS)
        expected = dequantize(reference.data, reference.tensor_type).reshape(ROWS, COLUMNS)
        assert np.isfinite(expected).all() and np.abs(expected).max() > 0
        assert np.array_equal(decode_float(tensor), expected), name
        if name in KEPT_QUANTISED:  # held as MLX 5-bit codes: MLX's own de-quantisation agrees
            codes, scales, biases, bits = decode_affine(tensor)
            assert (
                bits == 5 and codes.dtype == np.uint32 and codes.shape == (ROWS, COLUMNS * 5 // 32)
            )
            values = mx.dequantize(
                mx.array(codes), mx.array(scales), mx.array(biases), group_size=32, bits=5
            )
            assert np.array_equal(np.array(values), expected), name


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_5_bit_gguf_stays_5_bit_and_matches_transformers(tmp_path, tokenizer_folder, qtype):
    """Q4_K_M's fallback for widths that are not multiples of 256 (Gemma 3 270M's 640)."""
    path = tmp_path / "model.gguf"
    hf_model = write_gguf(path, make_hf_model("llama"), tokenizer_folder, Q[qtype])
    model, _, config = load_gguf(path)
    assert config["quantization"] == {"group_size": 32, "bits": 5, "mode": "affine"}
    for layer in model.layers:
        for linear in (layer.self_attn.q_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert isinstance(linear, nn.QuantizedLinear) and linear.bits == 5
    assert max_logit_difference(model, hf_model) < 1e-4


def random_quantiser(kind: Q):
    """A stand-in quantiser for a type gguf-py cannot quantise: random valid blocks for each row,
    seeded by the row's values (row-local and deterministic: write_gguf quantises Llama's query
    and key rows before and after permuting them), and idempotent like a real one: a row of
    de-quantised blocks quantises to those blocks (write_gguf quantises the values it keeps)."""
    per_block, block_bytes = BLOCKS[kind.name]
    made = {}  # de-quantised row bytes -> its blocks

    def quantise(w: np.ndarray) -> np.ndarray:
        out = []
        for row in w.reshape(-1, w.shape[-1]).astype(np.float32):
            if row.tobytes() in made:
                out.append(made[row.tobytes()])
                continue
            rng = np.random.default_rng(zlib.crc32(row.tobytes()))
            blocks = rng.integers(0, 256, size=(row.size // per_block, block_bytes), dtype=np.uint8)
            for offset in SCALE_OFFSETS[kind.name]:
                d = rng.uniform(1e-3, 2e-3, size=(blocks.shape[0], 1)).astype(np.float16)
                blocks[:, offset : offset + 2] = d.view(np.uint8)
            blocks = blocks.reshape(-1)
            made[dequantize(blocks[None], kind).reshape(-1).tobytes()] = blocks
            out.append(blocks)
        return np.stack(out).reshape(*w.shape[:-1], -1)

    return quantise


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K"])
def test_dequantised_types_match_transformers_with_a_note(
    tmp_path, tokenizer_folder, qtype, monkeypatch, capfd
):
    """A tiny Llama (wide enough for 256-weight blocks) whose projections are `qtype`, against
    transformers holding gguf-py's de-quantised values; the note names the count and the cost."""

    stand_in = random_quantiser(Q[qtype])
    monkeypatch.setattr(test_gguf, "quantize", lambda w, kind: stand_in(w))
    config = transformers.LlamaConfig(**{**COMMON, "hidden_size": 256, "intermediate_size": 512})
    hf_model = transformers.LlamaForCausalLM(config).eval()
    projections = {
        f"blk.{i}.{kind}.weight": Q[qtype]
        for i in range(config.num_hidden_layers)
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    }
    path = tmp_path / "model.gguf"
    hf_model = write_gguf(path, hf_model, tokenizer_folder, Q.F32, types=projections)
    capfd.readouterr()
    model, _, config = load_gguf(path)
    note = capfd.readouterr().err
    assert f"de-quantised {len(projections)} tensor(s) to float32" in note
    assert f"{len(projections)} {qtype} (" in note and "MiB in memory" in note
    assert "quantization" not in config  # nothing left quantised: plain float layers
    assert type(model.layers[0].mlp.down_proj) is nn.Linear
    assert max_logit_difference(model, hf_model) < 1e-4


def write_one_tensor(path, kind: Q, file_type: gguf.LlamaFileType | None) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    tensors = {"blk.0.attn_q.weight": (np.zeros((8, type_size), np.uint8), kind)}
    write_tensors(path, tensors, file_type)


@pytest.mark.parametrize(
    "kind,preset",
    [("IQ2_XXS", "IQ2_XXS"), ("IQ3_S", "IQ3_M"), ("IQ1_M", None), ("TQ1_0", "TQ1_0")],
)
def test_unread_types_are_named_without_contradicting_the_preset(tmp_path, kind, preset):
    file_type = gguf.LlamaFileType[f"MOSTLY_{preset}"] if preset else None
    path = tmp_path / f"{kind}.gguf"
    write_one_tensor(path, Q[kind], file_type)
    with pytest.raises(ModelLoadError) as error:
        load_gguf(path)
    message = str(error.value)
    assert str(path) in message and f"blk.0.attn_q.weight ({kind})" in message
    assert "Q5_0" in message and "IQ4_XS" in message and "Q2_K" in message  # what loads
    suggested = message.split("whose types all load")[1]
    if preset:
        assert f"preset {preset}" in message and preset not in suggested
    assert "Q4_K_M" in suggested


def test_a_q4_k_m_file_is_never_told_to_use_q4_k_m(tmp_path):
    """The Gemma 3 270M case: a Q4_K_M file whose refused tensors must not be blamed on it."""
    path = tmp_path / "q4_k_m.gguf"
    write_one_tensor(path, Q.IQ2_XS, gguf.LlamaFileType.MOSTLY_Q4_K_M)
    with pytest.raises(ModelLoadError) as error:
        load_gguf(path)
    message = str(error.value)
    assert "preset Q4_K_M" in message
    assert "Q4_K_M" not in message.split("whose types all load")[1]


def test_5_bit_layers_take_adapters_train_and_fuse_back_to_5_bits(tmp_path, tokenizer_folder):
    """Gemma 3 270M trains on its Q5_0 layers: LoRA wraps a 5-bit QuantizedLinear, gradients
    reach the adapter, and fusing re-quantises to 5 bits with the adapter's effect kept."""
    path = tmp_path / "model.gguf"
    write_gguf(path, make_hf_model("llama"), tokenizer_folder, Q.Q5_0)
    model, _, _ = load_gguf(path)
    ids = mx.array(np.random.default_rng(0).integers(0, VOCAB_SIZE, size=(2, 12)), mx.int32)
    base = np.array(model(ids))
    apply_adapters(model, LoraConfig(rank=4, alpha=8.0, target_modules="all-linear"))
    wrapped = adapter_modules(model)
    assert wrapped and all(m.base.bits == 5 for m in wrapped.values())
    for i, module in enumerate(wrapped.values()):
        module.lora_b = mx.array(np.random.default_rng(i).normal(0, 0.05, module.lora_b.shape))
    adapted = np.array(model(ids))
    loss_and_grad = nn.value_and_grad(model, lambda m: m(ids).astype(mx.float32).square().mean())
    _, grads = loss_and_grad(model)
    flat = dict(tree_flatten(grads))
    lora = [g for name, g in flat.items() if name.endswith(("lora_a", "lora_b"))]
    assert lora and all(np.isfinite(np.array(g)).all() for g in lora)
    assert any(float(mx.abs(g).max()) > 0 for g in lora)
    fuse_adapters(model)
    fused = np.array(model(ids))
    assert model.layers[0].mlp.up_proj.bits == 5
    effect = np.abs(adapted - base).max()
    assert effect > 1e-2 and np.abs(fused - adapted).max() < 0.5 * effect
