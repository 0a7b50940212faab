"""The loss, the compiled training step and gradient checkpointing.

The step is compiled once over explicit state (the model's parameters, the optimiser's state and
MLX's random state), so each call runs as one fused graph and writes its results back into that
state; the trainer then calls mx.eval once per step.
"""

from __future__ import annotations

import contextlib
import hashlib
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .chunked_loss import head_cross_entropy
from .distributed import all_sum
from .trained_positions import cross_entropy_at, positions_for


def masked_cross_entropy(
    model,
    inputs: mx.array,
    targets: mx.array,
    loss_mask: mx.array,
    position_ids: mx.array | None = None,
    segment_ids: mx.array | None = None,
    loss_positions: mx.array | None = None,
):
    """Mean cross-entropy over the trained tokens, and how many there were.

    inputs, targets: int32 (B, W), targets[b, t] being the token after inputs[b, t];
    loss_mask: (B, W), 1 where targets[b, t] is trained. position_ids, segment_ids: (B, W),
    given for packed batches (data.PackedBatch). loss_positions: the trained positions
    (trained_positions.trained_positions); with them only those get logits: the same loss
    with less work. Logits are never held whole: see chunked_loss. Returns (loss, trained
    tokens).
    """
    if loss_positions is not None:
        return cross_entropy_at(
            model, inputs, targets, loss_mask, loss_positions, position_ids, segment_ids
        )
    B, W = inputs.shape
    hidden = model.model(inputs, None, None, position_ids, segment_ids)  # (B, W, hidden)
    # The head and the loss go block by block: no (B, W, vocab) logits (chunked_loss.py).
    ce = head_cross_entropy(model, hidden.reshape(B * W, -1), targets.reshape(-1))
    ce = ce.reshape(B, W)
    mask = loss_mask.astype(mx.float32)
    ntoks = mask.sum()
    return (ce * mask).sum() / mx.maximum(ntoks, 1.0), ntoks


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """The random seed of one micro-batch: a pure function of (seed, step, micro).

    Dropout draws from MLX's global random state; seeding it like this before every micro-batch
    makes a resumed run draw exactly what an uninterrupted one would, with no RNG stream to save.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_step(model: nn.Module, optimizer, loss_fn=masked_cross_entropy, group=None):
    """A compiled step(batch, carry, apply) -> (loss, ntoks, carry).

    batch: a tuple of arrays, loss_fn's arguments after the model: (inputs, targets,
    loss_mask) from bucketed batching, plus (position_ids, segment_ids) from packing.

    Gradient accumulation weights every micro-batch by its trained tokens, so the update is the
    gradient of the mean loss over all trained tokens of the step, however they fall into
    batches. carry: None, or what the previous micro-batch of this step returned. apply: True
    on the last micro-batch: the optimiser updates the model and carry comes back None; the
    loss returned is then the step's mean. Otherwise the loss returned is a running token sum.
    group: a distributed group (distributed.init_group); on the last micro-batch the gradient,
    loss and token sums are summed over its ranks, so each rank divides by the global count.
    """
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled_step(batch, extra, carry, apply):
        (loss, ntoks), grads = loss_and_grad(model, *batch, **extra)
        # Gradient and loss of the token *sum*, so micro-batches add up by their token counts.
        grads = tree_map(lambda g: g * ntoks, grads)
        loss_sum = loss * ntoks
        if carry is not None:
            prev_grads, prev_loss, prev_ntoks = carry
            grads = tree_map(mx.add, grads, prev_grads)
            loss_sum, ntoks = loss_sum + prev_loss, ntoks + prev_ntoks
        if not apply:
            return loss_sum, ntoks, (grads, loss_sum, ntoks)
        if group is not None:
            grads, loss_sum, ntoks = all_sum((grads, loss_sum, ntoks), group)
        denominator = mx.maximum(ntoks, 1.0)
        optimizer.update(model, tree_map(lambda g: g / denominator, grads))
        return loss_sum / denominator, ntoks, None

    # On CPU the trained positions are found on the host (a data-dependent shape, which a
    # compiled graph cannot compute) and passed in: see trained_positions.py.
    positions = positions_for(loss_fn)

    def step(batch, carry, apply):
        return compiled_step(batch, positions(batch), carry, apply)

    return step


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True):
    """Recompute each decoder layer's activations during backward instead of storing them.

    Each layer object gets a one-off subclass whose __call__ runs through mx.checkpoint; the
    model's parameter names do not change (no wrapper module), other models of the same class
    are untouched, and the original classes come back on exit.
    """
    if not enabled:
        yield
        return
    originals = []
    for layer in model.layers:
        cls = type(layer)
        originals.append((layer, cls))
        layer.__class__ = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": _checkpointed})
    try:
        yield
    finally:
        for layer, cls in originals:
            layer.__class__ = cls


def _checkpointed(self, *args, **kwargs):
    call = type(self).__mro__[1].__call__

    def inner(params, *args, **kwargs):
        # The trainable parameters enter as arguments so mx.checkpoint differentiates them.
        self.update(params)
        return call(self, *args, **kwargs)

    return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)
