"""Training progress in the terminal with rich: step, loss, learning rate, tokens/s, memory, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """A progress bar over the optimiser steps, with the latest figures beside it.

    Messages (evaluations, checkpoints) printed through `log` appear above the bar. On stderr,
    so that stdout stays free for what a command prints as its result.
    """

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.console = Console(stderr=True, quiet=not enabled)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s  "
                "peak {task.fields[mem]}  {task.fields[detail]}"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task(
            "train",
            total=total_steps,
            completed=start_step,
            loss="-",
            lr="-",
            tps="-",
            mem="-",
            detail="",
        )

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def update(
        self, step: int, loss: float, lr: float, tokens_per_s: float, peak_gb: float,
        detail: str = "",
    ):  # fmt: skip
        """detail: more figures for the line (a preference run's accuracy and margin)."""
        self.progress.update(
            self.task,
            completed=step,
            loss=f"{loss:.4f}",
            lr=f"{lr:.2e}",
            tps=f"{tokens_per_s:,.0f}",
            mem=f"{peak_gb:.2f} GB",
            detail=detail,
        )

    def log(self, message: str) -> None:
        self.console.print(message)
