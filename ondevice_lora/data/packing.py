"""Sequence packing: several examples per row, each attending only to itself.

A bucketed batch (batching.py) pads every example to the longest of its batch; a packed row
holds examples back to back up to max_length - 1 positions, so almost no slot is padding and
nearly every batch has the same shape (few compiled graphs). Each example keeps exactly what it has in
a batch of its own: its positions restart at 0 (position_ids) and a block-diagonal causal mask
(segment_ids) hides the other examples of its row, so its loss and gradient are unchanged.

Rows are made by best-fit decreasing bin packing, with ties between equal lengths broken by a
seeded shuffle; rows are then shuffled into batches. Like bucketed batching, the order of an
epoch is a pure function of (seed, epoch, example lengths), so a saved position
{"epoch": e, "index": i} resumes exactly.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .batching import BatchIterator, iterate_batches


class PackedBatch(NamedTuple):
    """Rows of packed examples; all fields (B, W), W <= max_length - 1.

    inputs, targets: int32, targets[b, t] the token after inputs[b, t] within its example.
    loss_mask: float32, 1 where targets[b, t] is trained. position_ids: int32, each example's
    positions from 0. segment_ids: int32, 1, 2, ... for the examples of a row, 0 for padding.
    """

    inputs: mx.array
    targets: mx.array
    loss_mask: mx.array
    position_ids: mx.array
    segment_ids: mx.array


def pack_examples(
    examples, max_length: int, seed: int = 0, epoch: int = 0, shuffle: bool = True
) -> list[list[int]]:
    """Group example indices into rows of at most max_length - 1 (input, target) positions.

    An example of n tokens fills n - 1 positions (its inputs are ids[:-1], its targets
    ids[1:]), which is why a row of max_length - 1 positions holds what a bucketed batch of
    max_length tokens holds. Best-fit decreasing: longest examples first, each into the open
    row it leaves least room in. shuffle: equal lengths and the rows themselves are ordered by
    a generator seeded with (seed, epoch); False: a fixed packing (for evaluation).
    """
    sizes = np.array([len(x["input_ids"]) - 1 for x in examples])
    capacity = max_length - 1
    if sizes.size and (sizes.max() > capacity or sizes.min() < 1):
        raise ValueError(f"examples must hold 2 to max_length={max_length} tokens")
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    order = rng.permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    # Longest first; the stable sort keeps the shuffled order among equal lengths.
    order = order[np.argsort(-sizes[order], kind="stable")]
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # sorted (room left, row number)
    for i in order.tolist():
        size = int(sizes[i])
        k = bisect.bisect_left(open_rows, (size, -1))  # the tightest row it fits in
        if k == len(open_rows):
            rows.append([i])
            room, row = capacity - size, len(rows) - 1
        else:
            room, row = open_rows.pop(k)
            rows[row].append(i)
            room -= size
        if room > 0:
            bisect.insort(open_rows, (room, row))
    if shuffle:
        # Otherwise rows would go from the longest examples to the shortest.
        rows = [rows[j] for j in rng.permutation(len(rows))]
    return rows


class PackedBatchIterator(BatchIterator):
    """PackedBatch batches of `batch_size` rows, each row up to max_length - 1 positions.

    The arguments are BatchIterator's (a drop-in replacement), except that batch_size counts
    rows, each holding as many examples as fit, so a packed step trains more tokens than a
    bucketed one of the same batch_size. The iterator's `.state` is the position of the next
    batch, accepted back as epoch= and index=.
    """

    def __len__(self) -> int:
        """Batches in the current epoch (packing decides how many rows an epoch has)."""
        return len(self.epoch_batches(self.epoch))

    def epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        """Rows (lists of example indices) of every batch of `epoch`, in order."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        rows = pack_examples(self.examples, self.max_length, self.seed, epoch, self.shuffle)
        size = self.batch_size
        batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        if self.drop_last and len(batches[-1]) < size:
            batches.pop()
        if not batches:
            raise ValueError(
                f"{len(self.examples)} examples pack into {len(rows)} rows: no full batch of "
                f"{size} rows; lower batch_size or set drop_last=False"
            )
        self._order = (epoch, batches)
        return batches

    def make_batch(self, rows: list[list[int]]) -> PackedBatch:
        return self.collate_rows([[self.examples[i] for i in row] for row in rows])

    def collate_rows(self, rows: list[list[dict]]) -> PackedBatch:
        """Lay out rows of examples (each a list of examples) as one PackedBatch."""
        used = max(sum(len(x["input_ids"]) - 1 for x in row) for row in rows)
        width = min(-(-used // self.pad_multiple) * self.pad_multiple, self.max_length - 1)
        shape = (len(rows), width)
        inputs = np.full(shape, self.pad_id, dtype=np.int32)
        targets = np.full(shape, self.pad_id, dtype=np.int32)
        loss_mask = np.zeros(shape, dtype=np.float32)
        positions = np.zeros(shape, dtype=np.int32)
        segments = np.zeros(shape, dtype=np.int32)
        for r, row in enumerate(rows):
            start = 0
            for segment, x in enumerate(row, start=1):
                ids = x["input_ids"]
                end = start + len(ids) - 1
                # The shift is per example, so no example predicts the next one's first token.
                inputs[r, start:end] = ids[:-1]
                targets[r, start:end] = ids[1:]
                loss_mask[r, start:end] = x["loss_mask"][1:]
                positions[r, start:end] = np.arange(end - start)
                segments[r, start:end] = segment
                start = end
        return PackedBatch(
            *(mx.array(a) for a in (inputs, targets, loss_mask, positions, segments))
        )


iterate_packed_batches = PackedBatchIterator


# TrainConfig.batching -> batch iterator.
BATCHING = {"packed": iterate_packed_batches, "bucketed": iterate_batches}
