"""Sequence packing: RoPE at explicit positions, the block-diagonal mask, packed rows, and the
acceptance test: an example's loss and gradient are the same packed or alone.

RoPE is held to transformers' LlamaRotaryEmbedding at the same positions (default, linear and
Llama 3 scaling); packed training is held to each example run through the model by itself.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from ondevice_lora.adapters.files import (
    LoraConfig,
    adapter_modules,
    adapter_tensors,
    apply_adapters,
)
from ondevice_lora.data import iterate_batches
from ondevice_lora.data.packing import iterate_packed_batches, pack_examples
from ondevice_lora.loading import load
from ondevice_lora.models.base import RoPE, make_segment_mask
from ondevice_lora.training.step import make_step, masked_cross_entropy
from tests.hf_fixtures import LLAMA3_SCALING, write_hf_model

# Packed and unpacked losses, logits and gradients must agree within this (the acceptance).
PACKED_TOLERANCE = 1e-5
# RoPE against transformers' float32 cos/sin: both round the angle's sine and cosine.
ROPE_TOLERANCE = 1e-5

SCALINGS = {
    "default": (10000.0, None),
    "linear": (10000.0, {"rope_type": "linear", "factor": 4.0}),
    "llama3": (500000.0, LLAMA3_SCALING),
}


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rope_at_explicit_positions_equals_transformers_and_the_fast_path(scaling):
    theta, rope_scaling = SCALINGS[scaling]
    B, H, L, D = 2, 3, 12, 16
    rope = RoPE(D, theta, rope_scaling)
    x = mx.random.normal((B, H, L, D), key=mx.random.key(0))
    positions = mx.array(np.random.default_rng(0).integers(0, 300, size=(B, L)), dtype=mx.int32)

    config = LlamaConfig(
        hidden_size=H * D, num_attention_heads=H, rope_theta=theta, rope_scaling=rope_scaling
    )
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.tensor(np.array(positions)))
    reference, _ = apply_rotary_pos_emb(torch.tensor(np.array(x)), torch.zeros(1), cos, sin)
    ours = rope(x, positions=positions)
    np.testing.assert_allclose(np.array(ours), reference.numpy(), atol=ROPE_TOLERANCE)

    # Each token rotated at its position is what the fast path gives that token at an offset.
    for b, t in [(0, 0), (0, 5), (1, 11)]:
        offset = int(positions[b, t])
        fast = rope(x[b : b + 1, :, t : t + 1], offset=offset)
        assert mx.array_equal(ours[b : b + 1, :, t : t + 1], fast)
    # Consecutive positions from an offset equal the fast path over the whole sequence.
    consecutive = mx.broadcast_to(7 + mx.arange(L), (B, L))
    assert mx.array_equal(rope(x, positions=consecutive), rope(x, offset=7))


def test_segment_mask_is_block_diagonal_and_causal():
    segments = mx.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    mask = np.array(make_segment_mask(segments, mx.float32))[0, 0]
    ids = np.array(segments)[0]
    for q in range(8):
        for k in range(8):
            visible = k <= q and ids[k] == ids[q]
            assert (mask[q, k] == 0) == visible, (q, k)
    assert mask.min() == np.finfo(np.float32).min  # finite: no NaN from an all-masked row


def make_examples(n, seed=0, low=2, high=30):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(low, high))
        ids = rng.integers(5, 100, size=length).tolist()
        examples.append({"input_ids": ids, "loss_mask": rng.integers(0, 2, size=length).tolist()})
    return examples


def test_packing_places_every_example_once_within_capacity_and_is_seeded():
    examples = make_examples(200, high=60)
    rows = pack_examples(examples, max_length=64, seed=3)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(200))
    sizes = [sum(len(examples[i]["input_ids"]) - 1 for i in row) for row in rows]
    assert max(sizes) <= 63
    # Best-fit decreasing leaves well under one row's worth of padding per few rows.
    assert sum(sizes) / (63 * len(rows)) > 0.95
    assert rows == pack_examples(examples, max_length=64, seed=3)
    assert rows != pack_examples(examples, max_length=64, seed=3, epoch=1)
    fixed = pack_examples(examples, 64, shuffle=False)
    assert fixed == pack_examples(examples, 64, seed=9, shuffle=False)


def test_packed_rows_restart_positions_and_shift_within_each_example():
    examples = make_examples(23)
    seen = []
    for batch in iterate_packed_batches(examples, batch_size=2, max_length=32, seed=1):
        inputs, targets, mask, positions, segments = (np.array(a) for a in batch)
        assert inputs.dtype == positions.dtype == segments.dtype == np.int32
        assert inputs.shape[1] <= 31 and mask.dtype == np.float32
        for r in range(inputs.shape[0]):
            for s in range(1, segments[r].max() + 1):
                where = np.flatnonzero(segments[r] == s)
                assert (np.diff(where) == 1).all() and (
                    positions[r, where] == np.arange(where.size)
                ).all()
                ids = [*inputs[r, where].tolist(), int(targets[r, where[-1]])]
                (example,) = [x for x in examples if x["input_ids"] == ids]
                assert targets[r, where].tolist() == example["input_ids"][1:]
                assert mask[r, where].tolist() == example["loss_mask"][1:]
                seen.append(tuple(ids))
            padding = segments[r] == 0
            assert not mask[r, padding].any() and not inputs[r, padding].any()
    assert sorted(seen) == sorted(tuple(x["input_ids"]) for x in examples)


def test_packed_batches_resume_from_a_saved_position():
    examples = make_examples(40)
    run = iterate_packed_batches(examples, 2, 32, seed=7, repeat=True)
    per_epoch = len(run)
    for _ in range(per_epoch - 1):
        next(run)
    state = json.loads(json.dumps(run.state))
    rest = [np.array(next(run).inputs).tolist() for _ in range(per_epoch + 2)]  # into epoch 2
    resumed = iterate_packed_batches(examples, 2, 32, seed=7, repeat=True, **state)
    assert [np.array(next(resumed).inputs).tolist() for _ in range(per_epoch + 2)] == rest


# ---- the acceptance test: packed == each example alone ----


@pytest.fixture(scope="module", params=["llama", "qwen3", "llama3_rope_scaling"])
def adapted_model(request, tmp_path_factory):
    """A tiny model with LoRA on every linear layer and nonzero lora_b (so both A and B get
    gradients and the adapter changes the output)."""
    folder = tmp_path_factory.mktemp(request.param)
    write_hf_model(folder, request.param)
    model, _ = load(folder)
    mx.random.seed(0)
    apply_adapters(model, LoraConfig(rank=4, target_modules="all-linear"))
    for layer in adapter_modules(model).values():
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())
    return model


def token_losses(model, batch) -> np.ndarray:
    """Cross-entropy at every position of a batch, (B, W)."""
    logits = (
        model(batch[0], position_ids=batch[3], segment_ids=batch[4])
        if len(batch) == 5
        else model(batch[0])
    )
    return np.array(nn.losses.cross_entropy(logits, batch[1], reduction="none"))


# Rows of 64 positions, and rows long enough (>= 256) for the CPU's block-wise attention.
@pytest.mark.parametrize("max_length", [64, 320])
def test_packed_loss_and_gradient_equal_each_example_alone(adapted_model, max_length):
    model = adapted_model
    examples = make_examples(9, seed=4, low=5, high=max_length * 2 // 3)
    (packed,) = list(iterate_packed_batches(examples, 9, max_length, shuffle=False))
    assert packed.inputs.shape[0] < 9  # several examples share rows

    # Per-example mean losses from the packed batch, and from each example as a batch of one.
    ce = token_losses(model, tuple(packed))
    inputs, targets, mask, _, segments = (np.array(a) for a in packed)
    checked = 0
    for r in range(inputs.shape[0]):
        for s in range(1, segments[r].max() + 1):
            where = segments[r] == s
            if not mask[r, where].any():
                continue
            ids = [*inputs[r, where].tolist(), int(targets[r, where][-1])]
            (x,) = [x for x in examples if x["input_ids"] == ids]
            (alone,) = list(iterate_batches([x], 1, max_length, shuffle=False, pad_multiple=1))
            alone_mask = np.array(alone.loss_mask)[0]
            alone_loss = (
                token_losses(model, tuple(alone))[0] * alone_mask
            ).sum() / alone_mask.sum()
            packed_loss = (ce[r, where] * mask[r, where]).sum() / mask[r, where].sum()
            assert abs(packed_loss - alone_loss) <= PACKED_TOLERANCE, (packed_loss, alone_loss)
            checked += 1
    assert checked >= 7

    # The whole batch's loss and gradient equal those of the same examples unpacked.
    (bucketed,) = list(iterate_batches(examples, 9, max_length, shuffle=False))
    loss_and_grad = nn.value_and_grad(model, masked_cross_entropy)
    (packed_loss, packed_n), packed_grads = loss_and_grad(model, *packed)
    (bucketed_loss, bucketed_n), bucketed_grads = loss_and_grad(model, *bucketed)
    assert packed_n.item() == bucketed_n.item()
    assert abs(packed_loss.item() - bucketed_loss.item()) <= PACKED_TOLERANCE
    flat_packed, flat_bucketed = (
        dict(tree_flatten(packed_grads)),
        dict(tree_flatten(bucketed_grads)),
    )
    assert set(flat_packed) == set(flat_bucketed) and len(flat_packed) > 0
    for name, g in flat_packed.items():
        assert mx.abs(g - flat_bucketed[name]).max().item() <= PACKED_TOLERANCE, name


def test_one_training_step_gives_the_same_adapter_packed_or_not(adapted_model):
    model = adapted_model
    examples = make_examples(12, seed=5, low=5, high=40)
    start = {k: mx.array(v) for k, v in adapter_tensors(model).items()}
    after = {}
    for name, iterate in (("packed", iterate_packed_batches), ("bucketed", iterate_batches)):
        model.load_weights(list(start.items()), strict=False)
        # SGD: its update is the gradient itself, so this compares what the compiled step
        # computed; Adam's first update is sign(gradient), blind to its size.
        optimizer = optim.SGD(learning_rate=0.5)
        optimizer.init(model.trainable_parameters())
        step = make_step(model, optimizer)
        (batch,) = list(iterate(examples, 12, 64, shuffle=False))
        loss, ntoks, _ = step(tuple(batch), None, True)
        mx.eval(model.parameters(), loss)
        after[name] = ({k: mx.array(v) for k, v in adapter_tensors(model).items()}, loss.item())
    model.load_weights(list(start.items()), strict=False)
    (packed, packed_loss), (bucketed, bucketed_loss) = after["packed"], after["bucketed"]
    assert abs(packed_loss - bucketed_loss) <= PACKED_TOLERANCE
    moved = max(mx.abs(packed[k] - start[k]).max().item() for k in start)
    assert moved > 1e-3  # the step really changed the adapter
    for k in start:
        assert mx.abs(packed[k] - bucketed[k]).max().item() <= PACKED_TOLERANCE, k
