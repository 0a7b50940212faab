"""The quickstart's training, answering and export settings: full, and reduced for CI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..training import TrainConfig


@dataclass(frozen=True)
class QuickstartSettings:
    """How hard the quickstart trains, and how much it asks and exports.

    The full settings were chosen by measurement on 2 CPU cores (see examples/README.md):
    enough steps for the adapter to state the test facts, few enough to finish in minutes.
    """

    steps: int
    batch_size: int
    max_length: int  # every example of the dataset fits: none is cut
    rank: int
    alpha: float
    num_layers: int  # only the last layers get adapters: the layers below need no backward
    target_modules: list[str] | str
    learning_rate: float
    warmup_steps: int
    answer_tokens: int  # the right answers are short; the base's wrong ones are cut here
    context_length: int  # of the Core ML export
    prefill_length: int
    # Prompt tokens the package is checked on (None: the whole prompt). The check evaluates the
    # package op by op in numpy, seconds per call: one prefill chunk keeps it to a minute.
    validation_tokens: int | None

    def train_config(self, data: Path, adapter_path: Path, steps: int | None) -> TrainConfig:
        return TrainConfig(
            data=str(data),
            adapter_path=str(adapter_path),
            iters=steps if steps is not None else self.steps,
            batch_size=self.batch_size,
            max_length=self.max_length,
            rank=self.rank,
            alpha=self.alpha,
            num_layers=self.num_layers,
            target_modules=self.target_modules,
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            # Validation loss before the first step and after the last: the two numbers shown.
            eval_every=0,
            eval_batches=-1,
            save_every=0,
            keep_best=False,  # the adapter is the last step's, the one the answers come from
            # One chat per row, padded to the longest of its batch: these chats are all of
            # about the same length, so there is little padding to save by packing them.
            batching="bucketed",
        )


# Measured on 2 CPU cores (test facts stated after training, of 5): 42 steps at 1e-3 -> 5;
# 36 -> 4; 32 at 1.2e-3 -> 3; 24 at 2e-3 -> 1 (the validation loss was low in every run: it is
# the differently worded test questions that need the extra passes). About 3 passes over the
# 114 training chats; each step costs ~3.7 CPU-seconds there (OpenBLAS, 4-bit base de-quantised
# per matmul), so training takes ~160 CPU-seconds.
FULL = QuickstartSettings(
    steps=42,
    batch_size=8,
    max_length=96,
    rank=16,
    alpha=32.0,
    num_layers=8,
    target_modules="all-linear",
    learning_rate=1e-3,
    warmup_steps=3,
    answer_tokens=16,
    context_length=256,
    prefill_length=32,
    validation_tokens=32,  # one prefill call per function pair, then the decode steps
)
# For CI: every stage runs, on a few steps, short answers and a small Core ML context.
QUICK = QuickstartSettings(
    steps=3,
    batch_size=4,
    max_length=96,
    rank=4,
    alpha=8.0,
    num_layers=2,
    target_modules=["q_proj", "v_proj"],
    learning_rate=3e-3,
    warmup_steps=0,
    answer_tokens=8,
    context_length=64,
    prefill_length=16,
    validation_tokens=16,  # one prefill call, then the decode steps
)
