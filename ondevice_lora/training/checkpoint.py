"""Training checkpoints that survive a crash, a closed lid or a killed process.

Layout, under <adapter_path>/checkpoints/:

    step-0000010/adapters.safetensors    trainable (adapter) weights
    step-0000010/optimizer.safetensors   tree_flatten(optimizer.state): moments, step, lr
    step-0000010/state.json              TrainState: step, data position, RNG, losses, best
    latest                               the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, every file fsync'd, and the folder
renamed into place; only then is `latest` replaced (itself written to a temporary file and
renamed). A process killed at any moment leaves either the old or the new checkpoint as latest,
never a half-written one: a temporary folder is never read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from ..atomic import fsync_dir, fsync_file, output_errors, write_text_atomically
from ..errors import OndeviceLoraError, format_list
from ..loading.weights import read_safetensors

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
ADAPTER_FILE = "adapters.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_FILES = (ADAPTER_FILE, OPTIMIZER_FILE, STATE_FILE)
# Test hook: seconds to sleep after each file of a checkpoint is written, so that a test can
# kill the process in the middle of a write.
PAUSE_ENV = "ONDEVICE_LORA_CHECKPOINT_PAUSE"
# Complete checkpoints kept on disk; older ones are removed once a newer one is in place.
KEEP_CHECKPOINTS = 2


class CheckpointError(OndeviceLoraError):
    """A checkpoint is missing, incomplete, or does not fit this run."""


@dataclasses.dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly.

    step: optimiser updates done. data_position: the batch iterator's position (JSON).
    seed: per-step randomness (dropout) is derived from (seed, step), so no RNG stream has to
    be carried; rng_key records the key in use, for inspection. losses: the training loss of
    every step so far; val_losses: [step, loss] pairs. best_*: the best validation loss so far.
    """

    step: int = 0
    data_position: dict | int | None = None
    seed: int = 0
    rng_key: list[int] | None = None
    losses: list[float] = dataclasses.field(default_factory=list)
    val_losses: list[list[float]] = dataclasses.field(default_factory=list)
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    trained_tokens: int = 0
    config: dict = dataclasses.field(default_factory=dict)
    # What the run trained on, so a resume onto another base or other data is refused.
    base_fingerprint: str | None = None
    data_fingerprint: str | None = None

    @classmethod
    def from_dict(cls, data: dict, source) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(f"{source}: unknown keys {format_list(unknown)}.")
        return cls(**data)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def _pause() -> None:
    seconds = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def save_checkpoint(
    adapter_path: str | os.PathLike,
    state: TrainState,
    adapter_weights: dict[str, mx.array],
    optimizer_state: dict,
) -> Path:
    """Write checkpoint `state.step` atomically and point `latest` at it; returns its folder."""
    root = Path(adapter_path) / CHECKPOINTS_DIR
    with output_errors(root):
        root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(state.step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        # A full disk or a folder turned read-only names the checkpoint and keeps the last one.
        with output_errors(final):
            _write_checkpoint(tmp, final, state, adapter_weights, optimizer_state)
            write_text_atomically(root / LATEST_FILE, name + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, keep=name)
    return final


def _write_checkpoint(tmp: Path, final: Path, state, adapter_weights, optimizer_state) -> None:
    tmp.mkdir()
    mx.save_safetensors(str(tmp / ADAPTER_FILE), adapter_weights)
    fsync_file(tmp / ADAPTER_FILE)
    _pause()
    mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer_state)))
    fsync_file(tmp / OPTIMIZER_FILE)
    _pause()
    # state.json last: a folder holding it holds everything.
    (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=1) + "\n")
    fsync_file(tmp / STATE_FILE)
    fsync_dir(tmp)
    if final.exists():  # the same step written again after a resume from an earlier one
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in CHECKPOINT_FILES)


def _prune(root: Path, keep: str) -> None:
    """Remove all but the newest KEEP_CHECKPOINTS checkpoints, and stale temporary folders."""
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-KEEP_CHECKPOINTS]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        # Left by a killed writer; ours was renamed away already.
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(adapter_path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `adapter_path`, or None when there is none.

    Follows `latest`; if that is missing or names an incomplete folder (deleted by hand), the
    highest-numbered complete checkpoint is taken instead.
    """
    root = Path(adapter_path) / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if named.name.startswith("step-") and _complete(named):
            return named
    candidates = sorted(p for p in root.glob("step-*") if _complete(p))
    return candidates[-1] if candidates else None


def load_checkpoint(folder: str | os.PathLike) -> tuple[TrainState, dict, dict]:
    """Read a checkpoint folder: (TrainState, adapter weights, flat optimizer state)."""
    folder = Path(folder)
    if not _complete(folder):
        raise CheckpointError(
            f"{folder}: not a complete checkpoint (expected {', '.join(CHECKPOINT_FILES)})."
        )
    try:
        data = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{folder / STATE_FILE}: not valid JSON at line {e.lineno}: {e.msg}."
        ) from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{folder / STATE_FILE}: not a JSON text ({e}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{folder / STATE_FILE}: expected a JSON object.")
    state = TrainState.from_dict(data, folder / STATE_FILE)
    # Header-checked reads: a damaged file is an error naming it, not a crash inside MLX.
    adapter = read_safetensors(folder / ADAPTER_FILE)
    optimizer = read_safetensors(folder / OPTIMIZER_FILE)
    return state, adapter, optimizer


def restore_optimizer_state(optimizer, parameters: dict, saved: dict, source) -> None:
    """Fill an optimiser's state with `saved` (flat), after checking it fits `parameters`.

    The optimiser is first initialised for `parameters`, so the state has the right tree shape
    (lists for layers, empty entries for frozen ones); then every leaf is replaced by the saved
    value with the same path.
    """
    optimizer.init(parameters)
    expected = dict(tree_flatten(optimizer.state))
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the optimizer state does not fit this model's adapters "
            f"(missing: {format_list(missing) or 'none'}; unexpected: "
            f"{format_list(unexpected) or 'none'}). Was the LoRA configuration changed? "
            "Start a fresh run in another adapter folder."
        )
    optimizer.state = tree_map_with_path(lambda path, _: saved[path], optimizer.state)
    # Marks the optimiser initialised again; leaves the restored values as they are.
    optimizer.init(parameters)
