"""Data-parallel training over MLX's own distributed layer (`mx.distributed`, ring backend).

One code path: a single process is a group of size 1. With N ranks, every rank builds the same
global batch and trains on its own rows of it (`shard`); the compiled step sums gradients, loss
and token counts over the ranks (`all_sum`) before dividing, so the update is the one a single
process would make with the whole batch, and every replica stays identical. Rank 0 alone writes
files.

`run_local_workers` starts N ranks on this machine, wired by a ring hostfile of 127.0.0.1
ports, and watches them: if one dies, the others are stopped at once (a ring collective would
otherwise wait forever for the missing peer) and the error names the rank. `run_hostfile`
hands a multi-machine run to `mlx.launch` with the user's hostfile.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from ..errors import OndeviceLoraError

# Set on the processes this module starts, so a rank does not start workers of its own.
WORKER_ENV = "ONDEVICE_LORA_WORKER"
# How long the surviving ranks get to exit after one failed, before they are killed.
STOP_GRACE_SECONDS = 5.0


class DistributedError(OndeviceLoraError):
    """A rank of a distributed run failed, or the run could not start."""


class _SingleProcess:
    """Stands in for mx.distributed.Group when not launched: rank 0 of 1."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


def launched() -> bool:
    """True in a process started as a rank (by us or by mlx.launch)."""
    return "MLX_RANK" in os.environ and bool(os.environ.get("MLX_HOSTFILE"))


def init_group():
    """The run's group: the ring group when launched as a rank, else a group of one.

    The backend is named explicitly: with OpenMPI installed, `init()` with any backend would
    start MPI's daemon, listening on every interface.
    """
    if not launched():
        return _SingleProcess()
    try:
        return mx.distributed.init(strict=True, backend="ring")
    except RuntimeError as e:
        raise DistributedError(
            f"could not join the distributed run as rank {os.environ['MLX_RANK']} "
            f"(hostfile {os.environ['MLX_HOSTFILE']}): {e}"
        ) from None


def shard(batch: tuple, group) -> tuple:
    """This rank's rows of a global batch: arrays (B, ...) -> (B / size, ...)."""
    size = group.size()
    if size == 1:
        return batch
    rows = batch[0].shape[0] // size
    start = group.rank() * rows
    return tuple(a[start : start + rows] for a in batch)


def all_sum(tree, group):
    """Sum arrays (a tree of them) over the ranks; the identity for one process."""
    if group.size() == 1:
        return tree
    from mlx.utils import tree_map

    return tree_map(lambda a: mx.distributed.all_sum(a, group=group), tree)


# --- starting ranks ------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code}"


def worker_env(rank: int, workers: int, hostfile) -> dict:
    """The environment of local rank `rank`: its place in the ring, and its share of the cores.

    Ranks on one machine share its cores; each BLAS sizing its thread pool for all of them
    would oversubscribe the machine `workers` times over, so each gets cores / workers threads
    (unless the user chose a count).
    """
    env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), WORKER_ENV: "1"}
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        env.setdefault(name, threads)
    return env


def run_local_workers(argv: list[str], workers: int, adapter_path) -> None:
    """Run `ondevice-lora <argv>` as `workers` ranks on 127.0.0.1; return when all succeed.

    Raises DistributedError, naming the rank, as soon as one fails; the others are stopped.
    """
    ports = _free_ports(workers)
    hostfile = Path(tempfile.mkdtemp(prefix="ondevice-lora-ring-")) / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    command = [sys.executable, "-m", "ondevice_lora.launch", *argv]
    processes = [
        subprocess.Popen(command, env=worker_env(rank, workers, hostfile))
        for rank in range(workers)
    ]
    failed = None
    try:
        while failed is None and any(p.poll() is None for p in processes):
            failed = next(
                ((r, p.returncode) for r, p in enumerate(processes) if p.poll() not in (None, 0)),
                None,
            )
            time.sleep(0.1)
        if failed is None:
            failed = next(
                ((r, p.returncode) for r, p in enumerate(processes) if p.returncode != 0), None
            )
    finally:
        _stop(processes)
        hostfile.unlink(missing_ok=True)
        hostfile.parent.rmdir()
    if failed is not None:
        rank, code = failed
        raise DistributedError(
            f"rank {rank} of {workers} {_describe(code)}; the other ranks were stopped. "
            f"The newest complete checkpoint in {adapter_path} is intact: run the same command "
            "with --resume to continue from it."
        )


def _stop(processes) -> None:
    """Ask the ranks still running to stop, then kill those that do not within the grace."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for p in processes:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_hostfile(argv: list[str], hostfile) -> None:
    """Run `ondevice-lora <argv>` on the machines of an mlx.launch hostfile (ring backend).

    Each machine needs the same Python environment at the same path (sys.executable), this
    package installed, and the data and model at the same paths; mlx.launch reaches them by ssh.
    """
    if not Path(hostfile).is_file():
        raise DistributedError(f"{hostfile}: no such hostfile (mlx.launch's JSON format).")
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.is_file():
        raise DistributedError(f"mlx.launch is not installed beside {sys.executable}.")
    command = [
        str(launcher), "--backend", "ring", "--hostfile", str(hostfile),
        "--python", sys.executable, "--env", f"{WORKER_ENV}=1", "--",
        "-m", "ondevice_lora.launch", *argv,
    ]  # fmt: skip
    code = subprocess.call(command)
    if code != 0:
        raise DistributedError(
            f"the distributed run over {hostfile} {_describe(code)}; see the ranks' output "
            "above. Run the same command with --resume to continue from the newest checkpoint."
        )
