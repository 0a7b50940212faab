"""Stop training at the first non-finite loss or weight, keeping the last good checkpoint.

A NaN loss, or a NaN or infinite gradient (which the optimiser turns into NaN weights), never
recovers: every later step and the saved adapter would be NaN. The check runs after each
optimiser step and before that step's checkpoint, so the newest checkpoint on disk is the last
good one.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx

from ..errors import OndeviceLoraError
from .checkpoint import latest_checkpoint


class NonFiniteError(OndeviceLoraError):
    """Training produced a NaN or infinite loss or weight."""


def check_step(step: int, loss: float, adapter_weights: dict[str, mx.array], out: Path) -> None:
    """Raise NonFiniteError when step `step`'s loss or any adapter weight is not finite."""
    if math.isfinite(loss):
        finite = [mx.all(mx.isfinite(v)) for v in adapter_weights.values()]
        if not finite or mx.all(mx.stack(finite)).item():
            return
        what = "the adapter weights became NaN or infinite (a non-finite gradient)"
    else:
        what = f"the training loss is {loss}"
    found = latest_checkpoint(out)
    kept = (
        f"the last good checkpoint, {found.name}, is kept: --resume continues from it"
        if found is not None
        else "no checkpoint had been written yet"
    )
    raise NonFiniteError(
        f"{out}: step {step}: {what}, so training stopped; {kept}. Lower the learning rate or "
        "raise warmup_steps, and check the data for extreme examples."
    )
