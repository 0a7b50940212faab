"""The one place that pins how every Core ML package of ours is built.

Every program is an ML program at opset iOS 18 (states, int4 per-block weights,
scaled_dot_product_attention and multifunction packages all need it), converted with the same
options. Programs are built directly in their compute dtype (see PRECISIONS), so conversion is
told to leave dtypes alone rather than insert its own fp16 casts.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass

import coremltools as ct
import numpy as np
from coremltools.converters.mil.mil import Program, types

OPSET = ct.target.iOS18
MINIMUM_DEPLOYMENT_TARGET = ct.target.iOS18
# Core ML states may only hold fp16 tensors.
STATE_DTYPE = types.fp16


@dataclass(frozen=True)
class Precision:
    """How an export stores weights and computes: dtype of activations, weights as int4 or not."""

    name: str
    dtype: type  # MIL dtype of activations, norms, biases and logits
    np_dtype: type  # the same as a numpy dtype
    int4: bool  # linear and embedding weights as 4-bit codes

    @property
    def split_cache(self) -> bool:
        """fp32 keeps the fp16 rounding residual of the KV cache in extra states."""
        return self.dtype == types.fp32


PRECISIONS = {
    "fp32": Precision("fp32", types.fp32, np.float32, int4=False),
    "fp16": Precision("fp16", types.fp16, np.float16, int4=False),
    "int4": Precision("int4", types.fp16, np.float16, int4=True),
}


def get_precision(name: str) -> Precision:
    """The Precision called `name`, or a ValueError listing the choices."""
    if name not in PRECISIONS:
        raise ValueError(
            f"precision {name!r} is not supported; choose one of {', '.join(PRECISIONS)}"
        )
    return PRECISIONS[name]


def can_run_models() -> bool:
    """Whether this machine can load and run Core ML models (macOS only)."""
    return platform.system() == "Darwin"


def convert_program(program: Program) -> ct.models.MLModel:
    """Convert a MIL program with our pinned settings into an (unsaved) MLModel.

    compute_precision FLOAT32 means "keep the program's own dtypes": fp16 programs are already
    fp16, and fp32 programs must stay fp32 to match MLX to 1e-4.
    """
    with quiet_progress():
        return ct.convert(
            program,
            convert_to="mlprogram",
            minimum_deployment_target=MINIMUM_DEPLOYMENT_TARGET,
            compute_precision=ct.precision.FLOAT32,
            # Loading needs the Core ML framework, which exists only on macOS.
            skip_model_load=not can_run_models(),
            pass_pipeline=pass_pipeline(),
        )


def pass_pipeline() -> ct.PassPipeline:
    """Only coremltools' clean-up passes (dead code, constants, casts, names).

    Our programs are built op by op already in the form we want; the default pipeline's fusions
    would only rewrite them (more to validate, seconds per conversion) and could change what
    fp16 rounds where. The validator reads the saved package, so it checks what really ships.
    The clean-up includes common::remove_redundant_ops, which is safe here only because every
    state is read once per function (see build.Step).
    """
    return ct.PassPipeline.CLEANUP


@contextlib.contextmanager
def quiet_progress():
    """Silence coremltools' per-pass progress bars (dozens of lines per conversion).

    They come from the `tqdm` its pass manager imported; if a coremltools version moves it,
    the bars simply show again.
    """
    from coremltools.converters.mil.mil.passes import pass_pipeline as manager

    original = getattr(manager, "tqdm", None)
    if original is None:
        yield
        return

    def silent(iterable, *args, **kwargs):
        return iterable

    manager.tqdm = silent
    try:
        yield
    finally:
        manager.tqdm = original
