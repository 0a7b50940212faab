"""One training run per adapter folder: a lock file held for the whole run.

Two runs writing one folder would interleave their metrics and leave one run's adapter beside
the other's checkpoints. The lock is an advisory `flock` on <adapter_path>/.train.lock, which
the kernel releases when the process ends however it ends, so a killed run never leaves the
folder locked; the file records the holder's process id for the second run's message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ..atomic import output_errors
from ..errors import OndeviceLoraError

LOCK_FILE = ".train.lock"


class FolderInUseError(OndeviceLoraError):
    """Another training run holds the adapter folder."""


@contextlib.contextmanager
def training_lock(folder, enabled: bool = True):
    """Hold `folder`'s training lock for the `with` block; raise FolderInUseError, naming the
    other process, when another run holds it. enabled=False (ranks that write nothing) skips."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    path = folder / LOCK_FILE
    with output_errors(path):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise FolderInUseError(
                f"{folder}: another training run (process {holder}) is writing to this folder. "
                "Wait for it to finish or stop it, or train into another --adapter-path."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
