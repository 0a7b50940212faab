"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

Each write goes to a temporary name beside the target, is flushed to disk, and is renamed over
the target; the folder is then synced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable
from pathlib import Path

from .errors import OndeviceLoraError

# errno -> what the user is told; the folder named with it says where.
_NO_SPACE = "no space left on the device"
_WRITE_PROBLEMS = {
    errno.ENOSPC: _NO_SPACE,
    errno.EDQUOT: _NO_SPACE + " (the disk quota is used up)",
    errno.EFBIG: _NO_SPACE + " for a file this large (the file-size limit was reached)",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "permission denied (the file system is read-only)",
}


class OutputError(OndeviceLoraError):
    """An output could not be written (disk full, permission denied); names the path."""


def _explain(path: Path, error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno in _WRITE_PROBLEMS:
        return _WRITE_PROBLEMS[error.errno]
    if isinstance(error, OSError):
        return error.strerror or str(error)
    # MLX's writers raise RuntimeError("[write] Unable to write N bytes ...") without errno:
    # find the cause ourselves.
    folder = path.parent if str(path.parent) else Path(".")
    if folder.exists() and not os.access(folder, os.W_OK):
        return "permission denied"
    return f"{_NO_SPACE}, or the file-size limit was reached ({error})"


def is_write_failure(error: BaseException) -> bool:
    """A failure of the disk or its permissions, not of our code: OSError with one of the
    errnos above, or MLX's errno-less RuntimeError from a file it could not open or write."""
    if isinstance(error, OSError):
        return error.errno in _WRITE_PROBLEMS
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "Unable to write" in text or "Unable to open" in text
    )


@contextlib.contextmanager
def output_errors(path: str | os.PathLike):
    """Turn a failed write under `path` into an OutputError that names it and says why, with
    what to do; the caller leaves the previous output as it was."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_write_failure(e):
            raise
        path = Path(path)
        raise OutputError(
            f"{path}: could not write it: {_explain(path, e)}. The previous output there is "
            "unchanged; free some space or choose a folder you can write to, then run the "
            "command again."
        ) from None


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
    remove_stale(path)
    try:
        with output_errors(path):
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


def _to_stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def remove_stale(
    target: str | os.PathLike, say: Callable[[str], object] | None = _to_stderr
) -> list:
    """Remove what a killed run left beside `target`: temporary files and folders whose process
    is gone (names `.{name}.partial-{pid}`, `.{name}.old-{pid}` and `.{stem}.{pid}.tmp{suffix}`).

    Returns the removed paths; `say` (by default a line on stderr) is told about each one, so
    nothing disappears unannounced.
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

    def __init__(self, target: str | os.PathLike, say: Callable[[str], object] | None = _to_stderr):
        self.target = Path(target)
        self.say = say
        self.tmp = self.target.with_name(f".{self.target.name}.partial-{os.getpid()}")

    def __enter__(self) -> Path:
        import shutil

        remove_stale(self.target, self.say)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        with output_errors(self.target):
            self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if is_write_failure(exc):
                with output_errors(self.target):
                    raise exc
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
        except BaseException as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            with output_errors(self.target):
                raise e
