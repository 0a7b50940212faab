"""A fast BLAS from PyPI alone: scipy-openblas32 behind the plain `cblas_sgemm` name.

MLX's Linux CPU wheel binds `cblas_sgemm` by its plain name (see fast_blas). PyPI's
scipy-openblas32 wheel, a dependency of ours on Linux, carries an optimised OpenBLAS that needs
nothing from the system, but it exports its functions with a prefix (`scipy_cblas_sgemm`) so
that it cannot clash with another BLAS. This module builds, once per machine, a library of a
few hundred bytes that defines `cblas_sgemm` and forwards every call to the prefixed function,
with the C compiler found on the machine. Preloading it gives MLX the same speed as a system
OpenBLAS, with nothing installed but packages.

The library is cached under $XDG_CACHE_HOME (~/.cache) in a folder named after what it was
built from, so an upgraded scipy-openblas32 gets a new one. No compiler, no build: None, and the
caller carries on with MLX's bundled BLAS.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# The forwarder. Arguments are passed through untouched: the enums are plain ints in both ABIs
# (scipy-openblas32 uses 32-bit integers, like the cblas.h that MLX was built against).
SOURCE = """\
/* ondevice-lora: MLX's cblas_sgemm, served by scipy-openblas32's scipy_cblas_sgemm. */
void scipy_cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float *a, int lda, const float *b, int ldb, float beta, float *c,
                       int ldc);

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc)
{
    scipy_cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""
SHIM_NAME = "libondevice_lora_cblas.so"


def scipy_openblas_library() -> Path | None:
    """The shared library of the installed scipy-openblas32 wheel, or None."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    path = Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"
    return path if path.is_file() else None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ondevice-lora" / "blas"


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def shim_for(library: Path, folder: Path | None = None) -> Path | None:
    """A library defining cblas_sgemm that calls `library`'s scipy_cblas_sgemm: the cached one,
    or one built now. None when no C compiler is found or the build fails."""
    stat = library.stat()
    key = hashlib.sha256(f"{library}\0{stat.st_size}\0{stat.st_mtime_ns}\0{SOURCE}".encode())
    target = (folder or cache_dir()) / key.hexdigest()[:16] / SHIM_NAME
    if target.is_file():
        return target
    compiler = find_compiler()
    if compiler is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source = Path(work) / "shim.c"
        source.write_text(SOURCE)
        built = Path(work) / SHIM_NAME
        command = [
            compiler, "-O2", "-shared", "-fPIC", str(source), "-o", str(built),
            # Link by file name, and find it again at load time from the shim's own entry.
            f"-L{library.parent}", f"-l:{library.name}", f"-Wl,-rpath,{library.parent}",
        ]  # fmt: skip
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
        # Another process may build the same shim at the same time: rename is atomic.
        os.replace(built, target)
    return target


def scipy_openblas_shim() -> str | None:
    """The path of a preloadable library that gives MLX scipy-openblas32's sgemm, or None."""
    library = scipy_openblas_library()
    if library is None:
        return None
    try:
        shim = shim_for(library)
    except OSError:  # an unwritable cache, a full disk: run without it
        return None
    return str(shim) if shim is not None else None
