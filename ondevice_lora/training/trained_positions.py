"""Logits only where the loss needs them: the output head at the trained positions alone.

A batch's loss reads the logits of its trained positions only (the assistant's tokens, not the
prompt or the padding), yet model(inputs) projects every position onto the whole vocabulary.
For a small model that projection and the softmax over it are a large share of the step (a
768 x 8192 head is 8% of an 88M model's FLOPs, and its logits a large share of the activation
memory). Gathering the trained positions' hidden states first and projecting only those gives
the same loss and gradients, up to float32 summation order, with that share cut to the
trained fraction. Used on CPU only (see `enabled`): the Metal path stays as it is.
"""

from __future__ import annotations

import inspect

import mlx.core as mx
import numpy as np

from .chunked_loss import head_cross_entropy

# The number of positions is rounded up to a multiple of 1/SIZES_PER_SHAPE of the batch, so a
# batch shape gives at most this many distinct sizes: each new one makes the compiled step
# trace and compile again (seconds for a 100M model), which finer rounding would do every step.
SIZES_PER_SHAPE = 8
KEYWORD = "loss_positions"


def trained_positions(loss_mask) -> mx.array:
    """Flat indices (K,) of the nonzero entries of a (B, W) loss mask, padded with B * W (one
    past the end, meaning "no position") up to a multiple of B * W / SIZES_PER_SHAPE. Runs on
    the host: the mask is data the batch iterator has just made."""
    mask = np.asarray(loss_mask).reshape(-1)
    found = np.flatnonzero(mask)
    step = -(-mask.size // SIZES_PER_SHAPE)
    size = max(1, -(-found.size // step)) * step
    positions = np.full(size, mask.size, dtype=np.int32)
    positions[: found.size] = found
    return mx.array(positions)


def enabled(loss_fn) -> bool:
    """True when `loss_fn` takes loss_positions and MLX computes on the CPU."""
    try:
        takes = KEYWORD in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False
    return takes and mx.default_device() == mx.cpu


def positions_for(loss_fn):
    """batch -> the keyword arguments of loss_fn(model, *batch, **kwargs): {"loss_positions":
    ...} when enabled, else {}. Whether it is enabled is decided here, once per loop. batch
    follows loss_fn's arguments, so batch[2] is the loss mask."""
    if not enabled(loss_fn):
        return lambda batch: {}
    return lambda batch: {KEYWORD: trained_positions(batch[2])}


def cross_entropy_at(
    model,
    inputs: mx.array,
    targets: mx.array,
    loss_mask: mx.array,
    positions: mx.array,
    position_ids: mx.array | None = None,
    segment_ids: mx.array | None = None,
):
    """(mean cross-entropy over the trained tokens, trained tokens), with logits computed only
    at `positions` (from trained_positions). Same arguments as masked_cross_entropy."""
    B, W = inputs.shape
    hidden = model.model(inputs, None, None, position_ids, segment_ids)  # (B, W, hidden)
    # Padding entries (== B * W) read the last position and are weighted 0 below.
    index = mx.minimum(positions, B * W - 1)  # (K,)
    picked = hidden.reshape(B * W, -1)[index]  # (K, hidden)
    ce = head_cross_entropy(model, picked, targets.reshape(-1)[index])  # (K,)
    mask = loss_mask.astype(mx.float32)
    weight = mx.where(positions < B * W, mask.reshape(-1)[index], 0.0)
    ntoks = mask.sum()
    return (ce * weight).sum() / mx.maximum(ntoks, 1.0), ntoks
