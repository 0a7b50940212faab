"""train_from_config: load the base model and the data a TrainConfig names, then train."""

from __future__ import annotations

from rich.console import Console

from ..data.loading import load_datasets
from ..data.preference import load_preference_datasets
from ..loading import load
from .config import TrainConfig
from .offline import offline
from .trainer import TrainResult, train


def train_from_config(config: TrainConfig, callbacks=(), show_progress: bool = True) -> TrainResult:
    """Train an adapter as `config` says: the Python API of `ondevice-lora train`.

    Loading happens under the offline guard too: a Hub id is answered from the local cache
    only, so nothing about the run reaches the network.
    """
    config.validate()
    console = Console(stderr=True, quiet=not show_progress)
    with offline(config.offline_guard):
        model, tokenizer = load(config.model)
        if config.method == "sft":
            splits = load_datasets(config.data_config(), tokenizer)
        else:  # dpo, orpo: chosen/rejected pairs
            splits = load_preference_datasets(config.data_config(), tokenizer)
        console.print(f"train: {splits.train.stats.summary()}")
        if splits.valid is not None:
            console.print(f"valid: {splits.valid.stats.summary()}")
        return train(
            model, tokenizer, splits.train, splits.valid, config, callbacks,
            show_progress=show_progress,
        )  # fmt: skip
