"""The scipy-openblas32 shim: built with the machine's C compiler, preloaded, it serves MLX's
float32 matmuls with the same results as numpy's, and is found when no system OpenBLAS is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ondevice_lora.backend import blas_shim, fast_blas

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the shim is for MLX's Linux CPU wheel"
)
LIBRARY = blas_shim.scipy_openblas_library()
needs_shim_parts = pytest.mark.skipif(
    LIBRARY is None or blas_shim.find_compiler() is None,
    reason="needs scipy-openblas32 (a Linux dependency) and a C compiler",
)

# Run in a child: a preload only takes at process start. Products of odd shapes and both
# transposes, so every argument of cblas_sgemm is exercised, compared with numpy's BLAS.
CHILD = """
import json, numpy as np, mlx.core as mx
from ondevice_lora.backend.fast_blas import blas_provider
rng = np.random.default_rng(0)
worst = 0.0
for m, k, n in ((1, 7, 3), (65, 33, 17), (300, 200, 100)):
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    expected = a @ b
    # Plain, and from transposed views (MLX passes those to sgemm as transpose flags).
    for got in (mx.array(a) @ mx.array(b), mx.array(a.T).T @ mx.array(b.T).T):
        worst = max(worst, float(np.abs(np.array(got) - expected).max() / np.abs(expected).max()))
print(json.dumps({"provider": blas_provider(), "worst": worst}))
"""


def run_child(preload: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_shim_parts
def test_shim_serves_mlx_matmuls_with_numpy_results(tmp_path):
    shim = blas_shim.shim_for(LIBRARY, tmp_path)
    assert shim is not None and fast_blas.exports_symbol(shim)
    # Built once: a second call finds the cached file rather than compiling again.
    assert blas_shim.shim_for(LIBRARY, tmp_path) == shim
    assert len(list(tmp_path.rglob(blas_shim.SHIM_NAME))) == 1
    preloaded = run_child(str(shim))
    assert preloaded["provider"] == str(shim)
    assert preloaded["worst"] < 1e-5
    # Without the preload MLX uses its bundled BLAS: same products, no provider in scope.
    bundled = run_child(None)
    assert bundled["provider"] is None
    assert bundled["worst"] < 1e-5


@needs_shim_parts
def test_no_compiler_means_no_shim(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    assert blas_shim.find_compiler() is None
    assert blas_shim.shim_for(LIBRARY, tmp_path / "cache") is None
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))


@needs_shim_parts
def test_shim_is_the_fallback_when_no_system_openblas(tmp_path, monkeypatch):
    monkeypatch.setattr(fast_blas, "CANDIDATES", [])
    monkeypatch.delenv(fast_blas.LIBRARY_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    found = fast_blas.find_openblas()
    assert found is not None and found.startswith(str(tmp_path))
    assert fast_blas.exports_symbol(found)
    # An explicit library that is not usable is not silently replaced by the shim.
    monkeypatch.setenv(fast_blas.LIBRARY_ENV, str(tmp_path / "missing.so"))
    assert fast_blas.find_openblas() is None
