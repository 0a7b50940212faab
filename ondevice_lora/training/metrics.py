"""Metrics beside the adapter: one JSON object per line (metrics.jsonl), and a loss-curve PNG.

Training records look like {"step": 12, "loss": 2.31, "learning_rate": ..., ...}; validation
records like {"step": 10, "val_loss": 2.5, "val_perplexity": 12.2}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import output_errors, write_atomically, write_text_atomically

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every record of a metrics.jsonl file ([] when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a killed process ends the readable part
    return records


class MetricsWriter:
    """Appends records to metrics.jsonl, each line flushed as it is written.

    resume_step: on resume, records after this step (written by the interrupted run after its
    last checkpoint) are dropped first, since the resumed run writes them again. enabled=False
    writes nothing (the ranks of a distributed run other than rank 0).
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, enabled=True):
        self.path = Path(path)
        self._file = None
        if not enabled:
            return
        with output_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.path.write_text("")
            else:
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
                write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._file is not None:
            with output_errors(self.path):
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plot_losses(records: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Draw training loss per step and validation loss at each evaluation into a PNG."""
    import matplotlib

    # Agg renders to files only: no display needed, and no window pops up mid-training.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train), label="training loss", linewidth=1)
        if valid:
            ax.plot(*zip(*valid), "o-", label="validation loss", linewidth=1.5)
        ax.set_xlabel("step")
        preference = any("accuracy" in r for r in records)
        ax.set_ylabel("loss (DPO/ORPO, per pair)" if preference else "loss (cross-entropy per trained token)")  # fmt: skip
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()
        if preference:
            # DPO/ORPO: the share of pairs whose chosen reply wins, on a 0-1 axis of its own.
            right = ax.twinx()
            for key, style in (("accuracy", ":"), ("val_accuracy", "s--")):
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:
                    right.plot(*zip(*points), style, label=key.replace("_", " "), color="tab:green")
            right.set_ylim(-0.02, 1.02)
            right.set_ylabel("accuracy (chosen preferred)")
            extra = right.get_legend_handles_labels()
            handles = (handles[0] + extra[0], handles[1] + extra[1])
        ax.legend(*handles)
        fig.tight_layout()
        path = Path(path)
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path
