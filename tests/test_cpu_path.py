"""The Linux CPU path: de-quantise-then-matmul, block causal attention, logits only at trained
positions, and the OpenBLAS preload. Each must leave results unchanged (float32 rounding)."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from ondevice_lora.adapters.files import LoraConfig, apply_adapters, base_fingerprint
from ondevice_lora.backend import cpu_attention, fast_blas
from ondevice_lora.backend.cpu_matmul import (
    MIN_ROWS,
    DequantizedMatmulLinear,
    dequantized_matmuls,
)
from ondevice_lora.models.llama import Model, ModelArgs
from ondevice_lora.training.step import masked_cross_entropy
from ondevice_lora.training.trained_positions import SIZES_PER_SHAPE, trained_positions

TOLERANCE = 1e-5  # relative, on logits and gradients
OPENBLAS = fast_blas.find_openblas()
needs_openblas = pytest.mark.skipif(
    OPENBLAS is None or not sys.platform.startswith("linux"),
    reason=f"no OpenBLAS exporting cblas_sgemm installed ({fast_blas.INSTALL_HINT})",
)


def relative(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.maximum(mx.abs(a).max(), 1e-30)).item()


def tiny_model(tied: bool = False, quantized: bool = True) -> Model:
    mx.random.seed(0)
    args = ModelArgs(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=320, tie_word_embeddings=tied,
    )  # fmt: skip
    model = Model(args)
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    apply_adapters(model, LoraConfig(rank=4, alpha=8.0, target_modules="all-linear"))
    # A nonzero B, so the adapters take part in the outputs and gradients being compared.
    for _, module in model.named_modules():
        if "lora_b" in module:
            module.lora_b = 0.1 * mx.random.normal(module.lora_b.shape)
    mx.eval(model.parameters())
    return model


def batch(length: int = 40):
    mx.random.seed(1)
    inputs = mx.random.randint(0, 320, (2, length))
    targets = mx.random.randint(0, 320, (2, length))
    loss_mask = (mx.random.uniform(shape=(2, length)) > 0.4).astype(mx.float32)
    return inputs, targets, loss_mask


def loss_and_grads(model, *args, **kwargs):
    (loss, ntoks), grads = nn.value_and_grad(model, masked_cross_entropy)(model, *args, **kwargs)
    return loss, ntoks, dict(tree_flatten(grads))


@pytest.mark.parametrize("tied", [False, True])
def test_dequantized_matmuls_match_the_quantized_kernel(tied):
    model = tiny_model(tied)
    inputs, targets, loss_mask = batch()
    fingerprint = base_fingerprint(model)
    names = [name for name, _ in tree_flatten(model.parameters())]
    expected_logits = model(inputs)
    expected_loss, _, expected_grads = loss_and_grads(model, inputs, targets, loss_mask)
    with dequantized_matmuls(model, enabled=True):
        head = model.model.embed_tokens if tied else model.lm_head
        assert type(head).__name__.startswith("DequantizedMatmul")
        # Same parameters, same identity: adapters saved meanwhile fit the base unchanged.
        assert [name for name, _ in tree_flatten(model.parameters())] == names
        assert base_fingerprint(model) == fingerprint
        logits = model(inputs)
        loss, _, grads = loss_and_grads(model, inputs, targets, loss_mask)
    assert relative(expected_logits, logits) <= TOLERANCE
    assert abs(loss.item() - expected_loss.item()) <= TOLERANCE * abs(expected_loss.item())
    assert set(grads) == set(expected_grads) and all("lora" in name for name in grads)
    for name, grad in grads.items():
        assert relative(expected_grads[name], grad) <= TOLERANCE, name
    # The classes come back on exit.
    assert type(model.layers[0].self_attn.q_proj.base) is nn.QuantizedLinear


def test_few_rows_stay_on_the_quantized_kernel():
    layer = nn.QuantizedLinear(64, 96, group_size=32, bits=4)
    x = mx.random.normal((1, MIN_ROWS - 1, 64))
    expected = layer(x)
    with dequantized_matmuls(layer, enabled=True):
        assert isinstance(layer, DequantizedMatmulLinear)
        # Bit for bit: the quantised kernel itself ran.
        assert mx.array_equal(layer(x), expected)


def test_disabled_leaves_the_model_alone():
    model = tiny_model()
    with dequantized_matmuls(model, enabled=False):
        assert type(model.lm_head) is nn.QuantizedLinear


class Stack(nn.Module):
    def __init__(self, count: int, dims: int):
        super().__init__()
        self.layers = [nn.QuantizedLinear(dims, dims, group_size=64, bits=4) for _ in range(count)]

    def __call__(self, x):
        for layer in self.layers:
            x = nn.silu(layer(x))
        return x


def test_dequantized_weights_are_not_all_held_for_backward():
    # Each float32 weight is made for its matmul and again in the backward pass; were they
    # all kept from forward to backward, the compiled step's peak would exceed the dense model.
    count, dims = 24, 512
    stack = Stack(count, dims)
    mx.eval(stack.parameters())
    x = mx.random.normal((16, dims))
    with dequantized_matmuls(stack, enabled=True):
        grad = mx.compile(mx.grad(lambda x: stack(x).sum()))
        mx.eval(grad(x))
        mx.reset_peak_memory()
        mx.eval(grad(x))
    # Measured: ~12 weights' worth with the mx.depends ordering, ~32 without it.
    assert mx.get_peak_memory() < 0.75 * count * dims * dims * 4


def test_trained_positions_give_the_same_loss_and_gradients():
    model = tiny_model(quantized=False)
    inputs, targets, loss_mask = batch()
    positions = trained_positions(loss_mask)
    assert positions.size % -(-loss_mask.size // SIZES_PER_SHAPE) == 0
    assert int((positions < loss_mask.size).sum()) == int(loss_mask.sum())
    expected_loss, expected_n, expected_grads = loss_and_grads(model, inputs, targets, loss_mask)
    loss, n, grads = loss_and_grads(model, inputs, targets, loss_mask, loss_positions=positions)
    assert n.item() == expected_n.item()
    assert abs(loss.item() - expected_loss.item()) <= 1e-6 * abs(expected_loss.item())
    for name, grad in grads.items():
        assert relative(expected_grads[name], grad) <= TOLERANCE, name


def test_trained_positions_of_packed_rows():
    model = tiny_model(quantized=False)
    inputs, targets, loss_mask = batch(24)
    # Two examples in the first row (positions restart), one in the second plus padding.
    position_ids = mx.array([list(range(10)) + list(range(14)), list(range(20)) + [0] * 4])
    segment_ids = mx.array([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4])
    loss_mask = loss_mask * (segment_ids > 0)
    packed = (inputs, targets, loss_mask, position_ids, segment_ids)
    expected = loss_and_grads(model, *packed)
    got = loss_and_grads(model, *packed, loss_positions=trained_positions(loss_mask))
    assert abs(got[0].item() - expected[0].item()) <= 1e-6 * abs(expected[0].item())
    for name, grad in got[2].items():
        assert relative(expected[2][name], grad) <= TOLERANCE, name


@pytest.mark.parametrize("mask_kind", ["causal", "array"])
def test_block_attention_matches_mlx(monkeypatch, mask_kind):
    monkeypatch.setattr(cpu_attention, "MIN_LENGTH", 16)
    monkeypatch.setattr(cpu_attention, "BLOCK", 8)
    mx.random.seed(2)
    q = mx.random.normal((2, 4, 37, 16))
    k, v = mx.random.normal((2, 2, 37, 16)), mx.random.normal((2, 2, 37, 16))
    mask = "causal"
    if mask_kind == "array":
        segments = mx.array([[1] * 20 + [2] * 17, [1] * 30 + [0] * 7])
        allowed = (mx.arange(37)[None] <= mx.arange(37)[:, None]) & (
            segments[:, :, None] == segments[:, None, :]
        )
        mask = mx.where(allowed[:, None], 0.0, mx.finfo(mx.float32).min)

    def attend(fn):
        return lambda q, k, v: fn(q, k, v, scale=0.25, mask=mask)

    mlx_attention = attend(mx.fast.scaled_dot_product_attention)
    blocked = attend(cpu_attention.scaled_dot_product_attention)
    assert relative(mlx_attention(q, k, v), blocked(q, k, v)) <= TOLERANCE
    expected = mx.grad(lambda *a: (mlx_attention(*a) * v.mean()).sum(), argnums=(0, 1, 2))(q, k, v)
    got = mx.grad(lambda *a: (blocked(*a) * v.mean()).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(expected, got):
        assert relative(a, b) <= TOLERANCE


def test_elf_symbol_reader(tmp_path):
    not_elf = tmp_path / "libfake.so"
    not_elf.write_bytes(b"not an ELF file at all")
    assert not fast_blas.exports_symbol(not_elf)
    assert not fast_blas.exports_symbol(tmp_path / "missing.so")
    # MLX's extension module imports cblas_sgemm (undefined there), it does not provide it.
    assert not fast_blas.exports_symbol(mx.__file__)


def test_preload_env_puts_the_library_first():
    env = fast_blas.preload_env("/x/libopenblas.so.0", {"LD_PRELOAD": "/a.so /x/libopenblas.so.0"})
    assert env["LD_PRELOAD"] == "/x/libopenblas.so.0:/a.so"


def test_reexec_is_refused_when_opted_out_or_already_done(monkeypatch):
    def fail(*args):
        raise AssertionError("must not re-execute")

    monkeypatch.setattr(os, "execve", fail)
    monkeypatch.setattr(fast_blas, "find_openblas", lambda: "/x/libopenblas.so.0")
    monkeypatch.setattr(fast_blas, "fast_blas_active", lambda: False)
    monkeypatch.setenv(fast_blas.OPT_OUT_ENV, "0")
    fast_blas.reexec_with_fast_blas()
    monkeypatch.delenv(fast_blas.OPT_OUT_ENV)
    monkeypatch.setenv(fast_blas.REEXEC_MARKER_ENV, "1")
    fast_blas.reexec_with_fast_blas()


@needs_openblas
def test_openblas_is_found_and_preloaded_by_reexec():
    assert fast_blas.exports_symbol(OPENBLAS)
    code = (
        "from ondevice_lora.backend.fast_blas import reexec_with_fast_blas, blas_provider\n"
        "reexec_with_fast_blas()\n"
        "print(blas_provider())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", fast_blas.OPT_OUT_ENV)}
    env.pop(fast_blas.REEXEC_MARKER_ENV, None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert os.path.realpath(run.stdout.strip()) == os.path.realpath(OPENBLAS)
    env[fast_blas.OPT_OUT_ENV] = "0"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "None"


@needs_openblas
def test_dequantized_path_with_openblas_matches():
    # The same comparison as above, in a process whose MLX matmuls go through OpenBLAS (a
    # different summation order from the quantised kernel's).
    test = f"{__file__}::test_dequantized_matmuls_match_the_quantized_kernel"
    env = fast_blas.preload_env(OPENBLAS)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:]
