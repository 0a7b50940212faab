"""The training loss never holds [tokens x vocab] logits, yet equals the plain loss; generation
applies the output head at the sampled position only.

The reference is the plain computation: the model's full logits (its own output head, through
MLX's quantised matmul for a quantised head) and nn.losses.cross_entropy, differentiated by
MLX. The chunked loss (training/chunked_loss.py) must give the same loss and LoRA gradients to
within 1e-5 relative, with blocks small enough that every tensor is cut several ways.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from ondevice_lora import SamplingConfig, load
from ondevice_lora.adapters.files import LoraConfig, apply_adapters
from ondevice_lora.generation.chat_session import ChatSession
from ondevice_lora.generation.generate import generate_tokens
from ondevice_lora.models import gemma3, llama
from ondevice_lora.training import chunked_loss
from ondevice_lora.training.step import masked_cross_entropy
from ondevice_lora.training.trained_positions import trained_positions
from tests.hf_fixtures import write_hf_model

TOLERANCE = 1e-5  # relative, on the loss and on every gradient (by its largest entry)
VOCAB = 6000
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
)
CASES = {
    "llama-untied-float": (llama, dict(tie_word_embeddings=False), None),
    "llama-tied-4bit": (llama, dict(tie_word_embeddings=True), 4),
    "gemma3-softcap-8bit": (
        gemma3,
        dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=20.0),
        8,
    ),
}


def adapted_model(family, extra: dict, bits: int | None):
    mx.random.seed(0)
    model = family.Model(family.ModelArgs(**SMALL, **extra))
    if bits is not None:
        nn.quantize(model, group_size=32, bits=bits)
    apply_adapters(model, LoraConfig(rank=4, alpha=8, target_modules="all-linear"))
    # Nonzero lora_b, so that every adapter value has a gradient.
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def plain_loss(model, inputs, targets, loss_mask):
    logits = model(inputs).astype(mx.float32)  # (B, W, vocab): what the chunked loss avoids
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    mask = loss_mask.astype(mx.float32)
    return (ce * mask).sum() / mask.sum(), mask.sum()


def assert_close(expected, actual):
    (loss, _), grads = expected
    (chunked, _), chunked_grads = actual
    assert abs(chunked.item() - loss.item()) <= TOLERANCE * abs(loss.item())
    flat, chunked_flat = tree_flatten(grads), tree_flatten(chunked_grads)
    assert [k for k, _ in flat] == [k for k, _ in chunked_flat] and len(flat) > 0
    for (name, g), (_, c) in zip(flat, chunked_flat):
        scale = mx.abs(g).max().item()
        assert scale > 0, name
        assert mx.abs(c - g).max().item() <= TOLERANCE * scale, name


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(case, monkeypatch):
    family, extra, bits = CASES[case]
    model = adapted_model(family, extra, bits)
    # Blocks of 1024 vocabulary rows and 20-position chunks: 6 x 3 slices per pass.
    monkeypatch.setattr(chunked_loss, "VOCAB_BLOCK", 1024)
    monkeypatch.setattr(chunked_loss, "SLICE_VALUES", 1024 * 20)
    rng = np.random.default_rng(1)
    inputs = mx.array(rng.integers(0, VOCAB, (3, 18)), mx.int32)
    targets = mx.array(rng.integers(0, VOCAB, (3, 18)), mx.int32)
    mask = mx.array(rng.random((3, 18)) < 0.6, mx.float32)

    expected = nn.value_and_grad(model, plain_loss)(model, inputs, targets, mask)
    chunked = nn.value_and_grad(model, masked_cross_entropy)
    assert_close(expected, chunked(model, inputs, targets, mask))
    # The same with logits at the trained positions only (the CPU path's gather).
    positions = trained_positions(mask)
    assert_close(expected, chunked(model, inputs, targets, mask, loss_positions=positions))
    # Nothing of (positions x vocab) was built whole: the largest slice is one block.
    layout, _ = chunked_loss.head_arrays(model)
    assert layout.vocab_block == 1024 and layout.position_chunk == 20


def test_a_quantised_head_is_never_dequantised_whole(monkeypatch):
    """Every de-quantisation the loss asks for covers at most one block of the vocabulary."""
    model = adapted_model(llama, dict(tie_word_embeddings=True), 4)
    monkeypatch.setattr(chunked_loss, "VOCAB_BLOCK", 1024)
    rows = []
    dequantize = mx.dequantize

    def recording(w, *args, **kwargs):
        if w.ndim == 2:  # not the embedding's lookup of (B, L) rows
            rows.append(w.shape[0])
        return dequantize(w, *args, **kwargs)

    monkeypatch.setattr(chunked_loss.mx, "dequantize", recording)
    inputs = mx.zeros((2, 8), mx.int32)
    loss_and_grad = nn.value_and_grad(model, masked_cross_entropy)
    mx.eval(loss_and_grad(model, inputs, inputs, mx.ones((2, 8))))
    # Blocks of the vocabulary, and the 16 target rows (forward and backward).
    assert sorted(set(rows)) == [16, VOCAB - 5 * 1024, 1024]
    assert rows.count(1024) == 2 * 5  # five full blocks, once forward, once backward


class HeadShapes:
    """Records the input shape of every call of the model's output head."""

    def __init__(self, model):
        self.shapes = []
        layer = model.output_layer()
        name = "as_linear" if model.args.tie_word_embeddings else "__call__"
        original = getattr(layer, name)

        def recording(x):
            self.shapes.append(tuple(x.shape))
            return original(x)

        if name == "as_linear":
            layer.as_linear = recording
        else:  # __call__ is looked up on the class: give this one layer a class of its own
            layer.__class__ = type(
                "Recording", (type(layer),), {"__call__": lambda s, x: recording(x)}
            )


def test_generation_applies_the_head_at_the_sampled_position_only(tmp_path):
    write_hf_model(tmp_path / "tied", "qwen2")  # tied embeddings
    model, tokenizer = load(tmp_path / "tied")
    assert model.args.tie_word_embeddings
    head = HeadShapes(model)
    hidden = model.args.hidden_size
    prompt = list(range(3, 40))  # 37 tokens
    config = SamplingConfig(max_tokens=4, stop_at_eos=False)
    generated = list(generate_tokens(model, prompt, config))
    assert len(generated) == 4
    # The prefill's head sees one position, not 37; each decoding step one more.
    assert head.shapes[0] == (1, hidden)
    assert all(shape == (1, hidden) for shape in head.shapes)

    # The same tokens as the full-logits forward picks greedily.
    logits = model(mx.array(prompt)[None])
    assert generated[0] == int(mx.argmax(logits[0, -1]).item())

    # chat (and serve, which streams through the same TextStream) likewise.
    head.shapes.clear()
    session = ChatSession(model, tokenizer, config)
    assert "".join(session.reply("hello there, how are you?")) is not None
    assert head.shapes and all(shape == (1, hidden) for shape in head.shapes)


def test_an_untied_head_is_applied_at_the_sampled_position_only(tmp_path):
    write_hf_model(tmp_path / "untied", "llama")  # an lm_head of its own
    model, _ = load(tmp_path / "untied")
    assert not model.args.tie_word_embeddings
    head = HeadShapes(model)
    list(generate_tokens(model, list(range(3, 30)), SamplingConfig(max_tokens=2)))
    assert head.shapes and all(shape == (1, model.args.hidden_size) for shape in head.shapes)
