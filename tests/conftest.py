"""The test session runs MLX as the command line does: with a fast BLAS on Linux.

`ondevice-lora` restarts itself once with OpenBLAS preloaded (ondevice_lora/fast_blas.py), since
a preload only takes at process start; pytest does the same here, before it collects anything.
Tests of MLX's own bundled BLAS start child processes without the preload. Set
ONDEVICE_LORA_FAST_BLAS=0 to run the whole suite on the bundled BLAS instead.
"""

from __future__ import annotations

from ondevice_lora.fast_blas import reexec_library, reexec_with_fast_blas


def pytest_configure(config):
    if reexec_library() is None:
        return
    # pytest has pointed file descriptors 1 and 2 at its capture files by now: give them back,
    # or the restarted process would write its whole report into a file nobody reads.
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()
    reexec_with_fast_blas()
