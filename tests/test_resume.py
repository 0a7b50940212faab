"""Checkpoints survive SIGKILL: a killed-and-resumed run equals an uninterrupted one, and a kill
in the middle of a checkpoint write leaves the previous checkpoint as the latest.

Training runs in subprocesses through the command line, killed with SIGKILL like a crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from ondevice_lora.data import DataConfig, load_datasets
from ondevice_lora.loading import load
from ondevice_lora.training import TrainConfig, train
from ondevice_lora.training.checkpoint import (
    PAUSE_ENV,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
)
from ondevice_lora.training.metrics import read_metrics
from tests.hf_fixtures import write_hf_model
from tests.test_training import write_facts

REPO = Path(__file__).resolve().parents[1]
# Weights and losses of the resumed run must match the uninterrupted run's within this.
RESUME_TOLERANCE = 1e-6
TOTAL_STEPS = 24
KILL_AFTER_STEP = 8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_hf_model(root / "model", "llama")
    write_facts(root / "facts")
    return root


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    """A run that exercises everything a resume must restore: dropout (RNG), gradient
    accumulation, warmup and cosine (optimizer step), several epochs (data position)."""
    return [
        sys.executable, "-m", "ondevice_lora.training.cli", "train",
        "--model", str(root / "model"), "--data", str(root / "facts"),
        "--adapter-path", str(out), "--iters", str(TOTAL_STEPS),
        "--batch-size", "2", "--grad-accumulation", "2", "--dropout", "0.1",
        "--rank", "8", "--target-modules", "all-linear", "--learning-rate", "3e-3",
        "--warmup-steps", "3", "--save-every", "4", "--eval-every", "8", "--seed", "3",
        *extra,
    ]  # fmt: skip


def environment(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def run(args: list[str], **env) -> None:
    done = subprocess.run(args, cwd=REPO, env=environment(**env), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def start(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=REPO, env=environment(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended first: {process.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.01)


def sigkill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def checkpoint_step(out: Path) -> int:
    found = latest_checkpoint(out)
    return -1 if found is None else int(found.name.removeprefix("step-"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["packed", "bucketed"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(inputs, tmp_path, batching):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    # max_length 128: two examples per packed row, three batches of two rows per epoch.
    packing = ("--batching", batching, "--max-length", "128")
    run(train_args(inputs, reference, *packing))

    process = start(train_args(inputs, interrupted, *packing))
    wait_for(lambda: checkpoint_step(interrupted) >= KILL_AFTER_STEP, process)
    sigkill(process)
    killed_at = checkpoint_step(interrupted)
    assert KILL_AFTER_STEP <= killed_at < TOTAL_STEPS

    run(train_args(inputs, interrupted, *packing, "--resume"))

    # The same adapters: the best by validation loss, and the last step's.
    for name in ("adapters.safetensors", "last/adapters.safetensors"):
        diff = max_abs_diff(mx.load(str(reference / name)), mx.load(str(interrupted / name)))
        assert diff <= RESUME_TOLERANCE, (name, diff)
    # The same loss at every step, and the same validation losses.
    ref_state, _, ref_optimizer = load_checkpoint(latest_checkpoint(reference))
    new_state, _, new_optimizer = load_checkpoint(latest_checkpoint(interrupted))
    assert new_state.step == ref_state.step == TOTAL_STEPS
    assert len(new_state.losses) == TOTAL_STEPS
    assert max(abs(a - b) for a, b in zip(ref_state.losses, new_state.losses)) <= RESUME_TOLERANCE
    assert [s for s, _ in new_state.val_losses] == [0, 8, 16, 24]
    for (_, a), (_, b) in zip(ref_state.val_losses, new_state.val_losses):
        assert abs(a - b) <= RESUME_TOLERANCE
    assert max_abs_diff(ref_optimizer, new_optimizer) <= RESUME_TOLERANCE
    # metrics.jsonl holds each step once: what the killed run wrote past its checkpoint is
    # replaced by the resumed run's records.
    steps = [r["step"] for r in read_metrics(interrupted / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, TOTAL_STEPS + 1))
    ref_losses = [r["loss"] for r in read_metrics(reference / "metrics.jsonl") if "loss" in r]
    new_losses = [r["loss"] for r in read_metrics(interrupted / "metrics.jsonl") if "loss" in r]
    assert max(abs(a - b) for a, b in zip(ref_losses, new_losses)) <= RESUME_TOLERANCE


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(inputs, tmp_path):
    out = tmp_path / "run"
    args = train_args(inputs, out, "--save-every", "2")
    # The writer sleeps after each file it writes, so the kill lands inside a write.
    process = start(args, **{PAUSE_ENV: "1.0"})
    checkpoints = out / "checkpoints"

    def second_write_started():
        partial = list(checkpoints.glob(".tmp-step-0000004-*"))
        return bool(partial) and (partial[0] / "adapters.safetensors").exists()

    wait_for(second_write_started, process)
    sigkill(process)

    (partial,) = checkpoints.glob(".tmp-step-0000004-*")
    assert not (partial / "state.json").exists()  # really cut off in the middle
    latest = latest_checkpoint(out)
    assert latest == checkpoints / "step-0000002"
    state, adapters, optimizer = load_checkpoint(latest)
    assert state.step == 2 and state.data_position is not None and len(state.losses) == 2
    assert adapters and optimizer

    # Resuming takes it (iters may change on resume): one more step, and the debris is gone.
    run(train_args(inputs, out, "--save-every", "2", "--iters", "3", "--resume"))
    assert latest_checkpoint(out) == checkpoints / "step-0000003"
    assert load_checkpoint(latest_checkpoint(out))[0].losses[:2] == state.losses
    assert not list(checkpoints.glob(".tmp-*"))


def test_resume_refuses_another_run_and_a_fresh_run_refuses_old_checkpoints(inputs, tmp_path):
    model_folder = inputs / "model"
    out = tmp_path / "run"

    def run_in_process(data: Path, **settings):
        model, tokenizer = load(model_folder)
        splits = load_datasets(DataConfig(data), tokenizer)
        config = TrainConfig(adapter_path=str(out), iters=2, save_every=1, eval_every=0, **settings)
        return train(model, tokenizer, splits.train, None, config, show_progress=False)

    run_in_process(inputs / "facts")
    with pytest.raises(CheckpointError, match="--resume"):
        run_in_process(inputs / "facts")
    with pytest.raises(CheckpointError, match=r"changed settings \(rank: 8 -> 4"):
        run_in_process(inputs / "facts", resume=True, rank=4)
    other = write_facts(tmp_path / "other", repeats=2)
    with pytest.raises(CheckpointError, match="training data is not the one"):
        run_in_process(other, resume=True)
    # The same run resumes (and, being finished, only saves its adapter again).
    assert run_in_process(inputs / "facts", resume=True).resumed_from == 2
