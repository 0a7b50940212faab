"""Batches for training and evaluation: right-padded, length-bucketed, resumable.

The order of an epoch is a pure function of (seed, epoch, example lengths), so a run resumed
from a saved position {"epoch": e, "index": i} sees exactly the batches the interrupted run
would have seen next.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

# Examples are sorted by length within windows of this many batches: batches hold examples of
# similar length (little padding) while the windows themselves are drawn at random.
SORT_WINDOW_BATCHES = 16


class Batch(NamedTuple):
    """inputs and targets: int32 (B, W); loss_mask: float32 (B, W), 1 where targets[b, t] is
    trained. targets[b, t] = input_ids[t + 1] (the next token), so W = longest example - 1,
    rounded up to pad_multiple. Padding is on the right and carries no loss."""

    inputs: mx.array
    targets: mx.array
    loss_mask: mx.array


class BatchIterator:
    """Batches (inputs, targets, loss_mask) of mx arrays over a list of examples (iterate_batches).

    examples: dicts with input_ids and loss_mask (a Dataset works), each 2..max_length long.
    shuffle: a new seeded order each epoch, examples of similar length batched together;
        False: the same batches every time, ordered by length (for evaluation).
    epoch, index: where to start (a saved BatchIterator.state); repeat: go on to the next
        epoch instead of stopping at the end of this one. drop_last: skip the last, smaller
        batch (keeps one batch shape). pad_id: the token id written into padding (it carries
        no loss, so any valid id works). pad_multiple: widths are rounded up to a multiple of it.
    `state` is the position of the next batch, accepted back as epoch= and index=.
    """

    def __init__(
        self,
        examples,
        batch_size: int,
        max_length: int,
        seed: int = 0,
        shuffle: bool = True,
        epoch: int = 0,
        index: int = 0,
        repeat: bool = False,
        drop_last: bool = False,
        pad_id: int = 0,
        pad_multiple: int = 8,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(examples) == 0:
            raise ValueError("no examples to batch")
        if drop_last and len(examples) < batch_size:
            raise ValueError(
                f"{len(examples)} examples make no full batch of {batch_size}: lower batch_size "
                "or add examples"
            )
        self.examples = examples
        self.lengths = np.array([len(x["input_ids"]) for x in examples])
        too_long = int(self.lengths.max())
        if too_long > max_length or self.lengths.min() < 2:
            raise ValueError(
                f"examples must hold 2 to max_length={max_length} tokens (found "
                f"{too_long if too_long > max_length else int(self.lengths.min())}): load the data "
                "with the same max_length"
            )
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.shuffle, self.repeat, self.drop_last = shuffle, repeat, drop_last
        self.pad_id, self.pad_multiple = pad_id, max(1, pad_multiple)
        self.epoch, self.index = epoch, index
        self._order: tuple[int, list] | None = None  # (epoch, batches) of the current epoch

    @property
    def state(self) -> dict:
        """Position of the next batch: {"epoch": e, "index": i} (JSON-serialisable). Pass it as
        iterate_batches(..., **state) to continue from here."""
        return {"epoch": self.epoch, "index": self.index}

    def __len__(self) -> int:
        """Batches in one epoch."""
        full, rest = divmod(len(self.examples), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Example indices of every batch of `epoch`, in the order they are yielded."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        n, size = len(self.examples), self.batch_size
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            window = size * SORT_WINDOW_BATCHES
            # Sort by padded width, not exact length: examples of one width cost the same
            # padding, and the stable sort keeps them in random order, so batches are made up
            # differently every epoch even when the whole dataset fits in one window.
            widths = -(-(self.lengths - 1) // self.pad_multiple)
            order = np.concatenate(
                [
                    chunk[np.argsort(widths[chunk], kind="stable")]
                    for chunk in np.split(order, range(window, n, window))
                ]
            )
        else:
            # Evaluation: the same batches every time, sorted by length for the least padding.
            order = np.argsort(self.lengths, kind="stable")
        batches = [order[i : i + size].tolist() for i in range(0, n, size)]
        if self.drop_last and len(batches[-1]) < size:
            batches.pop()
        if self.shuffle:
            # Otherwise the lengths would rise through each window, batch after batch.
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._order = (epoch, batches)
        return batches

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.index >= len(self):
            if not self.repeat:
                raise StopIteration
            self.epoch, self.index = self.epoch + 1, 0
        entries = self.epoch_batches(self.epoch)[self.index]
        self.index += 1
        return self.make_batch(entries)

    def make_batch(self, indices: list[int]):
        """The batch of one entry of epoch_batches (here: example indices)."""
        return self.collate([self.examples[i] for i in indices])

    def collate(self, examples: list[dict]) -> Batch:
        """Right-pad examples into one Batch (inputs, next-token targets, loss mask)."""
        longest = max(len(x["input_ids"]) for x in examples) - 1
        # Rounding widths up means fewer distinct shapes, so the compiled step retraces less.
        width = min(-(-longest // self.pad_multiple) * self.pad_multiple, self.max_length - 1)
        ids = np.full((len(examples), width + 1), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(examples), width + 1), dtype=np.float32)
        for row, x in enumerate(examples):
            n = len(x["input_ids"])
            ids[row, :n] = x["input_ids"]
            mask[row, :n] = x["loss_mask"]
        # (B, W + 1) -> inputs (B, W) and targets (B, W): position t predicts token t + 1.
        return Batch(mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.array(mask[:, 1:]))


# The function-style name callers use: the iterator is built by its constructor.
iterate_batches = BatchIterator
