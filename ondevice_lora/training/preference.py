"""DPO and ORPO on the frozen 4-bit base: pair batches, the losses, the reference policy, the step.

A batch of P pairs is 2P rows, chosen and rejected interleaved (row 2i chosen, 2i + 1 rejected),
so that sharding rows over distributed ranks keeps each pair on one rank.

DPO (Rafailov et al. 2023), as TRL's "sigmoid" loss: with s = the summed log-probability of a
reply's tokens under the trained policy and s_ref under the reference,
    loss = -log sigmoid(beta * ((s_c - s_ref_c) - (s_r - s_ref_r)))
and the rewards beta * (s - s_ref). The reference costs no second model: it is the same model
with the adapters switched off (a fresh adapter: the base exactly), or with the adapter tensors
swapped for a frozen copy of --reference-adapter's, under stop_gradient (`reference_policy`).

ORPO (Hong et al. 2024), as TRL's ORPOTrainer: with a = the mean log-probability per reply
token, log odds(y) = a - log(1 - exp(a)),
    loss = NLL(chosen) - lambda * mean(log sigmoid(log odds(chosen) - log odds(rejected)))
where NLL is TRL's: the cross-entropy over every token of the chosen rows, prompt included.
No reference model. Rewards, as TRL logs them: lambda * a.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from ..adapters.files import (
    LoraConfig,
    adapter_tensors,
    check_adapter_base,
    read_adapter_config,
    read_adapter_tensors,
)
from ..adapters.layers import wrapped_modules
from ..data.batching import BatchIterator
from ..data.preference import REJECTED_KEYS
from ..errors import OndeviceLoraError
from .distributed import all_sum
from .trained_positions import trained_positions

METHODS = ("sft", "dpo", "orpo")
# Per-pair figures summed over a step; the metrics are these over "pairs".
PAIR_STATS = ("reward_chosen", "reward_rejected", "margin", "accuracy")


@dataclass
class PreferenceLoss:
    """Which preference loss and its strength. beta: DPO's; orpo_lambda: ORPO's weight of the
    odds-ratio term. reference: the reference adapter's tensors (by saved name), or None for
    the base (adapters off)."""

    method: str = "dpo"
    beta: float = 0.1
    orpo_lambda: float = 0.1
    reference: dict | None = None


class PairBatch(NamedTuple):
    """(2P, W) arrays, row 2i the chosen and 2i + 1 the rejected side of pair i. loss_mask: 1
    on reply tokens (what is scored); token_mask: 1 on every real (not padding) target."""

    inputs: mx.array
    targets: mx.array
    loss_mask: mx.array
    token_mask: mx.array


class PairBatchIterator(BatchIterator):
    """BatchIterator over pairs (data.preference examples): the same seeded, resumable order,
    each pair as long as its longer side; in training (shuffle) full batches only."""

    def __init__(self, examples, batch_size: int, max_length: int, **kwargs):
        # Training takes full batches only: distributed ranks shard a batch by whole pairs
        # (batch_size divides by the ranks), which a last, smaller batch would not allow.
        kwargs.setdefault("drop_last", kwargs.get("shuffle", True))
        super().__init__(examples, batch_size, max_length, **kwargs)
        rejected = np.array([len(x[REJECTED_KEYS[0]]) for x in examples])
        self.lengths = np.maximum(self.lengths, rejected)

    def collate(self, examples: list[dict]) -> PairBatch:
        sides = []
        for x in examples:
            sides.append((x["input_ids"], x["loss_mask"]))
            sides.append((x[REJECTED_KEYS[0]], x[REJECTED_KEYS[1]]))
        longest = max(len(ids) for ids, _ in sides) - 1
        width = min(-(-longest // self.pad_multiple) * self.pad_multiple, self.max_length - 1)
        ids = np.full((len(sides), width + 1), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(sides), width + 1), dtype=np.float32)
        real = np.zeros_like(mask)
        for row, (side_ids, side_mask) in enumerate(sides):
            ids[row, : len(side_ids)] = side_ids
            mask[row, : len(side_ids)] = side_mask
            real[row, : len(side_ids)] = 1
        # (2P, W + 1) -> inputs and targets (2P, W): position t predicts token t + 1.
        return PairBatch(
            mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.array(mask[:, 1:]),
            mx.array(real[:, 1:]),
        )  # fmt: skip


def pair_extent(batches: PairBatchIterator) -> tuple[int, int]:
    """(widest row in tokens, most scored tokens in one batch) of the current epoch, for the
    memory estimate (rows: 2 per pair)."""
    widest = most = 0
    for entry in batches.epoch_batches(batches.epoch):
        used = max(int(batches.lengths[i]) - 1 for i in entry)
        widest = max(widest, -(-used // batches.pad_multiple) * batches.pad_multiple)
        scored = sum(sum(batches.examples[i]["loss_mask"][1:]) for i in entry)
        scored += sum(sum(batches.examples[i][REJECTED_KEYS[1]][1:]) for i in entry)
        most = max(most, scored)
    return min(widest, batches.max_length - 1) + 1, most


# --- the reference policy ------------------------------------------------------------------------


def _base_call(self, x):
    return self.base(x)


@contextlib.contextmanager
def reference_policy(model: nn.Module, reference: dict | None):
    """Inside, `model` computes the reference policy, without dropout.

    reference None: every adapter layer calls its base layer alone (its class is swapped for a
    one-off subclass, as gradient_checkpointing does), which is the base model exactly.
    Otherwise the adapter tensors are swapped for `reference` (frozen arrays) and put back.
    """
    was_training = model.training
    model.eval()
    swapped, saved = [], None
    if reference is None:
        for layer in wrapped_modules(model).values():
            cls = type(layer)
            swapped.append((layer, cls))
            layer.__class__ = type(f"Off{cls.__name__}", (cls,), {"__call__": _base_call})
    else:
        saved = adapter_tensors(model)
        model.update(tree_unflatten(list(reference.items())))
    try:
        yield
    finally:
        for layer, cls in swapped:
            layer.__class__ = cls
        if saved is not None:
            model.update(tree_unflatten(list(saved.items())))
        model.train(was_training)


def settings_for(config) -> PreferenceLoss | None:
    """The PreferenceLoss a TrainConfig asks for; None for SFT."""
    if config.method == "sft":
        return None
    return PreferenceLoss(config.method, config.beta, config.orpo_lambda)


def start_from_reference(model: nn.Module, config, fingerprint: dict) -> dict | None:
    """With config.reference_adapter: put its tensors into `model`'s fresh adapters (the
    trained adapter starts as the reference) and return them, the frozen reference."""
    if config.reference_adapter is None:
        return None
    reference = load_reference(model, config.reference_adapter, config.lora_config(), fingerprint)
    current = adapter_tensors(model)
    reference = {k: v.astype(current[k].dtype) for k, v in reference.items()}
    model.update(tree_unflatten(list(reference.items())))
    mx.eval(model.trainable_parameters())
    return reference


def load_reference(model: nn.Module, folder, lora: LoraConfig, fingerprint: dict) -> dict:
    """The tensors of the reference adapter in `folder`, checked to be made for this base and
    to have this run's LoRA settings (the trained adapter starts from them: same shapes)."""
    reference, base = read_adapter_config(folder)
    check_adapter_base(folder, base, fingerprint)
    fields = ("rank", "alpha", "target_modules", "num_layers", "fine_tune_type", "use_rslora")
    differ = [
        f"{name}: reference {getattr(reference, name)!r}, this run {getattr(lora, name)!r}"
        for name in fields
        if getattr(reference, name) != getattr(lora, name)
    ]
    if differ:
        raise OndeviceLoraError(
            f"{folder}: the reference adapter's settings differ from this run's ("
            + "; ".join(differ)
            + "). The trained adapter starts from the reference, so pass its settings "
            "(e.g. --rank, --alpha, --target-modules as in its adapter_config.json)."
        )
    return dict(read_adapter_tensors(model, folder, reference))


# --- the losses --------------------------------------------------------------------------------


def _row_sums(model, batch: PairBatch, masks, positions) -> list[mx.array]:
    """For each mask (2P, W), the per-row sum of log p(target) over its tokens: [(2P,), ...].

    positions (K,): flat indices where logits are needed (trained_positions, on the host),
    or None for every position (Metal)."""
    B, W = batch.inputs.shape
    if positions is None:
        positions = mx.arange(B * W)
    hidden = model.model(batch.inputs)  # (2P, W, hidden)
    index = mx.minimum(positions, B * W - 1)  # (K,): padding entries (== B * W) weigh 0
    logits = model.output_logits(hidden.reshape(B * W, -1)[index]).astype(mx.float32)  # (K, V)
    token_logps = -nn.losses.cross_entropy(logits, batch.targets.reshape(-1)[index], reduction="none")  # fmt: skip
    real = positions < B * W
    rows = (index // W)[:, None] == mx.arange(B)[None, :]  # (K, 2P): which row each entry is
    sums = []
    for mask in masks:
        weight = mx.where(real, mask.reshape(-1)[index], 0.0)
        sums.append(((token_logps * weight)[:, None] * rows).sum(axis=0))
    return sums


def _log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return mx.where(
        x > -0.6931471805599453, mx.log(-mx.expm1(mx.minimum(x, -1e-30))), mx.log1p(-mx.exp(x))
    )


def pair_loss(model, batch: PairBatch, settings: PreferenceLoss, positions=None):
    """(mean loss over the pairs, stats): stats holds "pairs", "tokens" (scored tokens of both
    sides) and the per-pair sums of PAIR_STATS (and "nll" for ORPO)."""
    scored = batch.loss_mask.sum(axis=1)  # (2P,)
    pairs = batch.inputs.shape[0] // 2
    stats = {"pairs": mx.array(float(pairs)), "tokens": scored.sum()}
    if settings.method == "dpo":
        (policy,) = _row_sums(model, batch, [batch.loss_mask], positions)
        with reference_policy(model, settings.reference):
            (ref,) = _row_sums(model, batch, [batch.loss_mask], positions)
        ratios = policy - mx.stop_gradient(ref)  # (2P,)
        chosen, rejected = ratios[0::2], ratios[1::2]
        loss = -nn.log_sigmoid(settings.beta * (chosen - rejected)).mean()
        rewards = mx.stop_gradient(settings.beta * ratios)
    else:
        # Chosen rows: every real token for the NLL (as TRL); both: the reply for the odds.
        is_chosen = (mx.arange(batch.inputs.shape[0]) % 2 == 0)[:, None]
        nll_mask = batch.token_mask * is_chosen
        policy, nll_sum = _row_sums(model, batch, [batch.loss_mask, nll_mask], positions)
        mean_logps = policy / mx.maximum(scored, 1.0)  # (2P,)
        chosen, rejected = mean_logps[0::2], mean_logps[1::2]
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        nll = -nll_sum.sum() / mx.maximum(nll_mask.sum(), 1.0)
        loss = nll - settings.orpo_lambda * nn.log_sigmoid(log_odds).mean()
        rewards = mx.stop_gradient(settings.orpo_lambda * mean_logps)
        stats["nll"] = mx.stop_gradient(nll) * pairs
    margin = rewards[0::2] - rewards[1::2]
    stats |= {
        "reward_chosen": rewards[0::2].sum(),
        "reward_rejected": rewards[1::2].sum(),
        "margin": margin.sum(),
        "accuracy": (margin > 0).astype(mx.float32).sum(),
    }
    return loss, stats


def positions_of(batch: PairBatch, settings: PreferenceLoss):
    """The flat positions whose logits the loss reads (computed on the host, CPU only)."""
    if mx.default_device() != mx.cpu:
        return None
    mask = batch.token_mask if settings.method == "orpo" else batch.loss_mask
    return trained_positions(mask)


def pair_metrics(stats: dict, prefix: str = "") -> dict:
    """The per-pair means of a step's (or an evaluation's) summed stats, as plain floats."""
    pairs = max(float(stats["pairs"]), 1.0)
    out = {prefix + name: float(stats[name]) / pairs for name in PAIR_STATS}
    if "nll" in stats:
        out[prefix + "nll"] = float(stats["nll"]) / pairs
    return out


# --- training and evaluation ---------------------------------------------------------------------


def make_preference_step(model: nn.Module, optimizer, settings: PreferenceLoss, group=None):
    """A compiled step(batch, carry, apply) -> (loss, scored tokens, carry), as make_step's.

    Micro-batches are weighted by their pairs (the loss is a mean over pairs). On the last
    micro-batch (apply) the update is made and `carry` comes back as the step's summed stats,
    which the trainer turns into metrics (pair_metrics)."""

    def loss_fn(model, batch, positions):
        return pair_loss(model, PairBatch(*batch), settings, positions)

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    # The frozen reference tensors enter as inputs too: a compiled graph may not read arrays
    # that are neither its inputs nor its outputs.
    frozen = [settings.reference] if settings.reference is not None else []

    @partial(mx.compile, inputs=state + frozen, outputs=state)
    def compiled_step(batch, positions, carry, apply):
        (loss, stats), grads = loss_and_grad(model, batch, positions)
        pairs = stats["pairs"]
        grads = tree_map(lambda g: g * pairs, grads)
        stats = {**stats, "loss": loss * pairs}
        if carry is not None:
            grads = tree_map(mx.add, grads, carry[0])
            stats = {k: v + carry[1][k] for k, v in stats.items()}
        if not apply:
            return stats["loss"], stats["tokens"], (grads, stats)
        if group is not None:
            grads, stats = all_sum((grads, stats), group)
        denominator = mx.maximum(stats["pairs"], 1.0)
        optimizer.update(model, tree_map(lambda g: g / denominator, grads))
        return stats["loss"] / denominator, stats["tokens"], stats

    def step(batch, carry, apply):
        return compiled_step(tuple(batch), positions_of(PairBatch(*batch), settings), carry, apply)

    return step


def evaluate_preferences(
    model, pairs, batch_size: int, max_length: int, settings: PreferenceLoss,
    num_batches: int = -1, pad_id: int = 0,
) -> dict:  # fmt: skip
    """Validation figures over the first num_batches batches (-1: all), in a fixed order:
    {"val_loss", "val_reward_chosen", "val_reward_rejected", "val_margin", "val_accuracy"}."""
    was_training = model.training
    model.eval()
    batches = PairBatchIterator(pairs, batch_size, max_length, shuffle=False, pad_id=pad_id)
    totals: dict = {}
    try:
        for i, batch in enumerate(batches):
            if num_batches != -1 and i >= num_batches:
                break
            loss, stats = pair_loss(model, batch, settings, positions_of(batch, settings))
            stats = {**stats, "loss": loss * stats["pairs"]}
            totals = {k: v + totals.get(k, 0.0) for k, v in stats.items()}
            mx.eval(totals)
    finally:
        model.train(was_training)
    pairs_seen = max(float(totals["pairs"]), 1.0)
    return {"val_loss": float(totals["loss"]) / pairs_seen, **pair_metrics(totals, "val_")}


def describe(record: dict) -> str:
    """The preference figures of a metrics record, for the progress line."""
    if "accuracy" not in record:
        return ""
    return f"acc {record['accuracy']:.2f}  margin {record['margin']:.3f}"


__all__ = [
    "METHODS",
    "PairBatch",
    "PairBatchIterator",
    "PreferenceLoss",
    "evaluate_preferences",
    "load_reference",
    "make_preference_step",
    "pair_extent",
    "pair_loss",
    "pair_metrics",
    "reference_policy",
]
