"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

Each write goes to a temporary name beside the target, is flushed to disk, and is renamed over
the target; the folder is then synced so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import re
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale(target: str | os.PathLike, say: Callable[[str], object] | None = None) -> list:
    """Remove what a killed run left beside `target`: temporary files and folders whose process
    is gone (names `.{name}.partial-{pid}`, `.{name}.old-{pid}` and `.{stem}.{pid}.tmp{suffix}`).

    Returns the removed paths; `say` (e.g. a print to stderr) is told about each one.
    """
    import shutil

    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return []
    patterns = (
        f".{target.name}.partial-*",
        f".{target.name}.old-*",
        f".{target.stem}.*.tmp{target.suffix}",
    )
    removed = []
    for pattern in patterns:
        for path in parent.glob(pattern):
            match = re.search(r"(?:partial|old)-(\d+)$|\.(\d+)\.tmp", path.name)
            if match is None:
                continue
            pid_text = match.group(1) or match.group(2)
            if _pid_alive(int(pid_text)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
            if say is not None:
                say(f"Removed {path}, left by an interrupted run (process {pid_text}).")
    return removed


class atomic_folder:
    """Build a folder beside `target`, then put it in place whole: readers see the old folder or
    the complete new one, never a mix.

        with atomic_folder("out/adapter") as tmp:
            write everything into tmp        # validate here too: an error leaves out/ as it was

    On success the finished folder replaces `target` (an existing one is moved aside, then
    removed: two renames, so for a moment no folder is at `target`, but never a torn one). On an
    error, or a kill, the temporary folder is removed now or by the next run on the same target.
    """

    def __init__(self, target: str | os.PathLike, say: Callable[[str], object] | None = None):
        self.target = Path(target)
        self.say = say
        self.tmp = self.target.with_name(f".{self.target.name}.partial-{os.getpid()}")

    def __enter__(self) -> Path:
        import shutil

        remove_stale(self.target, self.say)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            for path in self.tmp.rglob("*"):
                if path.is_file():
                    fsync_file(path)
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            if self.target.is_dir() and not self.target.is_symlink():
                os.replace(self.target, old)
                os.replace(self.tmp, self.target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                if self.target.exists() or self.target.is_symlink():
                    self.target.unlink()
                os.replace(self.tmp, self.target)
            fsync_dir(self.target.parent)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
