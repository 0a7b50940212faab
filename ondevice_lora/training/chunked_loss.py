"""Cross-entropy over a large vocabulary without its [tokens x vocab] logits in memory.

The output head of a 262k-vocabulary model (Gemma 3) turns 2,048 positions into 2.1 GB of
float32 logits, and the loss's softmax and gradient double or triple that. Here the head and
the loss go one block of the vocabulary (and of the positions) at a time, as in Apple's "Cut
Your Losses in Large-Vocabulary Language Models" (Wijmans et al., 2024):

    loss[n] = logsumexp_v(h[n] . W[v]) - h[n] . W[target[n]]

- the log-sum-exp is taken per vocabulary block and the blocks' results combined, so only a
  (positions x block) slice of logits exists at once;
- the target's logit is the dot product of h[n] with its own row of W, gathered: no one-hot;
- the backward pass (an mx.custom_function vjp) recomputes each block's logits from h and W
  and adds softmax x W into the gradient of h; the forward keeps nothing but the (N,)
  log-sum-exp;
- a quantised head is de-quantised one vocabulary block at a time, never as a whole float32
  copy (0.67 GB for Gemma 3 270M's tied 262144 x 640 head).

The head is frozen (adapters live in the decoder layers), so no gradient flows to W. Results
equal the full-logits loss to float32 summation order (tests/test_chunked_loss.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

# float32 values of one (positions x vocabulary) slice of logits, at most: 16 MB. Smaller slices
# cost more Python-built graph nodes per step; larger ones hold more memory at once.
SLICE_VALUES = 4 * 1024 * 1024
# Vocabulary rows de-quantised at once (a float32 block of VOCAB_BLOCK x hidden).
VOCAB_BLOCK = 8192


@dataclass(frozen=True)
class HeadLayout:
    """How the output head's weight is stored, and how the loss walks over it."""

    quantized: bool
    group_size: int | None
    bits: int | None
    mode: str | None
    has_biases: bool
    softcap: float | None  # Gemma's final_logit_softcapping: logits = cap * tanh(z / cap)
    vocab_block: int
    position_chunk: int


def head_arrays(model) -> tuple[HeadLayout, list[mx.array]] | None:
    """The output head's layout and its arrays [weight, (scales, (biases))], or None when the
    head is not a plain (quantised) linear map the chunked loss can read."""
    layer = model.output_layer()
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        if "bias" in layer:
            return None
        arrays = [layer["weight"], layer["scales"]]
        if "biases" in layer:
            arrays.append(layer["biases"])
        quant = (True, layer.group_size, layer.bits, layer.mode, "biases" in layer)
    elif isinstance(layer, (nn.Linear, nn.Embedding)):
        if "bias" in layer:
            return None
        arrays, quant = [layer["weight"]], (False, None, None, None, False)
    else:
        return None
    vocab = arrays[0].shape[0]
    block = min(VOCAB_BLOCK, vocab)
    layout = HeadLayout(
        *quant,
        softcap=model.logit_softcap,
        vocab_block=block,
        position_chunk=max(1, SLICE_VALUES // block),
    )
    return layout, arrays


def head_cross_entropy(model, hidden: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy (N,) float32 of the model's output head applied to hidden
    (N, hidden_size) against targets (N,) int, equal to
    cross_entropy(model.output_logits(hidden), targets) without those logits in memory."""
    found = head_arrays(model)
    if found is None:  # an unusual head: the plain way
        logits = model.output_logits(hidden).astype(mx.float32)
        return nn.losses.cross_entropy(logits, targets, reduction="none")
    layout, arrays = found
    return _loss_function(layout)(hidden, targets.astype(mx.int32), *arrays)


def _rows(layout: HeadLayout, arrays, rows) -> mx.array:
    """float32 rows of the head's weight: `rows` a slice or an int array of vocabulary ids."""
    if not layout.quantized:
        return arrays[0][rows].astype(mx.float32)
    weight, scales = arrays[0][rows], arrays[1][rows].astype(mx.float32)
    biases = arrays[2][rows].astype(mx.float32) if layout.has_biases else None
    return mx.dequantize(
        weight, scales, biases, group_size=layout.group_size, bits=layout.bits, mode=layout.mode
    )


def _cap(layout: HeadLayout, z: mx.array) -> mx.array:
    return z if layout.softcap is None else mx.tanh(z / layout.softcap) * layout.softcap


def _blocks(layout: HeadLayout, vocab: int, positions: int):
    """(vocabulary slice, [position slices]) pairs, vocabulary outermost: each head block is
    de-quantised once and used by every chunk of positions."""
    chunks = [
        slice(start, min(start + layout.position_chunk, positions))
        for start in range(0, positions, layout.position_chunk)
    ]
    for start in range(0, vocab, layout.vocab_block):
        yield slice(start, min(start + layout.vocab_block, vocab)), chunks


@functools.cache
def _loss_function(layout: HeadLayout):
    """The chunked loss as an mx.custom_function for one head layout (cached: a compiled step
    sees the same function object every call)."""

    @mx.custom_function
    def loss(hidden, targets, *arrays):
        h = hidden.astype(mx.float32)  # (N, H)
        picked = _cap(layout, (h * _rows(layout, arrays, targets)).sum(-1))  # (N,)
        block_lse = []  # per vocabulary block: (N,) log-sum-exp of its logits
        previous = h
        for vocab_rows, chunks in _blocks(layout, arrays[0].shape[0], h.shape[0]):
            # Depend on the previous block's result, so MLX cannot de-quantise every block
            # up front and hold them all at once.
            block_arrays = mx.depends(list(arrays), [previous])
            w = _rows(layout, block_arrays, vocab_rows)  # (V_block, H)
            parts = [mx.logsumexp(_cap(layout, h[c] @ w.T), axis=-1) for c in chunks]
            previous = mx.concatenate(parts) if len(parts) > 1 else parts[0]
            block_lse.append(previous)
        lse = mx.logsumexp(mx.stack(block_lse, axis=-1), axis=-1)  # (N,)
        return lse - picked

    @loss.vjp
    def loss_vjp(primals, cotangent, output):
        hidden, targets, *arrays = primals
        h = hidden.astype(mx.float32)
        g = cotangent.astype(mx.float32)  # (N,)
        target_rows = _rows(layout, arrays, targets)  # (N, H)
        picked = (h * target_rows).sum(-1)  # (N,), before the cap
        # lse = output + the target's (capped) logit
        lse = output + _cap(layout, picked)
        # d loss / d h = sum_v softmax_v * dz_v/dh - dz_target/dh, with the cap's derivative
        # 1 - tanh^2 folded into each logit's weight.
        grad = -(g * _cap_slope(layout, picked))[:, None] * target_rows
        for vocab_rows, chunks in _blocks(layout, arrays[0].shape[0], h.shape[0]):
            block_arrays = mx.depends(list(arrays), [grad])
            w = _rows(layout, block_arrays, vocab_rows)  # (V_block, H)
            parts = []
            for c in chunks:
                z = h[c] @ w.T  # (C, V_block)
                p = mx.exp(_cap(layout, z) - lse[c, None]) * g[c, None]
                parts.append((p * _cap_slope(layout, z)) @ w)  # (C, H)
            grad = grad + (mx.concatenate(parts) if len(parts) > 1 else parts[0])
        # The targets are ids and the head is frozen: nothing asks for their gradients.
        rest = [mx.zeros_like(a) for a in arrays]
        return (grad.astype(hidden.dtype), mx.zeros_like(targets), *rest)

    return loss


def _cap_slope(layout: HeadLayout, z: mx.array):
    """d cap(z) / dz: 1 without a cap, 1 - tanh(z / cap)^2 with one."""
    if layout.softcap is None:
        return 1.0
    return 1.0 - mx.square(mx.tanh(z / layout.softcap))
