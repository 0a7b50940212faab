"""A fast BLAS for MLX's Linux CPU wheel: find OpenBLAS and preload it.

MLX's CPU backend does its float32 matrix products through `cblas_sgemm`. The Linux wheel
resolves that symbol to a reference BLAS it bundles, which runs at a few GFLOP/s, where an
optimised BLAS on the same cores runs 10-20x faster. The symbol is bound when MLX is loaded,
from the libraries already in the process's global scope first, so an OpenBLAS that exports
`cblas_sgemm` wins if it is preloaded (`LD_PRELOAD`) before the process starts. Setting the
variable later does nothing, which is why the command line re-executes itself once with it set
(`reexec_with_fast_blas`). Debian and Ubuntu ship one (`apt-get install libopenblas0-pthread`);
without it, PyPI's scipy-openblas32 serves through a small shim (blas_shim.py).

Environment variables:
  ONDEVICE_LORA_FAST_BLAS=0     opt out: never preload, never re-execute.
  ONDEVICE_LORA_BLAS=/path.so   use this library instead of searching the usual places.
macOS (Metal, Accelerate) is never touched.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys
from pathlib import Path

OPT_OUT_ENV = "ONDEVICE_LORA_FAST_BLAS"
LIBRARY_ENV = "ONDEVICE_LORA_BLAS"
# Set on the re-executed process, so that a preload that did not take cannot loop.
REEXEC_MARKER_ENV = "_ONDEVICE_LORA_BLAS_REEXEC"
SYMBOL = "cblas_sgemm"

# Where distributions install an OpenBLAS that exports the plain cblas_* names (Debian and
# Ubuntu's pthread, openmp and serial variants, Fedora, Arch). Without one, PyPI's
# scipy-openblas32 (a dependency on Linux) serves through a forwarding shim (blas_shim.py).
CANDIDATES = [
    f"/usr/lib/{arch}-linux-gnu/openblas-{variant}/libopenblas.so.0"
    for arch in ("x86_64", "aarch64")
    for variant in ("pthread", "openmp", "serial")
] + [
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]

INSTALL_HINT = (
    "apt-get install libopenblas0-pthread, or a C compiler (cc) for the scipy-openblas32 shim"
)


def exports_symbol(path, name: str = SYMBOL) -> bool:
    """True when the ELF shared library at `path` defines the dynamic symbol `name`.

    The file is read, not loaded: loading OpenBLAS would start its thread pool in this process.
    Only 64-bit little-endian ELF (x86-64, arm64) is understood; anything else gives False.
    """
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _defines(data, name.encode())
    except (OSError, ValueError, struct.error, IndexError):
        return False


def _defines(data, wanted: bytes) -> bool:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize.
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 11:  # SHT_DYNSYM
            continue
        str_offset, str_size = sections[link][4], sections[link][5]
        strings = data[str_offset : str_offset + str_size]
        # Not "\0name\0": linkers share tails, so cblas_sgemm may be the end of
        # scipy_cblas_sgemm in the string table (as in blas_shim's library).
        if wanted + b"\0" not in strings:
            return False  # the name is nowhere in the table: quick answer
        for at in range(offset, offset + size, entsize or 24):
            # Elf64_Sym starts with name offset, info, other, section index.
            name_at, _, _, shndx = struct.unpack_from("<IBBH", data, at)
            # Section index 0: an undefined symbol (imported by the library, not provided).
            if shndx != 0 and strings[name_at : name_at + len(wanted) + 1] == wanted + b"\0":
                return True
    return False


def find_openblas() -> str | None:
    """The path of a library exporting cblas_sgemm: $ONDEVICE_LORA_BLAS when set, else a system
    OpenBLAS, else the scipy-openblas32 shim (built on first use); None when there is none."""
    override = os.environ.get(LIBRARY_ENV)
    for path in [override] if override else CANDIDATES:
        if Path(path).is_file() and exports_symbol(path):
            return str(Path(path))
    if override:
        return None
    from .blas_shim import scipy_openblas_shim

    shim = scipy_openblas_shim()
    return shim if shim is not None and exports_symbol(shim) else None


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def blas_provider() -> str | None:
    """The library that MLX's `cblas_sgemm` calls bind to in this process, when it is one in
    the global scope (preloaded or linked into the executable); None means MLX's own bundled
    reference BLAS (Linux only; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(getattr(process, SYMBOL), ctypes.c_void_p).value
        info = _DlInfo()
        if not process.dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
            return None
    except (AttributeError, OSError):
        return None
    return info.dli_fname.decode() if info.dli_fname else None


def fast_blas_active() -> bool:
    """True when MLX's float32 matmuls on this Linux process run through an optimised BLAS."""
    return blas_provider() is not None


def opted_out() -> bool:
    return os.environ.get(OPT_OUT_ENV, "").strip().lower() in ("0", "false", "no", "off")


def preload_env(library: str, env: dict | None = None) -> dict:
    """A copy of `env` (default os.environ) with `library` first in LD_PRELOAD: the environment
    to start a Python process whose MLX uses that BLAS."""
    env = dict(os.environ if env is None else env)
    present = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    env["LD_PRELOAD"] = ":".join([library] + [p for p in present if p != library])
    return env


def reexec_library() -> str | None:
    """The library reexec_with_fast_blas would preload, or None where it would do nothing."""
    if not sys.platform.startswith("linux") or opted_out() or os.environ.get(REEXEC_MARKER_ENV):
        return None
    if fast_blas_active():
        return None
    return find_openblas()


def reexec_with_fast_blas() -> None:
    """Replace this process by itself with OpenBLAS preloaded, when that makes MLX faster.

    Does nothing on macOS, with ONDEVICE_LORA_FAST_BLAS=0, when a BLAS is already in the global
    scope, when no OpenBLAS is installed, or in a process that was already re-executed (the
    marker variable), so it can never loop. Call it first thing in a command-line entry point:
    everything done before it is done twice.
    """
    library = reexec_library()
    if library is None:
        return
    env = preload_env(library)
    env[REEXEC_MARKER_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv keeps the interpreter's own options and `-m module`, so the new process is
    # started exactly as this one was.
    argv = [sys.executable, *sys.orig_argv[1:]]
    os.execve(sys.executable, argv, env)
