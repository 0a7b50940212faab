"""Data-parallel training with MLX's ring backend on 127.0.0.1: `--workers 2` trains the same
adapter as one process with the same global batch, the replicas stay identical, and a rank that
dies ends the run promptly with a clear error, after which --resume finishes it.

Each run is real: `ondevice-lora train` processes talking over loopback sockets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from ondevice_lora.training.checkpoint import latest_checkpoint
from ondevice_lora.training.metrics import read_metrics
from ondevice_lora.training.trainer import FAIL_ENV, REPLICA_ENV
from tests.test_resume import REPO, environment, inputs  # noqa: F401 (a fixture)

TOLERANCE = 1e-5
STEPS = 10


def train_args(root, out, *extra) -> list[str]:
    return [
        sys.executable, "-m", "ondevice_lora.launch", "train",
        "--model", str(root / "model"), "--data", str(root / "facts"),
        "--adapter-path", str(out), "--iters", str(STEPS), "--batch-size", "4",
        "--rank", "4", "--learning-rate", "3e-3", "--warmup-steps", "2", "--save-every", "5",
        "--eval-every", "5", "--seed", "1", "--batching", "bucketed", *extra,
    ]  # fmt: skip


def run(args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=REPO, env=environment(**env), capture_output=True, text=True, timeout=300
    )


def adapter(folder) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("single") / "adapter"
    done = run(train_args(inputs, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_workers_train_the_same_adapter_as_one_process(inputs, single, tmp_path):  # noqa: F811
    out, replicas = tmp_path / "adapter", tmp_path / "replicas"
    done = run(train_args(inputs, out, "--workers", "2"), **{REPLICA_ENV: str(replicas)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training with 2 workers" in done.stderr
    rank0 = {k: np.array(v) for k, v in mx.load(str(replicas / "rank0.safetensors")).items()}
    rank1 = {k: np.array(v) for k, v in mx.load(str(replicas / "rank1.safetensors")).items()}
    assert max_difference(rank0, rank1) == 0.0  # the replicas are identical
    difference = max_difference(adapter(out), adapter(single))
    print(f"2 workers vs 1 process, max adapter difference after {STEPS} steps: {difference:.2e}")
    assert difference <= TOLERANCE
    # Metrics are written once (by rank 0), with the global batch's losses.
    ours = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    theirs = [r["loss"] for r in read_metrics(single / "metrics.jsonl") if "loss" in r]
    assert len(ours) == STEPS and np.allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_a_failed_rank_stops_the_run_and_resume_finishes_it(inputs, single, tmp_path):  # noqa: F811
    out = tmp_path / "adapter"
    started = time.monotonic()
    done = run(train_args(inputs, out, "--workers", "2"), **{FAIL_ENV: "1:7"})
    seconds = time.monotonic() - started
    assert done.returncode == 1
    assert "rank 1 of 2 exited with code 3" in done.stderr and "--resume" in done.stderr
    print(f"the run ended {seconds:.1f} s after it started, rank 1 having died after step 7")
    assert seconds < 120
    assert latest_checkpoint(out).name.endswith("5")  # the last checkpoint, intact
    done = run(train_args(inputs, out, "--workers", "2", "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_difference(adapter(out), adapter(single)) <= TOLERANCE


def test_batch_must_split_evenly_over_the_workers():
    from ondevice_lora.errors import OndeviceLoraError
    from ondevice_lora.training import TrainConfig

    with pytest.raises(OndeviceLoraError, match=r"batch_size \(6\) must be a multiple of workers"):
        TrainConfig(data="d", batch_size=6, workers=4).validate()
    with pytest.raises(OndeviceLoraError, match="workers or hostfile, not both"):
        TrainConfig(data="d", workers=2, hostfile="hosts.json").validate()
    TrainConfig(data="d", batch_size=8, workers=4).validate()


@pytest.mark.slow
def test_hostfile_runs_through_mlx_launch(inputs, single, tmp_path):  # noqa: F811
    """--hostfile hands the run to mlx.launch; hosts named 127.0.0.1 run without ssh."""
    hostfile = tmp_path / "hosts.json"
    hosts = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2
    hostfile.write_text(json.dumps(hosts))
    out = tmp_path / "adapter"
    done = run(train_args(inputs, out, "--hostfile", str(hostfile)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_difference(adapter(out), adapter(single)) <= TOLERANCE
