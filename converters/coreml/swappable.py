"""A base package whose LoRA matrices are inputs: any adapter of rank <= r_max, fed at run time.

The package follows export.py's contract (functions ``prefill`` and ``decode``), with more inputs.
Per target projection P (q_proj, ..., down_proj), packed across layers so the input count does
not grow with depth:

- ``lora_a_<P>`` fp16 (num_layers, r_max, in_features)
- ``lora_b_<P>`` fp16 (num_layers, out_features, r_max)
- ``lora_scale`` fp16 (1,)

Each layer computes ``linear(x, W) + lora_scale * matmul(matmul(x, A[i]^T), B[i]^T)``: ``matmul``,
since ``linear`` only takes constant weights. An adapter of rank r < r_max is zero-padded (the
extra rows of A and columns of B add exact zeros), layers or targets it does not adapt are
zero, and lora_scale 0 gives the base. Adapter files in this layout: adapter_file.py.
The metadata adds ``ondevice_lora.lora_targets`` (comma-separated), ``ondevice_lora.lora_r_max``
and ``ondevice_lora.lora_num_layers``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from ondevice_lora.adapters.fingerprint import base_fingerprint

from .build import PROJECTIONS, DecoderWeights, LoraBranch, build_program
from .export import (
    DECODE_FUNCTION,
    METADATA_PREFIX,
    PREFILL_FUNCTION,
    CoreMLExportError,
    ExportResult,
    check_settings,
    common_metadata,
    folder_bytes,
    precision_weights,
    require_plain_base,
    save_staged,
    weight_bytes,
)
from .fp16_range import DEFAULT_FIT, Fp16Fit, fit_fp16
from .placement import relocate_reports, staged_export
from .size_report import SizeReport, pair_weight_bytes, weight_file_bytes

SUPPORTED_TARGETS = tuple(name for names in PROJECTIONS.values() for name in names)
SCALE_INPUT = "lora_scale"
ALL_LINEAR = "all-linear"


def lora_input_names(target: str) -> tuple[str, str]:
    """The (A, B) input names of one target projection."""
    return f"lora_a_{target}", f"lora_b_{target}"


def check_targets(targets) -> tuple[str, ...]:
    """Targets as projection names in the decoder's order: accepts "all-linear", dotted
    suffixes ("self_attn.q_proj") and a comma-separated string; raises CoreMLExportError
    naming any target the swappable export does not support."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if ALL_LINEAR in targets:
        return SUPPORTED_TARGETS
    names = {str(t).rsplit(".", 1)[-1] for t in targets}
    unsupported = sorted(names - set(SUPPORTED_TARGETS))
    if unsupported or not names:
        raise CoreMLExportError(
            f"target modules {unsupported or '(none)'} are not supported by the swappable "
            f"export; supported: {', '.join(SUPPORTED_TARGETS)} or {ALL_LINEAR!r}"
        )
    return tuple(t for t in SUPPORTED_TARGETS if t in names)


def projection_dims(arch: Mapping) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection, from config.json-style fields
    (ModelArgs, or the "architecture" of a base_fingerprint)."""
    hidden, inner = arch["hidden_size"], arch["intermediate_size"]
    heads, kv_heads = arch["num_attention_heads"], arch["num_key_value_heads"]
    head_dim = arch.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }


@dataclass(frozen=True)
class SwappableLayout:
    """The adapter inputs of a swappable package: which projections, how many layers, r_max,
    and each target's (in_features, out_features)."""

    targets: tuple[str, ...]
    r_max: int
    num_layers: int
    dims: dict[str, tuple[int, int]]

    @classmethod
    def from_architecture(cls, arch: Mapping, targets, r_max: int) -> SwappableLayout:
        """The layout for a model's config fields (ModelArgs, or a fingerprint's
        "architecture"), every layer, the given targets (see check_targets) and r_max."""
        if not isinstance(r_max, int) or r_max < 1:
            raise CoreMLExportError(f"r_max must be a positive integer, got {r_max!r}")
        targets = check_targets(targets)
        dims = projection_dims(arch)
        return cls(targets, r_max, arch["num_hidden_layers"], {t: dims[t] for t in targets})

    @classmethod
    def from_spec(cls, spec, source="the package") -> SwappableLayout:
        """The layout a swappable package's spec declares in its decode function's inputs."""
        functions = {f.name: f for f in spec.description.functions}
        decode = functions.get(DECODE_FUNCTION)
        shapes = (
            {}
            if decode is None
            else {i.name: tuple(i.type.multiArrayType.shape) for i in decode.input}
        )
        targets = [t for t in SUPPORTED_TARGETS if lora_input_names(t)[0] in shapes]
        if not targets or SCALE_INPUT not in shapes:
            raise CoreMLExportError(
                f"{source}: not a swappable package (no {DECODE_FUNCTION} function with lora_* "
                "inputs); export one with --mode swappable"
            )
        dims, sizes = {}, set()
        for t in targets:
            name_a, name_b = lora_input_names(t)
            (layers, r_max, n_in), (_, n_out, _) = shapes[name_a], shapes[name_b]
            dims[t] = (n_in, n_out)
            sizes.add((layers, r_max))
        ((layers, r_max),) = sizes  # one depth and one r_max for every target, by construction
        return cls(tuple(targets), r_max, layers, dims)

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every adapter input of the package with its shape, lora_scale last."""
        shapes = {}
        for t in self.targets:
            name_a, name_b = lora_input_names(t)
            n_in, n_out = self.dims[t]
            shapes[name_a] = (self.num_layers, self.r_max, n_in)
            shapes[name_b] = (self.num_layers, n_out, self.r_max)
        shapes[SCALE_INPUT] = (1,)
        return shapes

    def descriptions(self) -> dict[str, str]:
        """What each adapter input holds, for the package's input descriptions."""
        texts = {SCALE_INPUT: "fp16 (1,): the adapter's scale (alpha / rank); 0 gives the base."}
        for t in self.targets:
            name_a, name_b = lora_input_names(t)
            texts[name_a] = (
                f"fp16 (layers, r_max, in): every layer's LoRA A of {t}, rows past the "
                "adapter's rank zero."
            )
            texts[name_b] = (
                f"fp16 (layers, out, r_max): every layer's LoRA B of {t}, columns past the "
                "adapter's rank zero."
            )
        return texts


def bind_lora_inputs(layout: SwappableLayout):
    """A build.Binder giving each targeted projection a branch that reads its layer's slice of
    the lora_* inputs."""

    def bind(w: DecoderWeights, inputs: dict) -> DecoderWeights:
        scale = inputs[SCALE_INPUT]
        layers = []
        for i, layer in enumerate(w.layers):
            changes = {}
            for t in layout.targets:
                name_a, name_b = lora_input_names(t)
                n_in, n_out = layout.dims[t]
                r = layout.r_max
                # (layers, r, in)[i] -> (r, in) and (layers, out, r)[i] -> (out, r)
                a = mb.slice_by_index(x=inputs[name_a], begin=[i, 0, 0], end=[i + 1, r, n_in])
                b = mb.slice_by_index(x=inputs[name_b], begin=[i, 0, 0], end=[i + 1, n_out, r])
                branch = LoraBranch(
                    mb.reshape(x=a, shape=[r, n_in]), mb.reshape(x=b, shape=[n_out, r]), scale
                )
                changes[t] = dataclasses.replace(getattr(layer, t), lora=branch)
            layers.append(dataclasses.replace(layer, **changes))
        return dataclasses.replace(w, layers=layers)

    return bind


@dataclass
class SwappableResult(ExportResult):
    """export_coreml's result plus the layout of the adapter inputs and the size report."""

    layout: SwappableLayout | None = None
    sizes: SizeReport | None = None
    adapter_files: dict[str, Path] = field(default_factory=dict)


def export_swappable(
    model,
    tokenizer,
    out_path,
    targets=("q_proj", "v_proj"),
    r_max: int = 16,
    precision: str = "int4",
    context_length: int = 512,
    prefill_length: int = 32,
    fingerprint: dict | None = None,
    group_size: int = 32,
    fit: Fp16Fit | None = DEFAULT_FIT,
    check: Callable[[Path], object] | None = None,
    keep_failed: bool = False,
) -> SwappableResult:
    """Export the plain base `model` with LoRA inputs for `targets` up to rank `r_max`.

    fingerprint: the base's base_fingerprint() before any quantisation for the export (the
    one adapters record); computed when None. Adapter files: adapter_file.write_adapter_file.
    fit, check, keep_failed: as for export.export_coreml (the base's range is measured).
    Raises CoreMLExportError for bad settings or unsupported targets.
    """
    start = time.perf_counter()
    out_path = Path(out_path)
    check_settings(out_path, context_length, prefill_length)
    require_plain_base(model, "export_swappable", "adapter files at run time")
    first = model.layers[0]
    fused = [n for n in ("qkv_proj", "gate_up_proj") if n in first.self_attn or n in first.mlp]
    if fused:
        # Adapter inputs are laid out per q/k/v/gate/up projection; a fused layer has none.
        raise CoreMLExportError(
            f"a {model.args.model_type} model fuses its projections ({', '.join(fused)}), "
            "which the swappable layout does not cover yet; export its adapters merged "
            "(--mode merged) or as a multifunction package (--mode multifunction)."
        )
    layout = SwappableLayout.from_architecture(dataclasses.asdict(model.args), targets, r_max)
    if fingerprint is None:
        fingerprint = base_fingerprint(model, tokenizer)
    p, w = precision_weights(model, out_path, precision, context_length, group_size)
    if p.dtype != types.fp16:
        # An fp32 package would still get its adapters in fp16, so it could not match MLX to
        # fp32 precision, which is all an fp32 export is for.
        raise CoreMLExportError(
            f"swappable packages take fp16 adapter inputs; export them at int4 or fp16, "
            f"not {precision}"
        )
    w, fitted = fit_fp16(model, tokenizer, w, fit)
    metadata = common_metadata(model, precision, context_length, prefill_length, fingerprint)
    metadata["residual_scale"] = str(w.residual_scale)
    metadata["adapter_mode"] = "swappable"
    metadata["adapter_config"] = "null"
    metadata["lora_targets"] = ",".join(layout.targets)
    metadata["lora_r_max"] = str(layout.r_max)
    metadata["lora_num_layers"] = str(layout.num_layers)
    specs = {
        name: mb.TensorSpec(shape, dtype=types.fp16)
        for name, shape in layout.input_shapes().items()
    }
    bind = bind_lora_inputs(layout)
    programs = {
        PREFILL_FUNCTION: lambda: build_program(w, prefill_length, specs, bind),
        DECODE_FUNCTION: lambda: build_program(w, 1, specs, bind),
    }
    with staged_export(out_path, keep_failed) as staging:
        files = save_staged(
            staging,
            programs,
            metadata,
            tokenizer,
            model,
            context_length,
            descriptions=layout.descriptions(),
        )
        staged = staging.package
        package_bytes = folder_bytes(staged)
        sizes = SizeReport(
            kind="swappable",
            package=out_path,
            # Every blob of a swappable package is the base's: its adapters come as inputs.
            base_weight_bytes=pair_weight_bytes(staged, {"base": tuple(programs)}, "base")[0],
            package_bytes=package_bytes,
            weight_file_bytes=weight_file_bytes(staged),
            function_pairs=1,
            adapters_inside=False,
        )
        validation = None if check is None else check(staged)
    return SwappableResult(
        path=out_path,
        precision=precision,
        context_length=context_length,
        prefill_length=prefill_length,
        package_bytes=package_bytes,
        weight_bytes=weight_bytes(w),
        adapter_mode="swappable",
        seconds=time.perf_counter() - start,
        files=files,
        layout=layout,
        sizes=sizes,
        fit=fitted,
        validation=relocate_reports(validation, out_path),
    )


def read_swappable_package(path) -> tuple[SwappableLayout, dict | None]:
    """(layout, base fingerprint or None) of a saved swappable package."""
    import coremltools as ct

    if not (Path(path) / "Manifest.json").is_file():
        raise CoreMLExportError(f"{path}: not a Core ML package (no Manifest.json)")
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    fingerprint = spec.description.metadata.userDefined.get(METADATA_PREFIX + "base_fingerprint")
    return SwappableLayout.from_spec(spec, path), json.loads(fingerprint) if fingerprint else None


def base_inputs(layout: SwappableLayout) -> dict[str, np.ndarray]:
    """Inputs that make the package compute its base: zero matrices and scale 0."""
    return {name: np.zeros(shape, np.float16) for name, shape in layout.input_shapes().items()}
