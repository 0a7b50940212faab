"""DP-LoRA: differentially private training of the adapter (DP-SGD, Abadi et al. 2016).

Each step, every training example joins the batch with probability q (Poisson sampling, which
the accountant assumes; the batch size varies, batch_size is its expectation). Each example's
gradient of its own mean loss is clipped to L2 norm `clip` over all adapter parameters, the
clipped gradients are summed, Gaussian noise of standard deviation noise_multiplier * clip is
added to every coordinate, and the sum is divided by the expected batch size. Only the adapter
is trained and released, so only it needs the guarantee; the frozen base is public.

Per-example gradients on a 4-bit base: mx.vmap does not pass through quantised matmuls, so the
LoRA factors are tiled, one copy per example ((r, in) -> (B, r, in)): row b of the batch uses
only copy b, so the gradient of the summed per-example losses with respect to copy b is
example b's own gradient. One backward pass, about the cost of an ordinary step.

The unit of privacy is one training example: one JSONL record (one chat, one completion) or one
window of a note. A person with many records is protected less than one with a single record.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..atomic import write_atomically, write_text_atomically
from ..data.batching import BatchIterator
from ..errors import OndeviceLoraError
from .accountant import DEFAULT_ORDERS, epsilon_from_rdp, rdp_sampled_gaussian

PRIVACY_FILE = "privacy.json"  # beside adapter_config.json in a DP-trained adapter folder


@dataclass
class DPSettings:
    """What a DP run promises and how: written to the adapter folder as privacy.json."""

    noise_multiplier: float
    clip: float
    sample_rate: float
    delta: float
    steps: int
    target_epsilon: float | None = None
    unit: str = "one training example (a JSONL record, or one window of a note)"
    sampling: str = "Poisson (each example joins each step's batch with probability sample_rate)"
    accountant: str = "RDP of the sampled Gaussian mechanism (orders 1.1-10.9, 11-256)"

    def __post_init__(self):
        self._rdp = rdp_sampled_gaussian(self.sample_rate, self.noise_multiplier, DEFAULT_ORDERS)

    def epsilon(self, steps: int | None = None) -> float:
        """Epsilon spent after `steps` steps (default: the whole run), at this delta."""
        steps = self.steps if steps is None else steps
        return epsilon_from_rdp(DEFAULT_ORDERS, steps * self._rdp, self.delta)[0]

    def describe(self) -> str:
        return (
            f"DP-SGD: noise multiplier {self.noise_multiplier:.3f}, clip {self.clip}, "
            f"sample rate {self.sample_rate:.4g} (Poisson), delta {self.delta:g}; epsilon after "
            f"{self.steps} steps: {self.epsilon():.3f}. Unit of privacy: {self.unit}."
        )

    def write(self, folder, steps_done: int) -> Path:
        data = {k: v for k, v in asdict(self).items()}
        data |= {"steps_done": steps_done, "epsilon": self.epsilon(steps_done)}
        return write_text_atomically(Path(folder) / PRIVACY_FILE, json.dumps(data, indent=2) + "\n")


def read_privacy(folder) -> dict | None:
    path = Path(folder) / PRIVACY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class PoissonBatches(BatchIterator):
    """Batches of a Poisson sample of the examples, one example per row (bucketed padding).

    Step i's sample is drawn from a generator seeded by (seed, i), so the batches are a pure
    function of the position: `state` ({"epoch": 0, "index": i}) resumes exactly. A step that
    samples nobody gets one row with no trained token (the noise still counts as a step).
    """

    def __init__(self, examples, batch_size, max_length, seed=0, epoch=0, index=0, **kwargs):
        kwargs.pop("repeat", None)
        super().__init__(examples, batch_size, max_length, seed=seed, epoch=0, index=index,
                         repeat=True, **kwargs)  # fmt: skip
        self.sample_rate = min(1.0, batch_size / len(examples))

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.index])
        chosen = np.flatnonzero(rng.random(len(self.examples)) < self.sample_rate)
        self.index += 1
        if len(chosen) == 0:
            empty = dict(self.examples[0], loss_mask=[0] * len(self.examples[0]["loss_mask"]))
            return self.collate([empty])
        return self.collate([self.examples[i] for i in chosen])

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        # For memory estimates: the expected batch, of the longest examples.
        longest = np.argsort(-self.lengths)[: self.batch_size]
        return [list(map(int, longest))]


def per_example_losses(model, inputs, targets, loss_mask) -> tuple[mx.array, mx.array]:
    """(B,) mean loss of each row's trained tokens, and (B,) their counts."""
    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    counts = loss_mask.sum(axis=1)
    return (ce * loss_mask).sum(axis=1) / mx.maximum(counts, 1.0), counts


def clipped_per_example_grads(model, batch, clip: float):
    """(sum over examples of clipped gradients, per-example norms, losses, token counts).

    The adapter parameters are tiled per example for one backward pass (module docstring).
    """
    inputs, targets, loss_mask = batch
    rows = inputs.shape[0]
    params = model.trainable_parameters()
    tiled = tree_map(lambda p: mx.broadcast_to(p[None], (rows, *p.shape)), params)

    def total_loss(model, inputs, targets, loss_mask):
        losses, counts = per_example_losses(model, inputs, targets, loss_mask)
        return losses.sum(), (losses, counts)

    model.update(tiled)
    try:
        (_, (losses, counts)), grads = nn.value_and_grad(model, total_loss)(
            model, inputs, targets, loss_mask
        )
    finally:
        model.update(params)
    leaves = tree_flatten(grads)
    # (B,) L2 norm of each example's gradient over every adapter parameter.
    norms = mx.sqrt(sum((g.reshape(rows, -1) ** 2).sum(axis=1) for _, g in leaves))
    factors = mx.minimum(1.0, clip / mx.maximum(norms, 1e-12))
    summed = [(k, (g * factors.reshape(-1, *[1] * (g.ndim - 1))).sum(axis=0)) for k, g in leaves]
    return tree_unflatten(summed), norms, losses, counts


def noise_secret(adapter_path) -> int:
    """The run's secret noise seed, kept with its checkpoints (never in the adapter itself).

    The noise must be unknown to whoever sees the adapter: drawn from the run's public seed,
    anyone holding the seed and the other records could subtract it. A seed from os.urandom,
    saved beside the checkpoints, keeps it secret and still lets a resumed run draw the same
    noise an uninterrupted one would.
    """
    path = Path(adapter_path) / "checkpoints" / "dp_noise_secret"
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if not (text.isdigit() and len(text) == len(str(int(text)))) or int(text) >= 1 << 56:
            raise OndeviceLoraError(
                f"{path}: the DP noise secret is damaged ({text[:20]!r} is not the number this "
                "run drew); a resumed run would add other noise than the interrupted one. "
                "Start the run again in a new adapter folder."
            )
        return int(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = int.from_bytes(os.urandom(7), "little")

    def write(tmp: Path) -> None:
        # Created readable by its owner only, before the secret is in it.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(str(secret))

    write_atomically(path, write)  # whole or absent: a killed run leaves no partial secret
    return secret


def make_dp_step(model, optimizer, settings: DPSettings, expected_batch, secret, start_step):
    """A step(batch, carry, apply) -> (loss, ntoks, None) with trainer.make_step's signature:
    clip per example, sum, add noise, divide by the expected batch size, update.
    The noise of step n is drawn from (secret, n); start_step: steps already done."""
    counter = [start_step]

    def step(batch, carry, apply):
        summed, _, losses, counts = clipped_per_example_grads(model, batch, settings.clip)
        std = settings.noise_multiplier * settings.clip
        counter[0] += 1
        keys = iter(mx.random.split(mx.random.key(secret + counter[0]), len(tree_flatten(summed))))
        noisy = tree_map(
            lambda g: (
                (g + std * mx.random.normal(g.shape, dtype=g.dtype, key=next(keys)))
                / expected_batch
            ),
            summed,
        )
        optimizer.update(model, noisy)
        ntoks = counts.sum()
        trained = (counts > 0).astype(mx.float32)
        # The loss shown is the mean over the sampled examples (it is not private: a user's
        # own view of their run).
        loss = (losses * trained).sum() / mx.maximum(trained.sum(), 1.0)
        return loss, ntoks, None

    return step


def settings_from_config(config, num_examples: int, steps: int) -> DPSettings:
    """DPSettings for a TrainConfig with dp_* set: the noise solved from dp_epsilon if given."""
    from .accountant import noise_for_epsilon

    q = min(1.0, config.batch_size / num_examples)
    sigma = config.dp_noise_multiplier
    if sigma is None:
        sigma = noise_for_epsilon(config.dp_epsilon, q, steps, config.dp_delta)
    return DPSettings(
        noise_multiplier=float(sigma), clip=float(config.dp_clip), sample_rate=q,
        delta=float(config.dp_delta), steps=steps, target_epsilon=config.dp_epsilon,
    )  # fmt: skip


def default_delta(num_examples: int) -> float:
    """A delta well below 1/N, the usual choice: 1 / N^1.1, at most 1e-5."""
    return min(1e-5, 1 / num_examples**1.1) if num_examples > 0 else 1e-5
