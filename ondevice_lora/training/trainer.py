"""train(): LoRA adapters on a frozen base, one compiled step at a time, resumable at any point.

Each optimiser step: `grad_accumulation` micro-batches through the compiled step (make_step),
one mx.eval per call; dropout seeded from (seed, step); metrics to metrics.jsonl; every
eval_every steps a validation loss (the best adapter kept), every save_every steps an atomic
checkpoint. A run killed at any moment and resumed produces the same weights and losses as one
that never stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..adapters.files import (
    ADAPTER_WEIGHTS_FILE,
    adapter_tensors,
    apply_adapters,
    base_fingerprint,
    save_adapter,
)
from ..backend.cpu_matmul import dequantized_matmuls
from ..data.packing import BATCHING
from . import preference
from .checkpoint import (
    CheckpointError,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    restore_optimizer_state,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import init_group, shard
from .evaluate import evaluate_loss, perplexity
from .finite import check_step
from .lock import training_lock
from .memory import batch_extent, estimate_memory, memory_limits
from .metrics import METRICS_FILE, PLOT_FILE, MetricsWriter, plot_losses, read_metrics
from .offline import offline
from .progress import TrainProgress
from .schedule import build_optimizer, build_schedule
from .step import gradient_checkpointing, make_step, masked_cross_entropy, step_seed
from .trained_positions import enabled as logits_at_trained

LAST_ADAPTER_DIR = "last"  # with keep_best, the adapter of the final step goes here
# Settings that may change between an interrupted run and its resume; any other change would
# make the resumed run a different run, so it is refused.
RESUMABLE_CHANGES = {
    "resume", "offline_guard", "eval_every", "eval_batches", "save_every", "keep_best",
    "early_stopping_patience", "iters", "epochs", "model", "data", "cache_limit_gb",
    "memory_limit_gb", "workers", "hostfile",
}  # fmt: skip


class TrainingCallback:
    """Hooks that train() calls; subclass and override what you need. Records are dicts."""

    def on_train_begin(self, info: dict) -> None: ...

    def on_step_end(self, record: dict) -> None: ...

    def on_eval_end(self, record: dict) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    """What a run did. losses: training loss of every step (1-based step i at index i - 1);
    val_losses: (step, loss) of each evaluation, step 0 being the untrained adapter."""

    adapter_path: Path
    steps: int
    losses: list[float]
    val_losses: list[tuple[int, float]]
    best_val_loss: float | None
    best_step: int | None
    stopped_early: bool
    trained_tokens: int
    seconds: float
    resumed_from: int | None
    metrics_path: Path
    plot_path: Path | None
    peak_memory_gb: float | None = None  # MLX's peak while training (weights included)
    estimated_memory_gb: float | None = None  # what estimate_memory predicted


def train(
    model,
    tokenizer,
    train_examples,
    valid_examples,
    config: TrainConfig,
    callbacks=(),
    loss_fn=masked_cross_entropy,
    batch_iterator=None,
    show_progress: bool = True,
) -> TrainResult:
    """Train a LoRA adapter on `model` (a base without adapters) and save it.

    train_examples / valid_examples: lists of {"input_ids", "loss_mask"} (a data.Dataset
    works); valid_examples may be None (no evaluation, no best-adapter selection).
    callbacks: TrainingCallback objects. loss_fn(model, inputs, targets, loss_mask) ->
    (mean loss, trained tokens), called as loss_fn(model, *batch). batch_iterator: None for
    the one config.batching names (data.iterate_packed_batches or data.iterate_batches), or a
    function with their signature whose iterator has `.state` (a position it accepts back as
    keyword arguments). Before training, estimate_memory's table is printed; MLX's cache and
    memory limits are set from config for the run and restored afterwards.
    The adapter goes to config.adapter_path (adapters.safetensors + adapter_config.json with
    the base's fingerprint): the best one by validation loss when config.keep_best (the last
    step's then in `last/`), else the last. With config.resume, continues from the newest
    complete checkpoint there. `model` holds the saved adapter when train returns.
    """
    config.validate(require_data=False)
    started = time.perf_counter()
    out = Path(config.adapter_path)
    group = init_group()
    # Rank 0 alone writes files and shows progress; every rank computes the same numbers.
    writer = group.rank() == 0
    show_progress = show_progress and writer
    if config.dp_enabled:
        from ..privacy.dp import PoissonBatches

        batch_iterator = PoissonBatches  # DP-SGD's accountant assumes Poisson sampling
    # DPO/ORPO: batches of chosen/rejected pairs, the preference loss and step.
    pairs = preference.settings_for(config)
    if pairs is not None:
        batch_iterator = preference.PairBatchIterator
    batch_iterator = batch_iterator or BATCHING[config.batching]
    with (
        offline(config.offline_guard),
        memory_limits(config.cache_limit_gb, config.memory_limit_gb),
        training_lock(out, enabled=writer),  # one run per folder
    ):
        fingerprint = base_fingerprint(model, tokenizer)
        mx.random.seed(config.seed)  # the adapters' initial A matrices
        apply_adapters(model, config.lora_config())
        if pairs is not None:
            pairs.reference = preference.start_from_reference(model, config, fingerprint)
        pad = tokenizer.pad_token_id or 0

        def make_batches(position: dict | None = None):
            return batch_iterator(
                train_examples, config.batch_size, config.max_length, seed=config.seed,
                repeat=True, pad_id=pad, **(position or {}),
            )  # fmt: skip

        total = config.total_steps(len(make_batches()))
        dp = _dp_settings(config, len(train_examples), total)
        schedule = build_schedule(
            config.learning_rate, total, config.warmup_steps, config.lr_schedule,
            config.min_learning_rate,
        )  # fmt: skip
        optimizer = build_optimizer(config.optimizer, schedule, config.weight_decay)
        optimizer.init(model.trainable_parameters())
        identity = {
            "base_fingerprint": fingerprint["fingerprint"],
            "data_fingerprint": examples_fingerprint(train_examples),
        }
        state, resumed_from = _start(out, config, model, optimizer, identity)
        batches = make_batches(state.data_position)
        # The widest batch the data makes, not max_length: short examples make narrow batches.
        length, trained = batch_extent(batches) or (config.max_length, None)
        rows = config.batch_size
        if pairs is not None:  # two rows per pair
            (length, trained), rows = preference.pair_extent(batches), 2 * config.batch_size
        estimate = estimate_memory(
            model, config.lora_config(), rows, length, config.grad_checkpoint,
            optimizer=config.optimizer, batching=config.batching,
            grad_accumulation=config.grad_accumulation,
            logit_positions=trained if logits_at_trained(loss_fn) else None,
        )  # fmt: skip
        info = {"total_steps": total, "start_step": state.step, "config": config}
        for c in callbacks:
            c.on_train_begin({**info, "memory_estimate": estimate})

        with (
            MetricsWriter(out / METRICS_FILE, resume_step=resumed_from, enabled=writer) as metrics,
            gradient_checkpointing(model, config.grad_checkpoint),
            # Linux CPU with a fast BLAS: quantised layers de-quantise before large matmuls.
            dequantized_matmuls(model),
            TrainProgress(total, state.step, enabled=show_progress) as ui,
        ):
            ui.log(estimate.table())
            if dp is not None:
                ui.log(dp.describe())
            # From here on, the peak is training's (not loading's), comparable to the estimate.
            mx.reset_peak_memory()
            if resumed_from is not None:
                ui.log(f"resumed from step {resumed_from} ({out})")
            elif config.resume:
                ui.log(f"no checkpoint in {out}: starting a fresh run")

            def validate(step: int) -> None:
                if pairs is not None:
                    figures = preference.evaluate_preferences(
                        model, valid_examples, config.batch_size, config.max_length, pairs,
                        config.eval_batches, pad,
                    )  # fmt: skip
                    loss = figures["val_loss"]
                else:
                    loss = evaluate_loss(
                        model, valid_examples, config.batch_size, config.max_length,
                        config.eval_batches, pad, loss_fn, config.batching,
                    )[0]  # fmt: skip
                    figures = {"val_loss": loss, "val_perplexity": perplexity(loss)}
                if _record_validation(state, step, loss) and config.keep_best and writer:
                    save_adapter(out, model, config.lora_config(), fingerprint)
                record = {"step": step, **figures}
                metrics.write(record)
                ui.log(f"step {step}: validation loss {loss:.4f}")
                for c in callbacks:
                    c.on_eval_end(record)

            if valid_examples is not None and not state.val_losses:
                validate(0)
            step_fn = make_step(model, optimizer, loss_fn, group)
            if pairs is not None:
                step_fn = preference.make_preference_step(model, optimizer, pairs, group)
            if dp is not None:
                from ..privacy.dp import make_dp_step, noise_secret

                secret = noise_secret(out) if writer else 0
                step_fn = make_dp_step(model, optimizer, dp, config.batch_size, secret, state.step)
            model.train()
            while state.step < total and not _should_stop(state, config):
                record = _train_step(step_fn, model, optimizer, batches, state, config, group)
                check_step(state.step, record["loss"], adapter_tensors(model), out)
                if dp is not None:
                    record["epsilon"] = dp.epsilon(state.step)
                metrics.write(record)
                ui.update(
                    state.step, record["loss"], record["learning_rate"],
                    record["tokens_per_second"], record["peak_memory_gb"],
                    preference.describe(record),
                )  # fmt: skip
                for c in callbacks:
                    c.on_step_end(record)
                last = state.step == total
                if valid_examples is not None and (last or _every(state.step, config.eval_every)):
                    validate(state.step)
                stopping = _should_stop(state, config)
                if writer and (last or stopping or _every(state.step, config.save_every)):
                    state.data_position = batches.state
                    state.rng_key = mx.random.state[0].tolist()
                    path = save_checkpoint(out, state, adapter_tensors(model), optimizer.state)
                    for c in callbacks:
                        c.on_checkpoint(state.step, path)
                    if dp is not None:
                        ui.log(f"step {state.step}: privacy spent epsilon {record['epsilon']:.3f}")
                _fail_for_tests(group, state.step)
                if stopping:
                    ui.log(
                        f"early stop at step {state.step}: no improvement in "
                        f"{config.early_stopping_patience} evaluations"
                    )
        model.eval()
        has_valid = valid_examples is not None
        result = _finish(out, model, fingerprint, state, config, has_valid, writer)
        if dp is not None and writer:
            for folder in (out, out / LAST_ADAPTER_DIR):
                if (folder / ADAPTER_WEIGHTS_FILE).is_file():
                    dp.write(folder, state.step)
        _save_replica_for_tests(group, model)
    result.resumed_from = resumed_from
    result.seconds = time.perf_counter() - started
    result.peak_memory_gb = mx.get_peak_memory() / 1e9
    result.estimated_memory_gb = estimate.total / 1e9
    for c in callbacks:
        c.on_train_end(result)
    return result


def _train_step(step_fn, model, optimizer, batches, state: TrainState, config, group) -> dict:
    """One optimiser step over `grad_accumulation` micro-batches; returns its metrics record.

    Every rank draws the same global batch and trains on its own rows of it; loss and token
    counts come back summed over the ranks, so every rank records the same numbers."""
    step = state.step + 1
    tic = time.perf_counter()
    carry = None
    accum = config.grad_accumulation
    for micro in range(accum):
        batch = shard(tuple(next(batches)), group)  # Batch or PackedBatch: loss_fn's arguments
        # Each rank its own dropout draws; with one process this is step_seed(seed, step, micro).
        mx.random.seed(step_seed(config.seed, step, micro * group.size() + group.rank()))
        loss, ntoks, carry = step_fn(batch, carry, micro == accum - 1)
        # One evaluation per compiled call: the new weights, optimiser and random state.
        mx.eval(model.state, optimizer.state, mx.random.state, loss, ntoks, carry)
    seconds = time.perf_counter() - tic
    tokens = int(ntoks.item())
    state.step = step
    state.losses.append(loss.item())
    state.trained_tokens += tokens
    # A preference step hands back the step's summed pair figures instead of None.
    figures = preference.pair_metrics(carry) if isinstance(carry, dict) else {}
    return {
        **figures,
        "step": step,
        "loss": state.losses[-1],
        # After the update the optimiser holds the rate it has just used.
        "learning_rate": optimizer.learning_rate.item(),
        "tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "trained_tokens": state.trained_tokens,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


def _dp_settings(config: TrainConfig, num_examples: int, total: int):
    """DP-SGD settings for a run with dp_* set (None otherwise)."""
    if not config.dp_enabled:
        return None
    from ..privacy.dp import default_delta, settings_from_config

    if config.dp_delta is None:
        config = dataclasses.replace(config, dp_delta=default_delta(num_examples))
    return settings_from_config(config, num_examples, total)


def _record_validation(state: TrainState, step: int, loss: float) -> bool:
    """Add a validation loss to the state; True when it is the best so far."""
    state.val_losses.append([step, loss])
    if state.best_val_loss is None or loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_since_best = loss, step, 0
        return True
    state.evals_since_best += 1
    return False


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _should_stop(state: TrainState, config: TrainConfig) -> bool:
    patience = config.early_stopping_patience
    return patience is not None and state.evals_since_best >= patience


def examples_fingerprint(examples) -> str:
    """sha256 over every example's tokens and loss mask, in order."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(np.asarray(example["input_ids"], dtype=np.int64).tobytes())
        digest.update(np.asarray(example["loss_mask"], dtype=np.int8).tobytes())
        for key in preference.REJECTED_KEYS:  # preference pairs: the rejected side too
            if key in example:
                digest.update(np.asarray(example[key], dtype=np.int64).tobytes())
        digest.update(b"|")  # so that example boundaries count
    return digest.hexdigest()


def _start(out: Path, config: TrainConfig, model, optimizer, identity: dict):
    """(TrainState, step resumed from or None): a fresh state, or the newest checkpoint's
    with the model's adapters and the optimizer filled from it."""
    found = latest_checkpoint(out)
    if found is None or not config.resume:
        if found is not None:
            raise CheckpointError(
                f"{out} holds checkpoints of an earlier run (the newest: {found.name}). Pass "
                "--resume (resume: true) to continue it, or choose another adapter_path."
            )
        return TrainState(seed=config.seed, config=_comparable(config), **identity), None
    state, weights, optimizer_state = load_checkpoint(found)
    for key, what in (("base_fingerprint", "base model"), ("data_fingerprint", "training data")):
        if getattr(state, key) != identity[key]:
            raise CheckpointError(
                f"{found}: the {what} is not the one this run was trained on, so it cannot be "
                f"resumed with it. Use the original {what}, or start a new run in another "
                "adapter_path."
            )
    # A setting newer than the checkpoint (say `method`) had its default when it was written.
    saved = {**_comparable(TrainConfig(data=config.data)), **state.config}
    changed = sorted(
        k
        for k, v in _comparable(config).items()
        if k not in RESUMABLE_CHANGES and not _same_setting(k, saved.get(k), v)
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise CheckpointError(
            f"{found}: cannot resume with changed settings ({details}); use the settings of "
            "the interrupted run, or start a new run in another adapter_path."
        )
    expected = adapter_tensors(model)
    if set(weights) != set(expected):
        raise CheckpointError(f"{found}: its adapter tensors do not match this model's adapters.")
    model.load_weights(list(weights.items()), strict=False)
    restore_optimizer_state(optimizer, model.trainable_parameters(), optimizer_state, found)
    mx.eval(model.parameters(), optimizer.state)
    state.config = _comparable(config)
    return state, state.step


def _same_setting(key: str, saved, current) -> bool:
    if key == "adapter_path" and saved is not None and current is not None:
        # "ad", "ad/", "./ad" and /abs/ad are one folder.
        return Path(saved).resolve() == Path(current).resolve()
    return saved == current


def _comparable(config: TrainConfig) -> dict:
    # JSON-shaped (lists, not tuples), so it compares equal to what a checkpoint read back.
    data = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def _finish(out, model, fingerprint, state, config, has_valid: bool, writer=True) -> TrainResult:
    """Save the final adapter(s), draw the loss curve, and say what happened."""
    best = config.keep_best and has_valid and state.best_step is not None
    plot = None
    if writer:
        # With keep_best, the folder already holds the best adapter; the last goes beside it.
        last = out / LAST_ADAPTER_DIR if best else out
        save_adapter(last, model, config.lora_config(), fingerprint)
        records = read_metrics(out / METRICS_FILE)
        plot = plot_losses(records, out / PLOT_FILE, title=out.name) if records else None
    if best and writer:
        weights = mx.load(str(out / ADAPTER_WEIGHTS_FILE))
        model.load_weights(list(weights.items()), strict=False)
    return TrainResult(
        adapter_path=out,
        steps=state.step,
        losses=list(state.losses),
        val_losses=[(int(s), v) for s, v in state.val_losses],
        best_val_loss=state.best_val_loss,
        best_step=state.best_step,
        stopped_early=_should_stop(state, config),
        trained_tokens=state.trained_tokens,
        seconds=0.0,
        resumed_from=None,
        metrics_path=out / METRICS_FILE,
        plot_path=plot,
    )


# --- test hooks: a rank that fails, and replicas to compare --------------------------------------

FAIL_ENV = "ONDEVICE_LORA_TEST_FAIL"  # "rank:step": that rank dies after that step
REPLICA_ENV = "ONDEVICE_LORA_TEST_REPLICAS"  # a folder: every rank saves its final adapter


def _fail_for_tests(group, step: int) -> None:
    spec = os.environ.get(FAIL_ENV)
    if spec and spec == f"{group.rank()}:{step}":
        os._exit(3)  # as a crash would: no cleanup, no goodbye to the other ranks


def _save_replica_for_tests(group, model) -> None:
    folder = os.environ.get(REPLICA_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(
            str(Path(folder) / f"rank{group.rank()}.safetensors"), adapter_tensors(model)
        )
