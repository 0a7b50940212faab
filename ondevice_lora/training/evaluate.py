"""Loss and perplexity on a dataset, with and without an adapter.

`evaluate_loss` is what the trainer validates with; `evaluate_from_config` is `ondevice-lora
eval`: it loads the base, measures it, puts the adapter on and measures again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..data.config import DataConfig
from ..data.loading import SPLIT_FILES, load_dataset
from ..data.packing import BATCHING
from ..errors import OndeviceLoraError
from .offline import offline
from .step import masked_cross_entropy
from .trained_positions import positions_for


def evaluate_loss(
    model,
    examples,
    batch_size: int,
    max_length: int,
    num_batches: int = -1,
    pad_id: int = 0,
    loss_fn=masked_cross_entropy,
    batching: str = "bucketed",
) -> tuple[float, int]:
    """(mean loss per trained token, trained tokens) over the first `num_batches` batches.

    Batches come in a fixed order (not shuffled), so every evaluation of a run sees the same
    tokens and the losses are comparable. num_batches -1: all of them. batching: "bucketed"
    (padded batches sorted by length) or "packed" (rows of several examples); over all
    batches both give the same loss, while the first N batches hold different examples.
    The model is put in eval mode (no dropout) and back in its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    total, ntoks = mx.array(0.0), mx.array(0.0)
    batches = BATCHING[batching](examples, batch_size, max_length, shuffle=False, pad_id=pad_id)
    positions = positions_for(loss_fn)
    try:
        for i, batch in enumerate(batches):
            if num_batches != -1 and i >= num_batches:
                break
            loss, n = loss_fn(model, *batch, **positions(batch))
            total, ntoks = total + loss * n, ntoks + n
            mx.eval(total, ntoks)
    finally:
        model.train(was_training)
    count = int(ntoks.item())
    return (total.item() / count if count else float("nan")), count


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@dataclass
class EvalConfig:
    """`ondevice-lora eval`: which model, adapter and data, and how to batch them.

    data: a .jsonl file or notes folder (evaluated whole), or a folder with test.jsonl.
    adapter_path: None measures the base alone.
    """

    model: str | None = None
    adapter_path: str | None = None
    data: str | None = None
    batch_size: int = 4
    max_length: int = 2048
    num_batches: int = -1
    loss_on: str = "assistant"
    offline_guard: bool = True

    def validate(self) -> EvalConfig:
        """Raise one OndeviceLoraError listing every invalid setting."""
        problems = []
        if self.data is None:
            problems.append("data is required: a .jsonl file, notes, or a folder with test.jsonl")
        if not (_int(self.batch_size) and self.batch_size >= 1):
            problems.append(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not (_int(self.num_batches) and (self.num_batches >= 1 or self.num_batches == -1)):
            problems.append(f"num_batches must be >= 1 or -1 (all), got {self.num_batches!r}")
        try:
            DataConfig(path=self.data or ".", max_length=self.max_length, loss_on=self.loss_on)
        except OndeviceLoraError as e:
            problems += [line.strip().removeprefix("- ") for line in str(e).splitlines()[1:]]
        if problems:
            raise OndeviceLoraError("invalid eval settings:\n  - " + "\n  - ".join(problems))
        return self


@dataclass
class EvalResult:
    """Loss (per trained token) and perplexity of the base and, if given, with the adapter."""

    data: str
    examples: int
    tokens: int
    base_loss: float
    base_perplexity: float
    adapter_loss: float | None = None
    adapter_perplexity: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"{self.data}: {self.examples} examples, {self.tokens} trained tokens"]
        lines.append(
            f"base:         loss {self.base_loss:.4f}  perplexity {self.base_perplexity:.3f}"
        )
        if self.adapter_loss is not None:
            lines.append(
                f"with adapter: loss {self.adapter_loss:.4f}  "
                f"perplexity {self.adapter_perplexity:.3f}"
            )
        return "\n".join(lines)


def evaluation_data_path(data) -> Path:
    """The file or folder to evaluate: test.jsonl inside a split folder, else `data` itself."""
    path = Path(data).expanduser()
    if path.is_dir() and (path / SPLIT_FILES["train"]).is_file():
        test = path / SPLIT_FILES["test"]
        if not test.is_file():
            raise OndeviceLoraError(
                f"{path} has train.jsonl but no {SPLIT_FILES['test']}; add a test set or pass "
                "the .jsonl file to evaluate."
            )
        return test
    return path


def evaluate_from_config(config: EvalConfig) -> EvalResult:
    """Load the base model, measure loss and perplexity on the data, then with the adapter."""
    from ..adapters.files import base_fingerprint, load_adapter
    from ..backend.cpu_matmul import dequantized_matmuls
    from ..loading import load

    config.validate()
    with offline(config.offline_guard):
        model, tokenizer = load(config.model)
        path = evaluation_data_path(config.data)
        data_config = DataConfig(path=path, max_length=config.max_length, loss_on=config.loss_on)
        dataset = load_dataset(path, tokenizer, data_config)
        pad = tokenizer.pad_token_id or 0

        def measure():
            # Linux CPU with a fast BLAS: quantised layers de-quantise before large matmuls.
            with dequantized_matmuls(model):
                return evaluate_loss(
                    model, dataset, config.batch_size, config.max_length, config.num_batches, pad
                )

        base_loss, tokens = measure()
        result = EvalResult(
            str(path), len(dataset), tokens, base_loss, perplexity(base_loss)
        )  # fmt: skip
        if config.adapter_path is not None:
            load_adapter(model, config.adapter_path, base_fingerprint(model, tokenizer))
            result.adapter_loss, _ = measure()
            result.adapter_perplexity = perplexity(result.adapter_loss)
    return result


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
