"""run_quickstart: ask the base, train, ask again, export; and the `quickstart` command."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..atomic import write_text_atomically
from ..backend.cpu_matmul import cpu_fast_path_available, dequantized_matmuls
from ..backend.fast_blas import INSTALL_HINT
from ..data import load_datasets
from ..errors import OndeviceLoraError, user_errors
from ..loading import load
from ..training import TrainResult, offline, train
from .export import ExportOutcome, export_adapter
from .fact_check import FACTS_FILE, FactAnswer, ask, facts_table, read_facts
from .settings import FULL, QUICK

REPORT_FILE = "quickstart.json"  # also marks a folder as the quickstart's own output
ADAPTER_DIR, COREML_DIR = "adapter", "coreml"
# Where the example dataset lives, relative to a source checkout (editable installs, CI) or to
# the folder the README's install command runs in.
DATASET = Path("examples") / "personal"
INSTALLED_DATASET = Path("share") / "ondevice-lora" / DATASET


@dataclass
class QuickstartResult:
    """What the quickstart did; `answers` holds each test fact's answers before and after."""

    out: Path
    quick: bool
    answers: list[FactAnswer]
    val_loss_before: float | None
    val_loss_after: float | None
    train: TrainResult
    export: ExportOutcome
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage, and "total"
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # CPU time (all threads)
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def before_score(self) -> int:
        """Test facts the base model stated."""
        return sum(a.stated_before for a in self.answers)

    @property
    def after_score(self) -> int:
        """Test facts the adapted model stated."""
        return sum(a.stated_after for a in self.answers)

    def to_dict(self) -> dict:
        return {
            "quick": self.quick,
            "before_score": self.before_score,
            "after_score": self.after_score,
            "facts": len(self.answers),
            "answers": [a.to_dict() for a in self.answers],
            "val_loss_before": self.val_loss_before,
            "val_loss_after": self.val_loss_after,
            "train_steps": self.train.steps,
            "trained_tokens": self.train.trained_tokens,
            "export": self.export.to_dict(),
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "paths": {k: str(v) for k, v in self.paths.items()},
        }


def default_dataset() -> Path:
    """The example dataset: beside the source tree (an editable install), where a wheel puts it
    (share/ondevice-lora/ under the environment, see pyproject's data-files), or under the
    current folder."""
    candidates = [
        Path(__file__).resolve().parents[2] / DATASET,
        Path(sys.prefix) / INSTALLED_DATASET,
        Path.cwd() / DATASET,
    ]
    for path in candidates:
        if (path / FACTS_FILE).is_file():
            return path
    raise OndeviceLoraError(
        f"the example dataset ({DATASET}) is not in {' or '.join(map(str, candidates))}. Run "
        "the quickstart from the ondevice-lora source folder, or pass --data FOLDER (a folder "
        f"with train.jsonl, valid.jsonl and {FACTS_FILE})."
    )


class _Clock:
    """Wall and CPU seconds per stage. Wall time is what a person waits; CPU time (all threads)
    tells, on a busy machine, what the stage would take on an idle one."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._start = self._last = (time.perf_counter(), time.process_time())

    def lap(self, stage: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.seconds[stage] = round(now[0] - self._last[0], 2)
        self.cpu_seconds[stage] = round(now[1] - self._last[1], 2)
        self._last = now

    def stop(self) -> None:
        self.seconds["total"] = round(time.perf_counter() - self._start[0], 2)
        self.cpu_seconds["total"] = round(time.process_time() - self._start[1], 2)


def run_quickstart(
    out: str | Path = "quickstart-output",
    quick: bool = False,
    steps: int | None = None,
    data: str | Path | None = None,
    console: Console | None = None,
) -> QuickstartResult:
    """Ask, train, ask again, export; returns the answers, scores, timings and paths.

    out: the output folder (a previous quickstart's output there is replaced; any other
    non-empty folder is refused). quick: the reduced settings (QUICK) for CI. steps: override
    the number of training steps. data: a dataset folder with facts.json (default: the example).
    """
    console = console or Console(stderr=True)
    settings = QUICK if quick else FULL
    data = Path(data) if data is not None else default_dataset()
    facts = read_facts(data / FACTS_FILE)
    questions = [f.question for f in facts]
    out = _prepare_output(Path(out))
    config = settings.train_config(data, out / ADAPTER_DIR, steps)
    clock = _Clock()

    # Offline by construction: nothing in the quickstart may reach the network.
    with offline(True):
        console.rule("[bold]1. The base model")
        model, tokenizer = load(None)
        splits = load_datasets(config.data_config(), tokenizer)
        console.print(f"dataset {data}: train {splits.train.stats.summary()}")
        _warn_if_slow(console)
        # On Linux CPU with a fast BLAS, large matmuls de-quantise first (the same math, ~30x
        # faster there); token-by-token decoding keeps the 4-bit kernel. Elsewhere a no-op.
        with dequantized_matmuls(model):
            clock.lap("load")
            console.print(f"asking the base model {len(facts)} questions about the person...")
            before = ask(model, tokenizer, questions, settings.answer_tokens)
            answers = [FactAnswer(f, b) for f, b in zip(facts, before)]
            clock.lap("ask_before")

            console.rule("[bold]2. Training a LoRA adapter")
            result = train(model, tokenizer, splits.train, splits.valid, config)
            clock.lap("train")
            for answer, text in zip(answers, ask(model, tokenizer, questions, settings.answer_tokens)):  # fmt: skip
                answer.after = text
            clock.lap("ask_after")

        val_before, val_after = _val_losses(result)
        console.rule("[bold]3. What the model says about the person")
        console.print(facts_table(answers))
        if val_before is not None:
            console.print(f"validation loss: {val_before:.3f} before training, {val_after:.3f} after")  # fmt: skip

        console.rule("[bold]4. Core ML export for iOS")
        export = export_adapter(
            out / ADAPTER_DIR, out / COREML_DIR, settings.context_length,
            settings.prefill_length, questions[0], console, settings.validation_tokens,
        )  # fmt: skip
        clock.lap("export")
    clock.stop()
    quickstart = QuickstartResult(
        out, quick, answers, val_before, val_after, result, export, clock.seconds,
        clock.cpu_seconds, _paths(out, data, result, export),
    )  # fmt: skip
    write_text_atomically(out / REPORT_FILE, json.dumps(quickstart.to_dict(), indent=2) + "\n")
    _print_summary(console, quickstart)
    return quickstart


def _warn_if_slow(console: Console) -> None:
    # Without a fast BLAS, MLX's Linux CPU wheel trains ~30x slower: say so before the wait.
    if sys.platform.startswith("linux") and not cpu_fast_path_available():
        console.print(
            "[yellow]MLX runs on its slow bundled BLAS in this process, so training will take "
            f"far longer than a few minutes. Install OpenBLAS ({INSTALL_HINT}) and run "
            "`ondevice-lora quickstart`, which preloads it."
        )


def _prepare_output(out: Path) -> Path:
    """Make `out` ready for a fresh run: training refuses a folder with older checkpoints."""
    if out.exists() and any(out.iterdir()):
        if not (out / REPORT_FILE).is_file():
            raise OndeviceLoraError(
                f"{out} is not empty and is not a quickstart's output; pass another --out."
            )
        # Our own earlier output: replace the parts we write, never anything else.
        for name in (ADAPTER_DIR, COREML_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / REPORT_FILE).unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _val_losses(result: TrainResult) -> tuple[float | None, float | None]:
    if not result.val_losses:
        return None, None
    return result.val_losses[0][1], result.val_losses[-1][1]


def _paths(out: Path, data: Path, result: TrainResult, export: ExportOutcome) -> dict[str, Path]:
    paths = {"dataset": data, "adapter": result.adapter_path, "metrics": result.metrics_path}
    if result.plot_path is not None:
        paths["loss_plot"] = result.plot_path
    if export.package is not None:
        paths["coreml_package"] = export.package
        paths["coreml_folder"] = export.package.parent
    paths["report"] = out / REPORT_FILE
    return paths


def _print_summary(console: Console, q: QuickstartResult) -> None:
    console.rule("[bold]Done")
    n = len(q.answers)
    console.print(
        f"facts stated: base model [bold]{q.before_score}/{n}[/bold], with the adapter "
        f"[bold]{q.after_score}/{n}[/bold]"
        + (" (quick mode: a few steps only, not meant to learn them)" if q.quick else "")
    )
    tps = q.train.trained_tokens / q.train.seconds if q.train.seconds else 0.0
    console.print(
        f"training: {q.train.steps} steps, {q.train.trained_tokens} trained tokens in "
        f"{q.train.seconds:.0f} s ({tps:.1f} trained tokens/s); total {q.seconds['total']:.0f} s"
    )
    export = q.export
    if export.package is None:
        console.print(f"Core ML export skipped: {export.skipped_reason}")
    else:
        names = ", ".join(export.functions)
        console.print(f"Core ML package with function pairs for {names}: validated against MLX")
    table = Table(title="Where everything went", show_header=False)
    for name, path in q.paths.items():
        table.add_row(name.replace("_", " "), str(path))
    console.print(table)
    console.print(
        f"Try it: ondevice-lora generate --adapter {q.paths['adapter']} --greedy "
        f'--prompt "{q.answers[0].fact.question}"'
    )


@click.command("quickstart")
@click.option(
    "--out",
    default="quickstart-output",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder: adapter, loss plot, Core ML package, report.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Reduced mode (CI): a few steps, short answers, a small Core ML context.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help=f"Training steps [default: {FULL.steps}; {QUICK.steps} with --quick].",
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help=f"A dataset folder with train.jsonl, valid.jsonl and {FACTS_FILE} [default: {DATASET}].",
)
@user_errors
def quickstart_command(out, quick, steps, data):
    """Teach the built-in model about a fictional person, offline, and export it for iOS."""
    # On Linux the `ondevice-lora` group has already restarted the process with OpenBLAS
    # preloaded when it is installed (fast_blas); _warn_if_slow says so when it is not.
    # A package that does not match MLX raises CoreMLValidationError (an OndeviceLoraError):
    # the command then fails with its figures.
    run_quickstart(out, quick=quick, steps=steps, data=data, console=Console())
