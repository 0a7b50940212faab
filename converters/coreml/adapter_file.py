"""`<name>.coreml-adapter.safetensors`: one adapter as the inputs of a swappable package.

One safetensors file an app memory-maps and feeds to the package without copying: tensors named
exactly like the package's inputs (``lora_a_<P>``, ``lora_b_<P>``, ``lora_scale``; see
swappable.py), fp16, little-endian, row-major, already zero-padded to r_max and to every layer.
The ``__metadata__`` is the manifest (strings): format, format_version, base_fingerprint (JSON,
as in the package's metadata), rank, r_max, scale, targets (comma-separated: the file's
projections), num_layers, name and adapter_config (JSON).

The file is written here rather than by mx.save_safetensors, which does not pad its JSON header:
tensor data would then start at any offset, and the app can only wrap 2-byte aligned fp16 data.
The header is padded with spaces to a multiple of ALIGNMENT bytes, as the safetensors library
does; every tensor is fp16 (an even number of bytes), so each one starts aligned too.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import numpy as np

from ondevice_lora.adapters.files import ADAPTER_WEIGHTS_FILE, read_adapter_config
from ondevice_lora.adapters.fingerprint import fingerprint_differences
from ondevice_lora.atomic import write_atomically
from ondevice_lora.errors import format_list
from ondevice_lora.loading.weights import read_safetensors

from .export import CoreMLExportError
from .swappable import (
    SCALE_INPUT,
    SUPPORTED_TARGETS,
    SwappableLayout,
    base_inputs,
    lora_input_names,
    read_swappable_package,
)

FORMAT = "ondevice-lora-coreml-adapter"
FORMAT_VERSION = "1"
FILE_SUFFIX = ".coreml-adapter.safetensors"
ALIGNMENT = 8
# "model.layers.3.self_attn.q_proj.lora_a" -> layer 3, q_proj, lora_a
LORA_TENSORS = ("lora_a", "lora_b")
TENSOR_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(\w+)$")


def file_name(folder) -> str:
    """The default file name for an adapter folder: `<folder name>.coreml-adapter.safetensors`."""
    return Path(folder).resolve().name + FILE_SUFFIX


def adapter_inputs(
    folder, layout: SwappableLayout, package_fingerprint: dict | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The package inputs (fp16 numpy, padded to the layout) and the manifest for one adapter.

    package_fingerprint: the package's base fingerprint; the adapter must have been trained on
    it. Raises one CoreMLExportError listing every problem: a rank above r_max, a DoRA adapter,
    a target the export does not support or the package has no input for, a layer or shape
    that does not fit, another base.
    """
    folder = Path(folder)
    config, saved_base = read_adapter_config(folder)
    tensors = read_safetensors(folder / ADAPTER_WEIGHTS_FILE)
    problems = []
    if config.rank > layout.r_max:
        problems.append(
            f"rank {config.rank} is above the package's r_max {layout.r_max}; export the "
            f"package with --r-max {config.rank} or more, or train at rank <= {layout.r_max}"
        )
    if config.fine_tune_type != "lora":
        problems.append(
            f"a {config.fine_tune_type} adapter cannot be fed as inputs (its per-row magnitude "
            "rescales the base weights); export it with --mode multifunction"
        )
    if package_fingerprint is not None:
        if saved_base is None:
            problems.append("its adapter_config.json does not say which base it was trained on")
        else:
            diffs = fingerprint_differences(saved_base, package_fingerprint)
            if diffs:
                problems.append(f"trained on another base than the package's: {'; '.join(diffs)}")
    inputs = base_inputs(layout)
    inputs[SCALE_INPUT][0] = config.scale
    if not problems:  # shapes only mean something for an adapter that could fit
        problems += _fill(inputs, tensors, layout, config.rank)
    if problems:
        raise CoreMLExportError(
            f"{folder}: cannot be fed to this swappable package:\n  - " + "\n  - ".join(problems)
        )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_fingerprint": json.dumps(saved_base, sort_keys=True),
        "rank": str(config.rank),
        "r_max": str(layout.r_max),
        "scale": repr(float(config.scale)),
        "targets": ",".join(layout.targets),
        "num_layers": str(layout.num_layers),
        "name": folder.resolve().name,
        "adapter_config": json.dumps(config.to_dict(), sort_keys=True),
    }
    return inputs, manifest


def _fill(inputs: dict, tensors: Mapping, layout: SwappableLayout, rank: int) -> list[str]:
    """Copy each adapter tensor into its layer's slice of the padded inputs; the problems."""
    parsed, unsupported, missing = [], [], set()
    for key, value in sorted(tensors.items()):
        match = TENSOR_KEY.search(key)
        if match is None or match[2] not in SUPPORTED_TARGETS or match[3] not in LORA_TENSORS:
            unsupported.append(key)
        elif match[2] not in layout.targets:
            missing.add(match[2])
        else:
            parsed.append((key, int(match[1]), match[2], match[3], value))
    problems = []
    if unsupported:
        problems.append(
            f"tensors {format_list(unsupported)} are on modules the swappable export does not "
            f"support (supported: {', '.join(SUPPORTED_TARGETS)})"
        )
    if missing:
        problems.append(
            f"the package has no inputs for {', '.join(sorted(missing))} (its targets: "
            f"{', '.join(layout.targets)}); export the package with those targets"
        )
    for key, layer, target, kind, value in parsed:
        n_in, n_out = layout.dims[target]
        expected = (rank, n_in) if kind == "lora_a" else (n_out, rank)
        if layer >= layout.num_layers or tuple(value.shape) != expected:
            problems.append(
                f"tensor {key}: shape {tuple(value.shape)} in layer {layer}, the package has "
                f"{layout.num_layers} layers and expects {expected}"
            )
            continue
        half = np.array(value.astype(mx.float32)).astype(np.float16)
        if not np.isfinite(half).all():
            problems.append(f"tensor {key}: values beyond fp16's range (|x| > 65504)")
        elif kind == "lora_a":
            inputs[lora_input_names(target)[0]][layer, :rank] = half  # rows past rank stay 0
        else:
            inputs[lora_input_names(target)[1]][layer, :, :rank] = half  # columns too
    return problems


def write_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]):
    """A safetensors file whose data starts at a multiple of ALIGNMENT bytes (written atomically).

    Layout: u64 little-endian header length N, N bytes of JSON (space-padded), then each
    tensor's bytes, little-endian and row-major, back to back in the header's order.
    """
    dtypes = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
    header: dict = {"__metadata__": dict(metadata)}
    blobs, offset = [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        data = array.tobytes()
        header[name] = {
            "dtype": dtypes[array.dtype.newbyteorder("=")],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)  # 8 + N is a multiple of ALIGNMENT

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for data in blobs:
                f.write(data)

    return write_atomically(path, write)


def write_adapter_file(
    folder, out_path, layout: SwappableLayout, package_fingerprint: dict | None = None
) -> Path:
    """Write the adapter in `folder` as `out_path` (see the module docstring); returns it.

    Raises CoreMLExportError if it does not fit `layout` or the package's base (adapter_inputs).
    """
    out_path = Path(out_path)
    if not out_path.name.endswith(FILE_SUFFIX):
        raise CoreMLExportError(f"the adapter file's name must end in {FILE_SUFFIX}: {out_path}")
    inputs, manifest = adapter_inputs(folder, layout, package_fingerprint)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(out_path, inputs, manifest)


def write_adapter_files(result, folders, fingerprint: dict | None = None) -> dict[str, Path]:
    """Write each adapter folder's file beside a swappable package (swappable.SwappableResult),
    named `<name>.coreml-adapter.safetensors` with the names function_names gives; records the
    files and their sizes in `result`. Returns {name: file}."""
    from .multifunction import function_names

    folders = [Path(f) for f in folders]
    names = function_names(folders)
    for folder in folders:  # every problem of every adapter before any file is written
        adapter_inputs(folder, result.layout, fingerprint)
    for name, folder in zip(names, folders):
        path = write_adapter_file(folder, result.path.parent / (name + FILE_SUFFIX), result.layout)
        result.adapter_files[name] = path
        result.sizes.adapter_bytes[name] = path.stat().st_size
    return dict(result.adapter_files)


def read_adapter_file(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, manifest) of an adapter file, read by the safetensors library."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        manifest = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CoreMLExportError(
            f"{path}: not an ondevice-lora Core ML adapter (format {manifest.get('format')!r}, "
            f"version {manifest.get('format_version')!r})"
        )
    return tensors, manifest


def validate_swappable(
    package, model, adapters: Mapping[str, tuple], prompt_ids: list[int], decode_steps: int = 8
) -> dict:
    """Validate a swappable package against MLX, fed each adapter file, and with scale 0.

    adapters: {name: (adapter folder, adapter file)}. Each file's tensors (read back by the
    safetensors library) must make the package compute `model` with that folder's adapter
    loaded; the first file at lora_scale 0 must give the plain `model`. Returns the
    ValidationReport by name ("base (scale 0)" for the latter); raises CoreMLValidationError.
    """
    from .multifunction import adapter_loaded
    from .validate import load_package, validate_package

    loaded = load_package(package)  # read once for every adapter file
    reports = {}
    zero_scale = None
    for name, (folder, path) in adapters.items():
        inputs, _ = read_adapter_file(path)
        with adapter_loaded(model, folder):
            reports[name] = validate_package(
                loaded, model, prompt_ids, decode_steps, extra_inputs=inputs
            )
        zero_scale = zero_scale or {**inputs, SCALE_INPUT: np.zeros(1, np.float16)}
    if zero_scale is None:
        zero_scale = base_inputs(read_swappable_package(package)[0])
    reports["base (scale 0)"] = validate_package(
        loaded, model, prompt_ids, decode_steps, extra_inputs=zero_scale
    )
    return reports
