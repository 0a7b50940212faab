"""Training data: datasets in the formats people have, tokenised with per-token loss masks.

    config = DataConfig("my_chats.jsonl", max_length=1024)
    splits = load_datasets(config, tokenizer)          # train, valid (seeded split), test
    print(splits.train.stats.summary())
    for inputs, targets, loss_mask in iterate_batches(splits.train, 4, config.max_length):
        ...
    for batch in iterate_packed_batches(splits.train, 4, config.max_length):
        ...   # PackedBatch: several examples per row, plus position_ids and segment_ids

Every example is {"input_ids": list[int], "loss_mask": list[int]} of equal length, 1 where the
token is a prediction target. Bad input raises DatasetError naming the file and line.
"""

from .batching import Batch, BatchIterator, iterate_batches
from .chat import assistant_spans, encode_chat
from .config import LOSS_ON, OVERLONG, DataConfig
from .errors import DatasetError
from .examples import DatasetStats
from .loading import Dataset, DataSplits, load_dataset, load_datasets
from .packing import (
    BATCHING,
    PackedBatch,
    PackedBatchIterator,
    iterate_packed_batches,
    pack_examples,
)
from .records import CHAT_ROLES

__all__ = [
    "BATCHING",
    "CHAT_ROLES",
    "LOSS_ON",
    "OVERLONG",
    "Batch",
    "PackedBatch",
    "PackedBatchIterator",
    "BatchIterator",
    "DataConfig",
    "DataSplits",
    "Dataset",
    "DatasetError",
    "DatasetStats",
    "assistant_spans",
    "encode_chat",
    "iterate_batches",
    "iterate_packed_batches",
    "load_dataset",
    "load_datasets",
    "pack_examples",
]
