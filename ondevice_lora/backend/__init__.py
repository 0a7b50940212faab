"""The Linux CPU path: what makes MLX's CPU wheel usable for training. Nothing here acts on macOS.

fast_blas.py restarts the process with an optimised BLAS preloaded (blas_shim.py builds the
adapter to scipy-openblas32 when no system OpenBLAS is found); cpu_matmul.py de-quantises 4-bit
weights once per step and multiplies in fp32; cpu_attention.py computes causal attention in
query blocks. On Metal none of it is used. This package imports no MLX at the top, so the
restart happens before the heavy imports.
"""

from .fast_blas import fast_blas_active, reexec_with_fast_blas

__all__ = ["fast_blas_active", "reexec_with_fast_blas"]
