"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

Each write goes to a temporary name beside the target, is flushed to disk, and is renamed over
the target; the folder is then synced so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    # Makes a rename inside `path` durable; not every platform can open a folder.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_path)`, then move the finished file to `path`.

    The temporary name keeps `path`'s suffix last, because some writers (mx.save_safetensors)
    append their own suffix to a name without it. On any error the temporary file is removed
    and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
