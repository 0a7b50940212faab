"""Export an MLX decoder (optionally with its LoRA adapter) to one stateful Core ML package.

The package contract (format_version 1); the validator and the iOS app rely on every line:

Package: one ``.mlpackage`` (ML program, iOS 18 / macOS 15) with two functions sharing weights
and states, built by ``ct.utils.save_multifunction``; the default function is ``decode``.

- ``prefill``: ``input_ids`` int32 (1, prefill_length); a prompt is fed in chunks of
  prefill_length tokens, the last chunk padded at its end with any id (0). The app keeps the
  logits of real tokens only; padded positions write keys and values past the prompt, which the
  next call overwrites before any query may see them.
- ``decode``: ``input_ids`` int32 (1, 1), one token.
- Both: ``position`` int32 (1,): the number of tokens already in the cache, i.e. the position of
  input_ids[0, 0]. The caller must keep position + L <= context_length.
- States (read once per function, updated in place, written back once at the end):
  ``key_cache`` and ``value_cache``, fp16, shape (num_layers, num_kv_heads, context_length,
  head_dim), all layers in one state each. Keys are stored after the rotary embedding (and
  after Qwen3's q/k norm). fp32 exports add ``key_cache_low`` and ``value_cache_low`` of the same
  shape holding the fp16 rounding residual (x - fp16(x)): fp16(x) + low keeps about 22 bits,
  so an fp32 export matches MLX in fp32 (Core ML states can only be fp16).
- Output: ``logits`` (1, L, vocab_size); fp16 for int4 and fp16 exports, fp32 for fp32.
- Attention: query i (0-based within the call) sees cache entries at index <= position + i;
  the mask is built in the graph from ``position``; grouped-query heads share their KV head
  (query head h uses KV head h // (num_heads / num_kv_heads), as in Hugging Face).

Precision: "fp32" (fp32 weights and compute), "fp16" (fp16 weights and compute), "int4" (fp16
compute; every linear weight and the embedding stored as codes with a per-block fp16 scale
and offset, ``constexpr_blockwise_shift_scale``: W = scale * (code - offset), MLX's affine
grid with offset = -bias / scale, block = (1, group_size)). Codes are uint4, except that a
base layer MLX holds at 8 bits (a GGUF Q8_0 embedding) keeps its uint8 codes: re-quantising
it would change the model. Norms and biases stay fp16.

Adapters: fp16/fp32 exports merge LoRA/DoRA into the (de-quantised) weights. int4 exports keep
the base's 4-bit codes untouched and add the adapter as an unmerged branch,
``linear(x, W) + scale * matmul(matmul(x, A^T), B^T)`` (DoRA: times its per-row factor).

User-defined metadata (strings): ``ondevice_lora.format_version`` ("1"),
``ondevice_lora.context_length``, ``ondevice_lora.prefill_length``, ``ondevice_lora.precision``,
``ondevice_lora.model_type``, ``ondevice_lora.base_fingerprint`` (JSON of base_fingerprint()),
``ondevice_lora.adapter_config`` (JSON of the adapter's config, or "null"),
``ondevice_lora.adapter_mode`` ("none", "merged" or "unmerged"). Inputs, outputs and states
carry a shortDescription in every function.

In the package's own side folder, ``DIR/x-tokenizer/`` for ``DIR/x.mlpackage`` (placement.py):
tokenizer.json, tokenizer_config.json, special_tokens.json (bos/eos/pad ids, special token
strings, chat template, context and prefill lengths) and config.json (the model's
configuration: swift-transformers' AutoTokenizer.from(modelFolder:) refuses a folder without
one). Each package has its own, so exports into one folder never overwrite each other.

fp16 arithmetic (int4 and fp16 exports): the exporter first runs the model in float32 on
calibration text and, where the residual stream would pass 1/16 of fp16's maximum, carries it
divided by a power of two (fp16_range.py); the norms cannot overflow whatever their input
(build.convert_norm). ``ondevice_lora.residual_scale`` records the factor.

Multifunction and swappable packages (multifunction.py, swappable.py) follow the same contract,
with other function names and, for swappable ones, more inputs; APP_METADATA_KEYS are in every
package, since the iOS app reads them whichever kind it loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import coremltools as ct
import numpy as np
from coremltools.converters.mil.mil import Program

from ondevice_lora.adapters.files import LoraConfig
from ondevice_lora.adapters.fingerprint import base_fingerprint
from ondevice_lora.adapters.layers import adapter_modules
from ondevice_lora.atomic import write_text_atomically
from ondevice_lora.errors import OndeviceLoraError

from .build import DecoderWeights, LinearWeights, QuantizedWeight, build_program
from .fp16_range import DEFAULT_FIT, FitReport, Fp16Fit, fit_fp16
from .mil_storage import DECODE_FUNCTION, METADATA_PREFIX, PREFILL_FUNCTION
from .placement import Staging, relocate_reports, staged_export, tokenizer_folder
from .settings import convert_program, get_precision, quiet_progress
from .weights import decoder_weights

FORMAT_VERSION = "1"
SPECIAL_TOKENS_FILE = "special_tokens.json"
MODEL_CONFIG_FILE = "config.json"
# Metadata keys (after METADATA_PREFIX) that the iOS app reads (examples/ios): in every package.
APP_METADATA_KEYS = ("context_length", "base_fingerprint")

DESCRIPTIONS = {
    "input_ids": "Token ids, int32 (1, L): L = {prefill} in prefill (pad the last chunk at its "
    "end; ignore the logits of padding), 1 in decode.",
    "position": "int32 (1,): the number of tokens already in the KV cache, i.e. the position of "
    "input_ids[0, 0]. Keep position + L <= {context}.",
    "logits": "Next-token logits (1, L, vocab) for every input position.",
    "key_cache": "Keys of every layer after the rotary embedding, (layers, kv_heads, {context}, "
    "head_dim).",
    "value_cache": "Values of every layer, (layers, kv_heads, {context}, head_dim).",
    "key_cache_low": "fp16 rounding residual of key_cache: keys = key_cache + key_cache_low.",
    "value_cache_low": "fp16 rounding residual of value_cache.",
}


class CoreMLExportError(OndeviceLoraError):
    """An export was asked for with settings that cannot work."""


@dataclass
class ExportResult:
    """What export_coreml wrote. weight_bytes is what the weights need at their stored width
    (4-bit codes count half a byte); package_bytes is the package's size on disk."""

    path: Path
    precision: str
    context_length: int
    prefill_length: int
    package_bytes: int
    weight_bytes: int
    adapter_mode: str
    seconds: float
    files: list[Path] = field(default_factory=list)
    fit: FitReport | None = None  # the fp16 range measured and the residual scale chosen
    validation: object = None  # what the export's check returned (validation reports)

    def summary(self) -> str:
        mb = 1024 * 1024
        overhead = self.package_bytes / self.weight_bytes - 1 if self.weight_bytes else 0.0
        return (
            f"{self.path}: {self.package_bytes / mb:.2f} MiB on disk, weights "
            f"{self.weight_bytes / mb:.2f} MiB ({self.precision}, {overhead:+.1%} for the program "
            f"and layout), context {self.context_length}, prefill chunks of "
            f"{self.prefill_length}, adapter {self.adapter_mode}, built in {self.seconds:.1f} s"
        )


def export_coreml(
    model,
    tokenizer,
    out_path,
    precision: str = "int4",
    context_length: int = 512,
    adapter_config: dict | LoraConfig | None = None,
    fingerprint: dict | None = None,
    prefill_length: int = 32,
    group_size: int = 32,
    fit: Fp16Fit | None = DEFAULT_FIT,
    check: Callable[[Path], object] | None = None,
    keep_failed: bool = False,
) -> ExportResult:
    """Export `model` (ours, with or without adapters) to the package described above.

    tokenizer: written into the package's side folder (None writes no side files).
    adapter_config: the adapter's settings (a LoraConfig or its to_dict()), for the metadata.
    fingerprint: the base's base_fingerprint(); computed from model and tokenizer when None.
    group_size: the block width when an int4 export quantises a layer whose codes it cannot
    keep (see weights.quantize_for_int4, which makes the matching MLX reference).
    fit: how an int4/fp16 export fits fp16 (None: build the weights as they are).
    check(staged package path): run on the built package before it is moved to out_path, e.g.
    a validation; a CoreMLValidationError leaves out_path as it was (keep_failed: the package
    is kept at out_path + ".failed"). Its result is the ExportResult's `validation`.
    Raises CoreMLExportError for settings that cannot work.
    """
    start = time.perf_counter()
    out_path = Path(out_path)
    check_settings(out_path, context_length, prefill_length)
    p, w = precision_weights(model, out_path, precision, context_length, group_size)
    adapters = adapter_modules(model)
    mode = "none" if not adapters else "unmerged" if p.int4 else "merged"
    if fingerprint is None:
        fingerprint = base_fingerprint(model, tokenizer)
    if isinstance(adapter_config, LoraConfig):
        adapter_config = adapter_config.to_dict()
    w, fitted = fit_fp16(model, tokenizer, w, fit)
    metadata = common_metadata(model, precision, context_length, prefill_length, fingerprint)
    metadata["adapter_config"] = json.dumps(adapter_config, sort_keys=True)
    metadata["adapter_mode"] = mode
    metadata["residual_scale"] = str(w.residual_scale)
    programs = {
        PREFILL_FUNCTION: build_program(w, prefill_length),
        DECODE_FUNCTION: build_program(w, 1),
    }
    with staged_export(out_path, keep_failed) as staging:
        files = save_staged(staging, programs, metadata, tokenizer, model, context_length)
        validation = None if check is None else check(staging.package)
    return ExportResult(
        path=out_path,
        precision=precision,
        context_length=context_length,
        prefill_length=prefill_length,
        package_bytes=folder_bytes(out_path),
        weight_bytes=weight_bytes(w),
        adapter_mode=mode,
        seconds=time.perf_counter() - start,
        files=files,
        fit=fitted,
        validation=relocate_reports(validation, out_path),
    )


def save_staged(
    staging: Staging,
    programs: dict,
    metadata: dict[str, str],
    tokenizer,
    model,
    context_length: int,
    **package_options,
) -> list[Path]:
    """Save the package and its side files into `staging`; returns the side files by the paths
    they will have once in place."""
    save_package(programs, staging.package, metadata, scratch=staging.scratch, **package_options)
    prefill_length = int(metadata["prefill_length"])
    written = write_side_files(
        tokenizer, staging.tokenizer, staging.out_path.name, context_length, prefill_length, model
    )
    final = tokenizer_folder(staging.out_path)
    return [final / f.name for f in written]


def common_metadata(
    model, precision: str, context_length: int, prefill_length: int, fingerprint: dict
) -> dict[str, str]:
    """The metadata every package of ours carries (APP_METADATA_KEYS among it)."""
    return {
        "format_version": FORMAT_VERSION,
        "context_length": str(context_length),
        "prefill_length": str(prefill_length),
        "precision": precision,
        "model_type": model.args.model_type,
        "base_fingerprint": json.dumps(fingerprint, sort_keys=True),
    }


def check_settings(out_path: Path, context_length: int, prefill_length: int) -> None:
    """Raise one CoreMLExportError listing every problem with the output path and lengths."""
    problems = []
    if out_path.suffix != ".mlpackage":
        problems.append(f"the output must end in .mlpackage, got {out_path.name!r}")
    if out_path.exists() and not (out_path / "Manifest.json").is_file():
        problems.append(f"{out_path} exists and is not a Core ML package; it will not be replaced")
    if not isinstance(context_length, int) or context_length < 2:
        problems.append(f"context_length must be an integer >= 2, got {context_length!r}")
    elif not isinstance(prefill_length, int) or not 1 <= prefill_length <= context_length:
        problems.append(
            f"prefill_length must be an integer in [1, context_length={context_length}], "
            f"got {prefill_length!r}"
        )
    if problems:
        raise CoreMLExportError("cannot export to Core ML:\n  - " + "\n  - ".join(problems))


def precision_weights(
    model, out_path: Path, precision: str, context_length: int, group_size: int
) -> tuple:
    """(Precision, DecoderWeights) of `model` for an export at `precision`; a precision this
    model cannot take (an unknown name, a layer it cannot quantise) is a CoreMLExportError."""
    try:
        p = get_precision(precision)
        return p, decoder_weights(model, p, context_length, group_size)
    except ValueError as e:
        raise CoreMLExportError(f"cannot export to {out_path}: {e}") from None


def require_plain_base(model, exporter: str, adapters_as: str) -> None:
    """Exports that add adapters themselves refuse a model that already carries some."""
    if adapter_modules(model):
        raise CoreMLExportError(
            f"{exporter} takes the plain base model, without adapters; give them as {adapters_as}."
        )


def save_package(
    programs: dict[str, Program | Callable[[], Program]],
    out_path: Path,
    metadata: dict[str, str],
    default_function: str = DECODE_FUNCTION,
    descriptions: dict[str, str] | None = None,
    scratch: Path | None = None,
) -> None:
    """Convert each program, merge them as the functions of one package (bit-identical weights
    are stored once, states are shared by name), describe it, and move it into place,
    replacing an older package.

    programs: by function name; a callable is called when its turn comes, so that a package of
    many functions over a large base never holds more than one built program at a time.
    metadata: stored under "ondevice_lora.<key>"; its context_length and prefill_length fill in
    the descriptions. descriptions: of inputs beyond those in DESCRIPTIONS, by name.
    scratch: a folder for the intermediate files (default: a temporary one beside out_path).
    """
    descriptions = {**DESCRIPTIONS, **(descriptions or {})}
    with tempfile.TemporaryDirectory(
        dir=scratch or out_path.parent, prefix=".coreml-export-"
    ) as tmp:
        tmp = Path(tmp)
        desc = ct.utils.MultiFunctionDescriptor()
        for name, program in programs.items():
            part = tmp / f"{name}.mlpackage"
            program = program() if callable(program) else program
            convert_program(program).save(str(part))
            del program  # one built program at a time (see above)
            desc.add_function(str(part), src_function_name="main", target_function_name=name)
        desc.default_function_name = default_function
        merged = tmp / "merged.mlpackage"
        with quiet_progress():
            ct.utils.save_multifunction(desc, str(merged))
        # Metadata and descriptions are edited on the merged spec; loading it needs no runtime.
        model = ct.models.MLModel(str(merged), skip_model_load=True)
        spec = model.get_spec()
        _describe(spec, metadata, descriptions)
        final = tmp / "final.mlpackage"  # out_path may be a staging name without the suffix
        ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True).save(
            str(final)
        )
        if out_path.exists():
            os.replace(out_path, tmp / "replaced.mlpackage")  # removed with tmp
        os.replace(final, out_path)


def _describe(spec, metadata: dict, descriptions: dict[str, str]) -> None:
    values = {"prefill": metadata["prefill_length"], "context": metadata["context_length"]}
    for function in spec.description.functions:
        for feature in [*function.input, *function.output, *function.state]:
            feature.shortDescription = descriptions[feature.name].format(**values)
    meta = spec.description.metadata
    meta.author = "ondevice-lora"
    meta.shortDescription = (
        f"{metadata['model_type']} decoder ({metadata['precision']}), prefill and decode "
        f"functions over a {metadata['context_length']}-token KV-cache state"
    )
    for key, value in metadata.items():
        meta.userDefined[METADATA_PREFIX + key] = value


def write_side_files(
    tokenizer,
    folder: Path,
    package_name: str,
    context_length: int,
    prefill_length: int,
    model=None,
) -> list[Path]:
    """tokenizer.json, tokenizer_config.json, special_tokens.json and (given the model)
    config.json into `folder`, the side folder of the package called `package_name`; nothing
    without a tokenizer. Returns the files written."""
    if tokenizer is None:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder)
    info = {
        "package": package_name,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": tokenizer.eos_token_ids,
        "pad_token_id": tokenizer.pad_token_id,
        "add_bos_token": tokenizer.add_bos_token,
        "special_tokens": tokenizer.special,
        "vocab_size": tokenizer.vocab_size,
        "context_length": context_length,
        "prefill_length": prefill_length,
        "chat_template": tokenizer.chat_template,
    }
    special = write_text_atomically(
        folder / SPECIAL_TOKENS_FILE, json.dumps(info, indent=2, ensure_ascii=False) + "\n"
    )
    files = [folder / "tokenizer.json", folder / "tokenizer_config.json", special]
    if model is not None:
        # The model's own config.json keys (ModelArgs fields are exactly those).
        config = dataclasses.asdict(model.args)
        text = json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
        files.append(write_text_atomically(folder / MODEL_CONFIG_FILE, text))
    return files


def weight_bytes(w: DecoderWeights) -> int:
    """Bytes the weights need as stored: 4-bit codes plus scales and offsets, dense tensors at
    the compute dtype (rotary tables included: they are weights of the program too)."""
    itemsize = np.dtype(w.precision.np_dtype).itemsize

    def size(a) -> int:
        if a is None:
            return 0
        return a.nbytes if isinstance(a, QuantizedWeight) else a.size * itemsize

    def linear(lin: LinearWeights | None) -> int:
        if lin is None:
            return 0
        lora = lin.lora
        extra = 0 if lora is None else size(lora.a) + size(lora.b) + size(lora.row_factor)
        return size(lin.weight) + size(lin.bias) + extra

    total = size(w.embedding) + size(w.norm) + linear(w.lm_head)
    total += sum(size(cos) + size(sin) for cos, sin in w.ropes.values())
    for layer in w.layers:
        total += sum(linear(lin) for lin in layer.linears().values())
        norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.q_norm, layer.k_norm)
        norms += (layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm)
        total += sum(size(n) for n in norms)
    return total


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
