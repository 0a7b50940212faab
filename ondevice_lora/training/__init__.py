"""Training LoRA adapters: the loop, checkpoints, schedules, evaluation and the offline guard.

Python API:
    train_from_config(TrainConfig(...))   load model and data, train, save the adapter
    train(model, tokenizer, train_examples, valid_examples, config)   the loop itself
    evaluate_from_config(EvalConfig(...))  loss and perplexity with and without an adapter
"""

from .api import train_from_config
from .checkpoint import TrainState, latest_checkpoint, load_checkpoint
from .config import ConfigError, TrainConfig
from .evaluate import EvalConfig, EvalResult, evaluate_from_config, evaluate_loss, perplexity
from .memory import MemoryEstimate, estimate_memory, memory_limits
from .offline import NetworkBlockedError, offline
from .step import masked_cross_entropy
from .trainer import TrainingCallback, TrainResult, train

__all__ = [
    "ConfigError",
    "EvalConfig",
    "EvalResult",
    "MemoryEstimate",
    "NetworkBlockedError",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingCallback",
    "evaluate_from_config",
    "estimate_memory",
    "evaluate_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "masked_cross_entropy",
    "memory_limits",
    "offline",
    "perplexity",
    "train",
    "train_from_config",
]
