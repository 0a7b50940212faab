"""GGUF files as people download them, against transformers' own GGUF loader.

The files are written here with the `gguf` package: a Q4_K_M-style tiny Llama (Q4_K blocks, Q6_K
for the value and down projections and the head, as llama.cpp's Q4_K_M recipe does), with Llama
3.1's `rope_freqs` and a SentencePiece vocabulary; Qwen2 and Qwen3 files (the other block types
and the refused ones: test_gguf_types.py). The reference is `from_pretrained(folder,
gguf_file=...)` (de-quantised weights, its own tokenizer conversion).
"""

from __future__ import annotations

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ondevice_lora.loading import load_gguf
from ondevice_lora.loading.gguf.reader import BLOCKS, TensorInfo, decode_affine, decode_float
from tests.test_gguf import write_gguf
from tests.tiny_tokenizer import CORPUS, write_tiny_tokenizer

Q = gguf.GGMLQuantizationType
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and 2024 numbers",
    "Unicode falls back to bytes: café, 東京, 🙂",
    "",
]
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def random_blocks(kind, rows: int, columns: int, rng, scale: float = 1.0) -> np.ndarray:
    """Random raw blocks of a K-quant type: (rows, bytes). Scales are small and, for Q4_K and
    Q5_K, each group's min is about half its range, so weights average near zero as trained
    weights do (all-positive random weights would grow activations past fp32's exact range)."""
    per_block, block_bytes = BLOCKS[kind.name]
    n = rows * columns // per_block
    blocks = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    d = (scale * rng.uniform(1e-4, 3e-4, size=(n, 1))).astype(np.float16)
    if kind in (Q.Q4_K, Q.Q5_K):  # d, dmin (= d), then 8 six-bit scales and mins
        levels = 15 if kind == Q.Q4_K else 31
        sc = rng.integers(1, 63 * 2 // levels + 1, size=(n, 8))
        mn = np.round(sc * levels / 2).astype(np.int64)
        packed = np.zeros((n, 12), np.int64)
        packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
        packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
        packed[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
        blocks[:, 0:4] = np.concatenate([d, d], axis=1).view(np.uint8)
        blocks[:, 4:16] = packed.astype(np.uint8)
    else:  # Q6_K: signed codes; 16 int8 scales, then d
        blocks[:, -18:-2] = rng.integers(-16, 17, size=(n, 16)).astype(np.int8).view(np.uint8)
        blocks[:, -2:] = d.view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quant_blocks_decode_like_ggml(kind):
    raw = random_blocks(kind, 4, 512, np.random.default_rng(0))
    expected = dequantize(raw, kind)
    tensor = TensorInfo("w", (4, 512), kind.name, raw.reshape(-1))
    assert np.array_equal(decode_float(tensor), expected)
    if kind != Q.Q6_K:  # kept quantised: MLX's own de-quantisation gives the same values
        codes, scales, biases, bits = decode_affine(tensor)
        values = mx.dequantize(
            mx.array(codes), mx.array(scales), mx.array(biases), group_size=32, bits=bits
        )
        assert bits == (4 if kind == Q.Q4_K else 5)
        assert np.array_equal(np.array(values), expected)


def sentencepiece_metadata(writer: gguf.GGUFWriter) -> list[str]:
    """A SentencePiece-style BPE vocabulary, learned from the tiny corpus, as llama.cpp stores
    one: <unk>, <s>, </s>, the 256 byte tokens, then pieces with descending scores."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    pieces = [t for t, _ in sorted(backend.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [p for p in pieces if p not in tokens]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    return tokens


def write_q4_k_m_llama(path, seed=0):
    """A tiny Llama 3.1-style Q4_K_M file: random K-quant blocks, F32 norms, rope_freqs."""
    rng = np.random.default_rng(seed)
    hidden, inter, layers, heads, kv_heads = 256, 512, 2, 4, 2
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    tokens = sentencepiece_metadata(writer)
    vocab = len(tokens)
    writer.add_block_count(layers)
    writer.add_context_length(131072)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    # llama.cpp's converter: one divisor per rotated pair from the llama3 scaling formula.
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    wavelength = 2 * np.pi / inv_freq
    old, low, high, factor = 8192, 1.0, 4.0, 8.0
    smooth = (old / wavelength - low) / (high - low)
    factors = np.where(
        wavelength < old / high,
        1.0,
        np.where(wavelength > old / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
    }
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (inter, hidden),
            f"blk.{i}.ffn_up.weight": (inter, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, inter),
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.ffn_norm.weight": (hidden,),
        }
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.add_tensor(name, rng.uniform(0.8, 1.2, shape).astype(np.float32))
            continue
        kind = Q.Q6_K if name.split(".")[-2] in ("attn_v", "ffn_down", "output") else Q.Q4_K
        # Larger query and key weights give peaked attention, where RoPE's scaling shows.
        scale = 30.0 if name.split(".")[-2] in ("attn_q", "attn_k") else 1.0
        writer.add_tensor(name, random_blocks(kind, *shape, rng, scale), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q4_k_m")
    write_q4_k_m_llama(folder / "tiny-Q4_K_M.gguf")
    return folder, "tiny-Q4_K_M.gguf"


@pytest.mark.slow
def test_q4_k_m_llama_with_rope_freqs_matches_transformers(q4_k_m, capfd):
    folder, name = q4_k_m
    model, tokenizer, config = load_gguf(folder / name)
    note = capfd.readouterr().err
    assert "de-quantised 5 tensor(s)" in note and "5 Q6_K (scales per 16 weights)" in note
    assert config["rope_scaling"] == LLAMA3_SCALING
    # Q4_K layers stay 4-bit; Q6_K ones (value, down, head) were de-quantised.
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert type(model.layers[0].self_attn.v_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear

    hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    # transformers' GGUF loader skips rope_freqs: give its weights the Hub's llama3 scaling.
    hf_config = hf_gguf.config
    hf_config.rope_parameters = {"rope_theta": 10000.0, **LLAMA3_SCALING}
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    reference.load_state_dict(hf_gguf.state_dict())

    # Kept-quantised values are exactly the de-quantised ones transformers holds.
    gate = model.layers[1].mlp.gate_proj
    ours = mx.dequantize(gate.weight, gate.scales, gate.biases, group_size=32, bits=4)
    theirs = hf_gguf.model.layers[1].mlp.gate_proj.weight.detach().numpy()
    assert np.array_equal(np.array(ours), theirs)

    ids = np.random.default_rng(1).integers(0, config["vocab_size"], size=(2, 24))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
        unscaled = hf_gguf(torch.from_numpy(ids)).logits.numpy()
    actual = np.array(model(mx.array(ids, dtype=mx.int32)))
    assert np.abs(actual - expected).max() < 1e-4
    assert np.abs(actual - unscaled).max() > 1e-3  # the scaling matters: this test can fail

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tokenizer.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(
            ids, skip_special_tokens=True
        )
    assert tokenizer.encode("hi")[0] == 1  # SentencePiece vocabularies get BOS by default
    assert any(t > 2 and t < 259 for t in tokenizer.encode("東京"))  # byte fallback


@pytest.mark.parametrize("variant", ["qwen2_untied", "qwen3_untied"])
def test_qwen_gguf_matches_transformers(tmp_path, variant):
    from tests.hf_fixtures import make_hf_model

    folder = tmp_path / "tokenizer"
    write_tiny_tokenizer(folder, template="chatml")
    hf_model = make_hf_model(variant)
    arch = hf_model.config.model_type
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, hf_model, folder, Q.Q8_0, arch=arch, pre="qwen2")
    model, tokenizer, config = load_gguf(path)
    assert config["model_type"] == arch and config["quantization"]["bits"] == 8
    # transformers' GGUF config mapping for qwen3 drops attention.key_length: pass head_dim.
    extra = {"head_dim": config["head_dim"]} if arch == "qwen3" else {}
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, **extra
    ).eval()
    ids = np.random.default_rng(2).integers(0, config["vocab_size"], size=(2, 24))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(np.array(model(mx.array(ids, dtype=mx.int32))) - expected).max() < 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text), text


GEMMA3_NAMES = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
PHI3_NAMES = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def test_gemma3_gguf_matches_transformers(tmp_path):
    from tests.hf_fixtures import WINDOW, make_hf_model

    folder = tmp_path / "tokenizer"
    write_tiny_tokenizer(folder, template="chatml")
    hf_model = make_hf_model("gemma3_text")
    layer_types = hf_model.config.layer_types  # one local layer, then one global

    def gemma_keys(writer):  # llama.cpp writes the head size of Gemma 3 always
        writer.add_key_length(hf_model.config.head_dim)
        writer.add_value_length(hf_model.config.head_dim)
        writer.add_sliding_window(WINDOW)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])

    path = tmp_path / "gemma3.gguf"
    write_gguf(
        path,
        hf_model,
        folder,
        Q.Q8_0,
        arch="gemma3",
        names=GEMMA3_NAMES,
        norm_shift=1.0,
        extra=gemma_keys,
    )
    model, _, config = load_gguf(path)
    assert config["model_type"] == "gemma3_text" and config["layer_types"] == layer_types
    # transformers' GGUF mapping reads neither the per-layer pattern nor the query scale
    # (it assumes 256, llama.cpp uses head_dim): pass both.
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path,
        gguf_file=path.name,
        layer_types=layer_types,
        query_pre_attn_scalar=config["head_dim"],
    ).eval()
    ids = np.random.default_rng(3).integers(0, config["vocab_size"], size=(2, 3 * WINDOW))
    expected = hf_logits(reference, ids)
    assert np.abs(np.array(model(mx.array(ids, dtype=mx.int32))) - expected).max() < 1e-4


def test_phi3_gguf_matches_transformers(tmp_path):
    from tests.hf_fixtures import WINDOW, make_hf_model

    folder = tmp_path / "tokenizer"
    write_tiny_tokenizer(folder, template="chatml")
    hf_model = make_hf_model("phi3")
    path = tmp_path / "phi3.gguf"
    write_gguf(
        path,
        hf_model,
        folder,
        Q.Q8_0,
        arch="phi3",
        names=PHI3_NAMES,
        extra=lambda writer: writer.add_sliding_window(WINDOW),
    )
    model, _, config = load_gguf(path)
    assert config["model_type"] == "phi3" and config["sliding_window"] == WINDOW
    # transformers' phi3 GGUF mapping drops attention.sliding_window: pass it.
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, sliding_window=WINDOW
    ).eval()
    ids = np.random.default_rng(4).integers(0, config["vocab_size"], size=(2, 3 * WINDOW))
    expected = hf_logits(reference, ids)
    assert np.abs(np.array(model(mx.array(ids, dtype=mx.int32))) - expected).max() < 1e-4


def test_phi4_mini_style_gguf_with_longrope_factors_matches_its_checkpoint(tmp_path):
    """Partial rotation (rope.dimension_count 12 of 16) and LongRoPE's factor tensors, which
    transformers' GGUF loader ignores: the reference is the transformers model the file was
    written from (its weights replaced by the file's de-quantised ones)."""
    from tests.hf_fixtures import make_hf_model

    folder = tmp_path / "tokenizer"
    write_tiny_tokenizer(folder, template="chatml")
    hf_model = make_hf_model("phi3_longrope_partial")
    rope = hf_model.config.rope_parameters

    def longrope(writer):
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))

    path = tmp_path / "phi4.gguf"
    reference = write_gguf(
        path,
        hf_model,
        folder,
        Q.Q8_0,
        arch="phi3",
        names=PHI3_NAMES,
        rope_dims=12,
        extra=longrope,
    )
    model, _, config = load_gguf(path)
    assert config["partial_rotary_factor"] == 0.75 and config["tie_word_embeddings"]
    for length in (24, 40):  # within the original context of 32, then past it
        ids = np.random.default_rng(length).integers(0, config["vocab_size"], size=(2, length))
        expected = hf_logits(reference, ids)
        assert np.abs(np.array(model(mx.array(ids, dtype=mx.int32))) - expected).max() < 1e-4
