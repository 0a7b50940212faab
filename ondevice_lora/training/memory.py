"""How much memory a training run needs, estimated before it starts; MLX's memory limits.

    estimate = estimate_memory(model, lora_config, batch_size=4, max_length=1024,
                               grad_checkpoint=False)
    print(estimate.table())

The estimate adds up what is alive at the peak of a step, which is in the backward pass:

- weights: the frozen base as stored (4-bit codes, scales and biases are counted as they are);
- adapter, optimizer state (Adam/AdamW: two moments per adapter value), gradients (one per
  adapter value, two with gradient accumulation: the running sum and the new one);
- activations: what the forward pass keeps for the backward pass in every decoder layer, plus
  the temporaries of the layer being differentiated. With gradient checkpointing only each
  layer's input is kept, and one layer at a time is recomputed;
- loss: the output head and the cross-entropy, computed a block of the vocabulary and of the
  positions at a time (training.chunked_loss): a few float32 blocks of the head, a few
  (positions x block) slices of logits, and per position a few hidden-sized float32 vectors
  (its hidden state, its target's row of the head, its gradient); over the trained positions
  only when the loss projects those alone (training.trained_positions, on CPU). No
  (tokens x vocab) tensor exists, so a 262k vocabulary costs what a 32k one does.

The per-token counts below were measured with MLX's own allocator statistics
(mx.get_peak_memory) on MLX 0.32's CPU backend for Llama-style models; tests/test_memory.py
holds the estimate to within 25% of the measured peak. They depend on the training graph (the
attention kernel, the loss, the adapters): refit them when it changes. Metal's kernels keep
different temporaries; the estimate there is a guide, not a checked bound.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import mlx.core as mx

from ..adapters.files import LoraConfig, base_parameters, expected_adapter_shapes
from ..adapters.layers import ADAPTER_DTYPE
from ..data.batching import BatchIterator
from ..data.packing import PackedBatchIterator
from . import chunked_loss

GB = 1e9
# Optimiser state per adapter value, in adapter-sized tensors.
OPTIMIZER_COPIES = {"adamw": 2, "adam": 2, "sgd": 0}

# Values kept per token, in units of the width they scale with: hidden_size, intermediate_size,
# and attention scores (num_attention_heads x length). Fitted to peaks measured with
# mx.get_peak_memory() on MLX 0.32 (CPU) for 4-bit Llama models, LoRA on all linear layers,
# across batch 1-8, length 128-1024, hidden 256-512, intermediate 704-1408, 4-8 layers,
# 4-8 heads and vocab 4k-8k: the fit is within 2% at every point. Gemma 3 at its real widths
# (hidden 640, intermediate 2048, 256-wide heads, 4 x 512 tokens) keeps 2% less per layer than
# this count, once its GeGLU keeps only gate and up (models/geglu.py; 40% more before).
# Each decoder layer, for its backward pass (norm inputs and outputs, q/k/v/o, residuals; the
# MLP's gate, up, activation and product; a share of the attention probabilities, since the
# CPU computes causal attention block by block):
SAVED_PER_LAYER = {"hidden": 8.9, "intermediate": 4.5, "scores": 0.5}
# Once: the temporaries of the layer being differentiated, the embedding and final norm:
BACKWARD_ONCE = {"hidden": 5.6, "intermediate": 8.8}
# With gradient checkpointing, each layer keeps its input; the layer recomputed in the backward
# pass holds its activations and its temporaries at once:
CHECKPOINT_PER_LAYER = {"hidden": 1.0}
CHECKPOINT_ONCE = {"hidden": 14.5, "intermediate": 12.2, "scores": 0.55}
# The chunked loss at its peak (in its backward pass), in float32 values: head blocks of
# (vocab_block x hidden) alive at once (compiled, MLX overlaps the de-quantisation of the next
# blocks with the products of the current one: 6 measured on a 262k x 640 head), logit slices
# of (position_chunk x vocab_block) (compiled, the exp and the products fuse into about one),
# and hidden-sized vectors per position. Measured with mx.get_peak_memory on MLX 0.32 (CPU).
LOSS_HEAD_BLOCKS = 6.0
LOSS_SLICES = 1.0
LOSS_PER_POSITION = 4.0
# An adapted layer keeps x @ A.T (rank values per token); with dropout also the dropped-out
# input and its mask, about this many values per input feature (measured).
DROPOUT_PER_INPUT = 1.4
# The calibration adapted every linear layer, which keeps their inputs; a group of layers with
# no adapter does not: (layer names, the width of their input).
INPUT_GROUPS = (
    (("q_proj", "k_proj", "v_proj", "qkv_proj"), "hidden"),  # Phi-3 fuses q, k, v
    (("o_proj",), "attention"),
    (("gate_proj", "up_proj", "gate_up_proj"), "hidden"),
    (("down_proj",), "intermediate"),
)


@dataclass
class MemoryEstimate:
    """Bytes per item at the peak of a training step; `total` is their sum."""

    weights: int
    adapter: int
    optimizer: int
    gradients: int
    activations: int
    logits: int
    batch_size: int
    max_length: int
    grad_checkpoint: bool

    @property
    def total(self) -> int:
        return sum(size for _, size in self.items())

    def items(self) -> list[tuple[str, int]]:
        """(label, bytes) of every item, in table order."""
        return [
            ("weights (frozen base, as stored)", self.weights),
            ("adapter", self.adapter),
            ("optimizer state", self.optimizer),
            ("gradients", self.gradients),
            ("activations" + (" (checkpointed)" if self.grad_checkpoint else ""), self.activations),
            ("loss (chunked head, cross-entropy)", self.logits),
        ]

    def table(self) -> str:
        """A small table of the estimate, in GB, for the terminal."""
        title = (
            f"memory estimate at batch {self.batch_size} x {self.max_length} tokens"
            f"{', gradient checkpointing' if self.grad_checkpoint else ''}:"
        )
        rows = [f"  {label:<36}{size / GB:>9.3f} GB" for label, size in self.items()]
        rows.append(f"  {'total (peak)':<36}{self.total / GB:>9.3f} GB")
        return "\n".join([title, *rows])


def estimate_memory(
    model,
    lora_config: LoraConfig,
    batch_size: int,
    max_length: int,
    grad_checkpoint: bool = False,
    optimizer: str = "adamw",
    batching: str = "packed",
    grad_accumulation: int = 1,
    logit_positions: int | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory, in bytes per item, of training `model` (with or without its
    adapters applied) with an optimizer of that name.

    batch_size rows of max_length tokens: the widest batch the run will see (batch_extent
    finds it in the data; packed batches are about max_length wide). batching "packed" adds
    its (batch, 1, L, L) attention mask. grad_accumulation > 1 keeps a second gradient.
    logit_positions: how many positions of a batch get logits, when the loss computes them at
    the trained positions only (training.trained_positions; batch_extent gives the most in
    one batch); None: every position.
    """
    args = model.args
    weights = sum(v.nbytes for v in base_parameters(model).values())
    shapes = expected_adapter_shapes(model, lora_config)
    adapter_values = sum(math.prod(s) for s in shapes.values())
    adapter = adapter_values * ADAPTER_DTYPE.size
    optimizer_state = OPTIMIZER_COPIES.get(optimizer, 2) * adapter
    gradients = adapter * (2 if grad_accumulation > 1 else 1)

    # Positions of one batch: inputs are max_length - 1 wide (targets are shifted by one).
    length = max_length - 1
    tokens = batch_size * length
    widths = {
        "hidden": args.hidden_size,
        "intermediate": args.intermediate_size,
        "scores": args.num_attention_heads * length,
        "attention": args.num_attention_heads * args.head_dim,
    }

    def values(counts: dict) -> float:
        return sum(n * widths[name] for name, n in counts.items())

    # Layers below the lowest adapted one need no backward pass, so they keep nothing.
    layers = lora_config.num_layers or len(model.layers)
    per_layer = values(SAVED_PER_LAYER) + _adapter_values(shapes, lora_config, widths, layers)
    if grad_checkpoint:
        kept = layers * values(CHECKPOINT_PER_LAYER) + values(CHECKPOINT_ONCE)
        kept += per_layer - values(SAVED_PER_LAYER)  # the recomputed layer's adapters
    else:
        kept = layers * per_layer + values(BACKWARD_ONCE)
    # float32 whatever the model's dtype: the float32 adapters promote what passes through
    # them (a bfloat16 model measured 0.84-0.93 of its float32 twin's activations).
    size = 4
    activations = int(tokens * kept * size)
    if batching == "packed":
        # The (B, 1, L, L) block-diagonal mask, and the comparisons that build it.
        activations += 2 * batch_size * length * length * size
    if logit_positions is not None:
        tokens = min(tokens, logit_positions)
    logits = loss_memory(args.vocab_size, args.hidden_size, tokens)
    return MemoryEstimate(
        weights=weights,
        adapter=adapter,
        optimizer=optimizer_state,
        gradients=gradients,
        activations=activations,
        logits=logits,
        batch_size=batch_size,
        max_length=max_length,
        grad_checkpoint=grad_checkpoint,
    )


def loss_memory(vocab_size: int, hidden_size: int, positions: int) -> int:
    """Bytes the chunked head and cross-entropy hold at once for `positions` positions."""
    block = min(chunked_loss.VOCAB_BLOCK, vocab_size)
    chunk = min(positions, max(1, chunked_loss.SLICE_VALUES // block))
    # No more blocks than the two passes (forward, backward) de-quantise in all.
    blocks = min(LOSS_HEAD_BLOCKS, 2 * -(-vocab_size // block))
    values = (
        blocks * block * hidden_size
        + LOSS_SLICES * chunk * block
        + LOSS_PER_POSITION * positions * hidden_size
    )
    return int(values * 4)


def _adapter_values(shapes: dict, config: LoraConfig, widths: dict, layers: int) -> float:
    """What the adapters change in the values one decoder layer keeps per token, relative to
    the calibration (every linear layer adapted, no dropout). shapes: expected_adapter_shapes."""
    # "model.layers.3.self_attn.q_proj.lora_a" -> ("q_proj", input features)
    adapted = [(k.split(".")[-2], s[1]) for k, s in shapes.items() if k.endswith(".lora_a")]
    names = {name for name, _ in adapted}
    # Inputs that no adapter needs are not kept.
    change = -sum(widths[width] for group, width in INPUT_GROUPS if not names & set(group))
    change += config.rank * len(adapted) / layers
    if config.dropout > 0:
        change += DROPOUT_PER_INPUT * sum(n for _, n in adapted) / layers
    return change


@contextlib.contextmanager
def memory_limits(cache_limit_gb: float | None = None, memory_limit_gb: float | None = None):
    """Set MLX's cache and memory limits (in GB; None leaves one as it is) for the duration.

    The cache limit bounds the freed buffers MLX keeps for reuse (lower: less resident memory,
    more allocations); the memory limit is where MLX waits for work in flight to free memory
    before allocating more. Both are restored on exit.
    """
    previous = {}
    if cache_limit_gb is not None:
        previous["cache"] = mx.set_cache_limit(int(cache_limit_gb * GB))
    if memory_limit_gb is not None:
        previous["memory"] = mx.set_memory_limit(int(memory_limit_gb * GB))
    try:
        yield
    finally:
        if "cache" in previous:
            mx.set_cache_limit(previous["cache"])
        if "memory" in previous:
            mx.set_memory_limit(previous["memory"])


def batch_extent(batches) -> tuple[int, int] | None:
    """(length, trained): the widest batch of the current epoch of `batches` in tokens per row
    (what estimate_memory calls max_length), and the most trained tokens in one batch.

    batches: an iterator from iterate_batches or iterate_packed_batches; it is read from the
    examples' lengths and loss masks without building a batch. None for other iterators.
    """
    if not isinstance(batches, BatchIterator):
        return None
    examples, multiple = batches.examples, batches.pad_multiple
    # Positions an example fills: its inputs, one fewer than its tokens. The first token's
    # mask is dropped by the same shift: nothing predicts it.
    positions = [len(x["input_ids"]) - 1 for x in examples]
    trained = [sum(x["loss_mask"]) - x["loss_mask"][0] for x in examples]
    widest = most = 0
    for entry in batches.epoch_batches(batches.epoch):
        if isinstance(batches, PackedBatchIterator):  # rows of examples
            used = max(sum(positions[i] for i in row) for row in entry)
            indices = [i for row in entry for i in row]
        else:
            used, indices = max(positions[i] for i in entry), entry
        widest = max(widest, -(-used // multiple) * multiple)
        most = max(most, sum(trained[i] for i in indices))
    return min(widest, batches.max_length - 1) + 1, most
