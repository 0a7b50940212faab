"""Learning-rate schedules and optimisers, built from a TrainConfig.

The schedule is a function of the optimiser's step counter, which lives in optimizer.state and
is saved with every checkpoint: a resumed run continues the schedule where it stopped.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


def build_schedule(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    kind: str = "cosine",
    min_learning_rate: float = 0.0,
):
    """A schedule: linear warmup over `warmup_steps`, then cosine decay or constant.

    Cosine decays from `learning_rate` to `min_learning_rate` over the steps left after warmup.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if kind == "cosine":
        decay_steps = max(total_steps - warmup_steps, 1)
        main = optim.cosine_decay(learning_rate, decay_steps, min_learning_rate)
    else:

        def main(step):
            # An array, as MLX's own schedules return: the optimiser casts it to each
            # gradient's dtype, which a Python float cannot do.
            return mx.array(learning_rate, dtype=mx.float32)

    if warmup_steps <= 0:
        return main

    # The optimiser asks for step 0 first. Rising as (step + 1) / warmup_steps makes the first
    # update small (while Adam's moment estimates settle) but not zero, as a ramp from 0 would,
    # and reaches the full rate on the last warmup step.
    def warmup(step):
        return learning_rate * (step + 1) / warmup_steps

    return optim.join_schedules([warmup, main], [warmup_steps])


def build_optimizer(name: str, schedule, weight_decay: float = 0.0) -> optim.Optimizer:
    """AdamW, Adam or SGD over `schedule` (a float or a function of the step)."""
    if name == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=weight_decay)
    if name == "adam":
        # Adam has no weight decay; TrainConfig.validate refuses a nonzero one with it.
        return optim.Adam(learning_rate=schedule)
    if name == "sgd":
        return optim.SGD(learning_rate=schedule, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
