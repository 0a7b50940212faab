"""Fold adapters into their base and save a model folder, measuring first what folding loses.

Fusing into a 4-bit base re-quantises W + ΔW. A typical LoRA update is smaller than one
quantisation step, so rounding can erase most of it and the fused model answers like the base
(mlx-lm issue 1172). Before writing, `fuse` measures the loss two ways and warns past the named
thresholds (MIN_KEPT_SHARE, MAX_EFFECT_ERROR in fuse_report.py), saying what to do instead:

- per layer, the share of the update ΔW that is still in the stored weights;
- on a few sample texts, how far the fused model's logits are from base + adapter.

The folder is mlx-lm's layout (see loading/convert.py), re-quantised with each layer's own group size
and bits, or de-quantised to float16, bfloat16 or float32; mlx-lm and `load` both read it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import click
import mlx.core as mx
import mlx.nn as nn

from ..atomic import atomic_folder
from ..errors import OndeviceLoraError, user_errors
from ..loading import resolve_model_path
from ..loading.convert import (
    DTYPES,
    SAMPLE_TEXTS,
    check_gguf_type,
    check_not_source,
    check_out_folder,
    dequantize_model,
    gguf_type_option,
    is_gguf_file,
    load_source,
    model_quantization,
    output_config,
    output_dtype,
    sample_inputs,
    source_dtype,
    write_model,
    write_model_folder,
)
from .fuse_report import (
    MAX_EFFECT_ERROR,
    MIN_KEPT_SHARE,
    FuseLossWarning,
    FuseReport,
    LayerLoss,
    loss_warnings,
    print_report,
)
from .layers import dense_weight, fold_weight, replace_modules
from .mix import (
    MultiAdapterLinear,
    load_adapters,
    multi_adapter_modules,
    names_for,
    set_active,
)

# The public API; the report's types and thresholds are re-exported so one import serves.
__all__ = [
    "MAX_EFFECT_ERROR",
    "MIN_KEPT_SHARE",
    "FuseLossWarning",
    "FuseReport",
    "LayerLoss",
    "fold_and_measure",
    "fuse",
    "fuse_command",
    "print_report",
]


def fuse(
    model_name: str | os.PathLike | None,
    adapter_paths: Sequence[str | os.PathLike],
    out_folder: str | os.PathLike,
    dequantize: bool | None = None,
    dtype: str | None = None,
    weights: Sequence[float] | None = None,
    force: bool = False,
    samples: Sequence[str] = SAMPLE_TEXTS,
    gguf_type: str | None = None,
) -> FuseReport:
    """Fold adapters into `model_name`'s base (None: the built-in model) and save an mlx-lm
    folder, or one GGUF file when `out_folder` ends in .gguf; returns the report.

    adapter_paths: adapter folders, each checked against the base; several are summed, each
    times its entry in `weights` (default 1), as set_active does. dequantize: None keeps the
    base's format (a quantised base is re-quantised layer by layer with its own settings),
    True writes a dense model, False insists on re-quantising. dtype: float16, bfloat16 or
    float32 for dense weights, scales and biases (default: the source's). Warns with
    FuseLossWarning past MIN_KEPT_SHARE or MAX_EFFECT_ERROR; the folder is written anyway.
    gguf_type: a GGUF file's tensor type (f32, f16, bf16, q8_0, q4_0, q4_1); None keeps each
    layer's own (see converters/formats/gguf_model.py).
    """
    adapter_paths = list(adapter_paths)
    weights = [1.0] * len(adapter_paths) if weights is None else list(weights)
    problems = check_out_folder(out_folder, force) + check_gguf_type(out_folder, gguf_type)
    if not adapter_paths:
        problems.append("nothing to fuse: pass at least one adapter folder (--adapter)")
    if len(weights) != len(adapter_paths):
        problems.append(f"{len(weights)} weights for {len(adapter_paths)} adapters; give one each")
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if problems:
        raise OndeviceLoraError("cannot fuse:\n  " + "\n  ".join(problems))
    if model_name is None:
        from ..loading.defaults import default_model_path

        model_name = default_model_path()
    source = resolve_model_path(model_name)
    check_not_source(out_folder, source, "fuse")
    out = Path(out_folder).resolve()
    for read in (source, *map(Path, adapter_paths)):
        # The output folder is replaced whole: it must not hold what is being read.
        if out in read.resolve().parents:
            raise OndeviceLoraError(
                f"cannot fuse: --out {out_folder} holds {read}; choose another."
            )
    net, tokenizer, config = load_source(source)
    quantised = model_quantization(net) is not None
    if dequantize is False and not quantised:
        raise OndeviceLoraError(
            f"cannot fuse: {source} is not quantised, so there is nothing to re-quantise to. "
            "Fuse without --requantize, then quantise the result with `ondevice-lora convert`."
        )
    dense = not quantised if dequantize is None else dequantize

    names = names_for(adapter_paths)
    active = dict(zip(names, weights))
    load_adapters(net, dict(zip(names, adapter_paths)), tokenizer, active=active)
    # MLX's CPU backend emulates float16 and bfloat16 arithmetic, some 50x slower than float32,
    # so there base and adapted models are evaluated in float32. Casting up is exact: each
    # model still computes with the values it stores. The fused model is evaluated in the dtype
    # it is written in (below): that is the model the user gets.
    compute = mx.float32 if mx.default_device() == mx.cpu else None
    if compute is not None:
        net.set_dtype(compute)
    inputs = sample_inputs(tokenizer, samples)
    dtype_note = None
    if dtype is None:
        dtype, dtype_note = output_dtype(net, source_dtype(config), inputs)
    set_active(net, None)
    base_logits = _logits(net, inputs)
    set_active(net, active)
    adapted_logits = _logits(net, inputs)

    layers, fused = [], {}
    for path, layer in multi_adapter_modules(net).items():
        if not layer.active():
            # Only inactive adapters here (weight 0): re-quantising would just add noise.
            fused[path] = layer.base
            continue
        loss, fused[path] = fold_and_measure(path, layer, dense, getattr(mx, dtype))
        layers.append(loss)
    replace_modules(net, fused)
    if dense:
        dequantize_model(net)  # the layers no adapter touched
    net.set_dtype(getattr(mx, dtype))  # what will be written, and evaluated
    fused_logits = _logits(net, inputs).astype(mx.float32)

    error = mx.linalg.norm(fused_logits - adapted_logits).item()
    effect = mx.linalg.norm(adapted_logits - base_logits).item()
    report = FuseReport(
        out_folder=Path(out_folder),
        dequantized=dense,
        dtype=dtype,
        layers=layers,
        sample_tokens=int(adapted_logits.shape[0]),
        logits_error=error / max(mx.linalg.norm(adapted_logits).item(), 1e-30),
        effect_error=error / effect if effect > 0 else float("nan"),
        warnings=[],
        dtype_note=dtype_note,
        finite=bool(mx.isfinite(fused_logits).all().item()),
    )
    report.warnings = loss_warnings(report)
    for message in report.warnings:
        warnings.warn(message, FuseLossWarning, stacklevel=2)

    quant = None if dense else model_quantization(net)
    fused_config = output_config(config, quant, dtype)
    if is_gguf_file(out_folder):  # one file, written beside --out and renamed into place
        write_model(out_folder, net, tokenizer, fused_config, source, force, gguf_type)
    else:
        # Built beside --out and renamed into place: a failed or killed fuse leaves --out as it was.
        with atomic_folder(out_folder) as tmp:
            write_model_folder(tmp, net, tokenizer, fused_config, source)
    return report


def fold_and_measure(
    path: str, layer: MultiAdapterLinear, dense: bool, dtype: mx.Dtype
) -> tuple[LayerLoss, nn.Module]:
    """Fold the active adapters of `layer` into a plain layer (dense, or re-quantised as its
    base), and measure how much of their update ΔW the stored weights keep (see LayerLoss)."""
    weight = dense_weight(layer.base).astype(mx.float32)
    target = layer.fused_weight()  # float32 W + ΔW: what base + adapters compute
    delta = target - weight
    stored = fold_weight(layer.base, target, dense, dtype)
    # Q(W): the base weight put through the same storage as W + ΔW.
    stored_base = fold_weight(layer.base, weight, dense, dtype)
    realised = dense_weight(stored).astype(mx.float32) - dense_weight(stored_base).astype(
        mx.float32
    )
    delta_sq = mx.sum(delta * delta).item()
    projected = mx.sum(realised * delta).item()
    nan = float("nan")
    loss = LayerLoss(
        path=path,
        kept=projected / delta_sq if delta_sq else nan,
        error=mx.linalg.norm(realised - delta).item() / delta_sq**0.5 if delta_sq else nan,
        relative_size=delta_sq**0.5 / max(mx.linalg.norm(weight).item(), 1e-30),
        projected=projected,
        delta_sq=delta_sq,
    )
    return loss, stored


def _logits(net: nn.Module, inputs: list[mx.array]) -> mx.array:
    """float32 logits of every sample position, stacked: (total tokens, vocab)."""
    logits = mx.concatenate([net(x)[0] for x in inputs]).astype(mx.float32)
    mx.eval(logits)
    return logits


@click.command("fuse")
@click.option(
    "--model",
    "-m",
    "model_name",
    default=None,
    help="Base model: folder, .gguf file or Hub id. Default: the built-in SmolLM2-135M-Instruct.",
)
@click.option("--adapter", "-a", "adapters", multiple=True, help="Adapter folder; repeatable.")
@click.option(
    "--adapter-weight",
    "weights",
    type=float,
    multiple=True,
    help="Weight of each --adapter, in order [default: 1 each].",
)
@click.option(
    "--out",
    "-o",
    required=True,
    help="Output folder (new or empty), or a .gguf file for llama.cpp, Ollama and LM Studio.",
)
@click.option(
    "--dequantize/--requantize",
    default=None,
    help="Write a dense model, or re-quantise to the base's format [default: as the base].",
)
@click.option("--dtype", default=None, help="float16, bfloat16 or float32 [default: source's].")
@click.option("--force", is_flag=True, help="Replace a non-empty --out, all of it.")
@gguf_type_option("each layer as it is: Q4_0/Q4_1/Q8_0 codes kept exactly, the rest float")
@user_errors
def fuse_command(model_name, adapters, weights, out, dequantize, dtype, force, gguf_type):
    """Fold adapters into the base model and save it, reporting what the fold loses."""
    from rich.console import Console

    with warnings.catch_warnings():
        # The report prints each warning itself, with the table.
        warnings.simplefilter("ignore", FuseLossWarning)
        report = fuse(
            model_name,
            adapters,
            out,
            dequantize,
            dtype,
            weights or None,
            force=force,
            gguf_type=gguf_type,
        )
    print_report(report, Console())
    click.echo(f"Wrote {report.out_folder}")
