"""numpy implementations of MIL's shape, slicing, gathering and state operations.

The companion of mil_ops.py (same conventions: one function per op, inputs through OpArgs,
results rounded to their declared dtype by the evaluator).
"""

from __future__ import annotations

import numpy as np

from .mil_ops import registry

TENSOR_OPS = {}
op = registry(TENSOR_OPS)


# -- shapes, slicing and gathering ---------------------------------------------------------


@op()
def reshape(a):
    x, shape = a["x"], a.ints("shape")
    # iOS17: a 0 copies the input dimension at the same distance from the right (1 if none).
    offset = x.ndim - len(shape)
    shape = [
        (x.shape[i + offset] if 0 <= i + offset < x.ndim else 1) if d == 0 else d
        for i, d in enumerate(shape)
    ]
    return np.reshape(x, shape)


@op()
def transpose(a):
    return np.transpose(a["x"], a.ints("perm"))


@op()
def expand_dims(a):
    return np.expand_dims(a["x"], tuple(a.ints("axes")))


@op()
def squeeze(a):
    axes = a.ints("axes")
    return np.squeeze(a["x"], axis=None if axes is None else tuple(axes))


@op()
def concat(a):
    values, axis = a.many("values"), a.scalar("axis")
    if a.get("interleave", False):
        # Interleave: one slice of each input in turn along axis.
        stacked = np.stack(values, axis=axis % values[0].ndim + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@op()
def stack(a):
    return np.stack(a.many("values"), axis=a.scalar("axis"))


@op()
def split(a):
    x, axis = a["x"], a.scalar("axis")
    sizes = a.ints("split_sizes")
    if sizes is None:
        return tuple(np.split(x, a.scalar("num_splits"), axis=axis))
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@op()
def tile(a):
    return np.tile(a["x"], a.ints("reps"))


def _index(a, shape) -> tuple[tuple, list[int]]:
    """slice_by_index / slice_update's begin, end, stride and masks as a numpy index."""
    rank = len(shape)
    begin, end = a.ints("begin"), a.ints("end")
    stride = a.ints("stride", [1] * rank)
    begin_mask = a.ints("begin_mask", [0] * rank)
    end_mask = a.ints("end_mask", [0] * rank)
    squeeze_mask = a.ints("squeeze_mask", [0] * rank)
    index, squeezed = [], []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(slice(begin[i], begin[i] + 1 if begin[i] != -1 else None))
            squeezed.append(i)
            continue
        index.append(
            slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i])
        )
    return tuple(index), squeezed


@op()
def slice_by_index(a):
    x = a["x"]
    index, squeezed = _index(a, x.shape)
    return np.squeeze(x[index], axis=tuple(squeezed))


@op()
def slice_by_size(a):
    x, begin, size = a["x"], a.ints("begin"), a.ints("size")
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))]


@op()
def slice_update(a):
    x = a["x"].copy()
    index, _ = _index(a, x.shape)
    target_shape = x[index].shape
    update = a["update"]
    if update.size != int(np.prod(target_shape)):
        raise ValueError(f"update of shape {update.shape} for a slice of shape {target_shape}")
    x[index] = np.reshape(update, target_shape)
    return x


@op()
def gather(a):
    x, indices = a["x"], a["indices"].astype(np.int64)
    axis, batch_dims = a.scalar("axis", 0), a.scalar("batch_dims", 0)
    if batch_dims:
        raise ValueError("gather with batch_dims > 0 is not supported")
    if (indices >= x.shape[axis]).any() or (indices < -x.shape[axis]).any():
        raise ValueError(f"gather index out of range for axis {axis} of size {x.shape[axis]}")
    return np.take(x, indices, axis=axis)


@op()
def gather_along_axis(a):
    return np.take_along_axis(a["x"], a["indices"].astype(np.int64), axis=a.scalar("axis", 0))


@op()
def band_part(a):
    x = a["x"]
    lower, upper = a.scalar("lower", -1), a.scalar("upper", -1)
    rows = np.arange(x.shape[-2])[:, None]
    cols = np.arange(x.shape[-1])[None, :]
    keep = np.ones(rows.shape[:1] + cols.shape[1:], bool)
    if lower >= 0:
        keep &= rows - cols <= lower
    if upper >= 0:
        keep &= cols - rows <= upper
    return np.where(keep, x, 0)


@op()
def pad(a):
    x, pads = a["x"], a.ints("pad")
    widths = [(0, 0)] * (x.ndim - len(pads) // 2) + list(zip(pads[::2], pads[1::2]))
    mode = a.get("mode", "constant")
    if mode != "constant":
        return np.pad(x, widths, mode={"replicate": "edge"}.get(mode, mode))
    return np.pad(x, widths, constant_values=a.scalar("constant_val", 0.0))


@op()
def range_1d(a):
    return np.arange(a.scalar("start"), a.scalar("end"), a.scalar("step"))


@op()
def fill(a):
    return np.full(a.ints("shape"), a.scalar("value", 0.0))


@op()
def fill_like(a):
    return np.full(a["ref_tensor"].shape, a.scalar("value", 0.0))


@op()
def shape(a):
    return np.array(a["x"].shape, np.int32)


# -- states --------------------------------------------------------------------------------


@op()
def read_state(a):
    return a.raw("input").read()


@op()
def write_state(a):
    # The saved form of coreml_update_state: no output, the state takes the value.
    a.raw("input").write(np.asarray(a.raw("data")))
    return ()


@op()
def coreml_update_state(a):
    ref = a.raw("state")
    ref.write(np.asarray(a.raw("value")))
    return ref.read()
