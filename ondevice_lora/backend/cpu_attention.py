"""Causal attention that skips the masked-out half of the score matrix, for MLX on CPU.

On CPU, mx.fast.scaled_dot_product_attention computes the full (L, L) score matrix of every
head, then masks half of it away. Its cost is dominated not by the two matmuls but by the
element-wise work on that matrix (the mask, the softmax's exp, and their backward), which MLX's
CPU backend does one element at a time. Splitting the queries into blocks, each block only
needs the keys up to its own end: with 4 blocks, 10/16 of the matrix is computed instead of
all of it. Masked entries contribute exactly zero to the softmax either way, so the result is
the same up to float32 rounding. On Metal (a fused kernel) and for short sequences, MLX's own
kernel is used unchanged.
"""

from __future__ import annotations

import mlx.core as mx

# Below this many positions the per-block overhead eats the saving.
MIN_LENGTH = 128
# Query block length; blocks are at least this long so each matmul stays BLAS-sized.
BLOCK = 64


def scaled_dot_product_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask
) -> mx.array:
    """mx.fast.scaled_dot_product_attention, computed block by block on CPU for long inputs.

    queries (B, n_heads, L, D), keys and values (B, n_kv_heads, L_kv, D), mask: "causal",
    None, or an additive array broadcastable to (B, n_heads, L, L_kv). The block path is taken
    only when it is exact: the CPU, no cache (L == L_kv), and a causal mask ("causal", or an
    array, which in training is causal: padding or packed segments on top of causality).
    """
    L, L_kv = queries.shape[2], keys.shape[2]
    if mx.default_device() != mx.cpu or mask is None or L != L_kv or L < MIN_LENGTH:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    outputs = []
    for start in range(0, L, BLOCK):
        end = min(start + BLOCK, L)
        # Queries start..end-1 may only see keys 0..end-1: the rest of the row is masked.
        if isinstance(mask, str):
            block_mask = _causal_block(start, end, queries.dtype)
        else:
            block_mask = mask[..., start:end, :end]
        outputs.append(
            mx.fast.scaled_dot_product_attention(
                queries[:, :, start:end],
                keys[:, :, :end],
                values[:, :, :end],
                scale=scale,
                mask=block_mask,
            )
        )
    return mx.concatenate(outputs, axis=2)


def _causal_block(start: int, end: int, dtype: mx.Dtype) -> mx.array:
    """The additive causal mask (end - start, end) of queries start..end-1 over keys 0..end-1."""
    query = mx.arange(start, end)[:, None]
    key = mx.arange(end)[None]
    return mx.where(key <= query, mx.array(0, dtype), mx.array(mx.finfo(dtype).min, dtype))
