"""One Core ML package holding a base model and several adapters, as pairs of functions.

The package follows export.py's contract, with function names ``prefill_<name>`` and
``decode_<name>`` for each adapter and ``prefill_base`` / ``decode_base`` for the plain base
(the default function is ``decode_base``). Every function is built over the same base weights
as the same numpy arrays, so their constants are bit-identical and ``save_multifunction`` stores
them once; each adapter stays an unmerged low-rank branch (a merged adapter would change every
base weight and nothing would be shared). All functions declare the same ``key_cache`` /
``value_cache`` states, so one MLState serves any pair (a new adapter needs a new conversation:
the cache was computed with the old one).

Names come from the adapter folders' names, reduced to [A-Za-z0-9_] and made unique; "base" is
taken by the base's own pair. The metadata adds ``ondevice_lora.functions`` (JSON: adapter name
-> [prefill, decode]) and ``ondevice_lora.adapter_config`` (JSON: adapter name -> its config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ondevice_lora.adapters.files import check_adapter_base, load_adapter, read_adapter_config
from ondevice_lora.adapters.fingerprint import base_fingerprint
from ondevice_lora.adapters.layers import adapter_modules, replace_modules, wrapped_modules
from ondevice_lora.errors import OndeviceLoraError

from .build import DecoderWeights, LoraBranch, build_program
from .export import (
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
from .size_report import SizeReport, adapter_weight_bytes, pair_weight_bytes, weight_file_bytes
from .weights import lora_branch

BASE_NAME = "base"
FUNCTION_PREFIXES = ("prefill_", "decode_")
# The decoder layer index and projection of an adapter layer's module path.
LAYER_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def function_pair(name: str) -> tuple[str, str]:
    """The (prefill, decode) function names of the adapter (or BASE_NAME) called `name`."""
    return tuple(prefix + name for prefix in FUNCTION_PREFIXES)


def function_names(folders: Sequence[str | Path]) -> list[str]:
    """Names for the functions of each adapter folder: its folder name reduced to [A-Za-z0-9_],
    made unique with _2, _3, ...; BASE_NAME is taken ("runs/base" -> "base_2")."""
    taken = {BASE_NAME}
    names = []
    for folder in folders:
        stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(folder).resolve().name) or "adapter"
        name, n = stem, 1
        while name in taken:
            n += 1
            name = f"{stem}_{n}"
        taken.add(name)
        names.append(name)
    return names


def named_adapters(adapters: Mapping[str, str | Path] | Sequence[str | Path]) -> dict[str, Path]:
    """{name: folder} from a mapping (names checked) or a list of folders (names derived)."""
    if not isinstance(adapters, Mapping):
        return dict(zip(function_names(adapters), map(Path, adapters)))
    bad = [n for n in adapters if n == BASE_NAME or not re.fullmatch(r"[A-Za-z0-9_]+", n)]
    if bad:
        raise CoreMLExportError(
            f"adapter names {bad} cannot name functions: use [A-Za-z0-9_] and not {BASE_NAME!r}"
        )
    return {name: Path(folder) for name, folder in adapters.items()}


def check_same_base(adapters: Mapping[str, Path], fingerprint: dict) -> dict[str, dict]:
    """Every adapter's config (to_dict) if all were trained on the base whose fingerprint is
    given; otherwise one CoreMLExportError saying which were not, and what differs."""
    configs, problems = {}, []
    for name, folder in adapters.items():
        try:
            config, saved_base = read_adapter_config(folder)
            check_adapter_base(folder, saved_base, fingerprint)
        except OndeviceLoraError as e:
            detail = str(e).replace("\n", "\n      ")  # nest its own list under this one
            problems.append(f"{name}: {detail}")
            continue
        configs[name] = config.to_dict()
    if problems:
        raise CoreMLExportError(
            "adapters for different bases cannot share one package; every adapter must have "
            "been trained on the exported base:\n  - " + "\n  - ".join(problems)
        )
    return configs


@contextlib.contextmanager
def adapter_loaded(model, folder):
    """`model` with the adapter in `folder` loaded (base check left to the caller), then the
    plain base again: the wrappers are replaced by the very layers they wrapped."""
    load_adapter(model, folder, None)
    model.eval()
    try:
        yield model
    finally:
        replace_modules(model, {path: w.base for path, w in wrapped_modules(model).items()})


def adapter_branches(model) -> dict[tuple[int, str], LoraBranch]:
    """The branches of the adapter loaded on `model`, by (layer index, projection)."""
    branches = {}
    for path, module in adapter_modules(model).items():
        match = LAYER_PATH.search(path)
        if match is None:
            raise CoreMLExportError(f"adapter layer {path} is not a decoder layer's projection")
        branches[int(match[1]), match[2]] = lora_branch(module)
    return branches


def with_branches(w: DecoderWeights, branches: dict[tuple[int, str], LoraBranch]):
    """`w` with the given branches added; every base array is shared with `w`, not copied."""
    layers = []
    for index, layer in enumerate(w.layers):
        changes = {
            proj: dataclasses.replace(getattr(layer, proj), lora=branch)
            for (i, proj), branch in branches.items()
            if i == index
        }
        layers.append(dataclasses.replace(layer, **changes))
    return dataclasses.replace(w, layers=layers)


@dataclass
class MultifunctionResult(ExportResult):
    """export_coreml's result plus the function pairs (by adapter name, BASE_NAME first), the
    adapter folders by name, and the size report."""

    functions: dict[str, tuple[str, str]] = field(default_factory=dict)
    adapters: dict[str, Path] = field(default_factory=dict)
    sizes: SizeReport | None = None


def export_multifunction(
    model,
    tokenizer,
    adapters: Mapping[str, str | Path] | Sequence[str | Path],
    out_path,
    precision: str = "int4",
    context_length: int = 512,
    prefill_length: int = 32,
    fingerprint: dict | None = None,
    group_size: int = 32,
    fit: Fp16Fit | None = DEFAULT_FIT,
    check: Callable[[Path], object] | None = None,
    keep_failed: bool = False,
) -> MultifunctionResult:
    """Export the plain base `model` and each adapter folder as function pairs of one package.

    adapters: folders (named by function_names) or {name: folder}. fingerprint: the base's
    base_fingerprint() as the adapters were trained on it (before any quantisation for the
    export); computed from model and tokenizer when None. For an int4 export, quantise `model`
    with weights.quantize_for_int4 first, as the CLI does, so the package keeps its codes.
    fit, check, keep_failed: as for export.export_coreml (the base's range is measured).
    Raises CoreMLExportError for bad settings or adapters of another base.
    """
    start = time.perf_counter()
    out_path = Path(out_path)
    check_settings(out_path, context_length, prefill_length)
    require_plain_base(model, "export_multifunction", "folders")
    adapters = named_adapters(adapters)
    if fingerprint is None:
        fingerprint = base_fingerprint(model, tokenizer)
    configs = check_same_base(adapters, fingerprint)
    _, base = precision_weights(model, out_path, precision, context_length, group_size)
    base, fitted = fit_fp16(model, tokenizer, base, fit)
    weights = {BASE_NAME: base}
    for name, folder in adapters.items():
        with adapter_loaded(model, folder):
            weights[name] = with_branches(base, adapter_branches(model))

    functions = {name: function_pair(name) for name in weights}
    metadata = common_metadata(model, precision, context_length, prefill_length, fingerprint)
    metadata["adapter_mode"] = "multifunction"
    metadata["adapter_config"] = json.dumps(configs, sort_keys=True)
    metadata["functions"] = json.dumps(functions)
    metadata["residual_scale"] = str(base.residual_scale)
    programs = {}
    for name, w in weights.items():
        prefill, decode = functions[name]
        # Built lazily, one at a time (a real base is hundreds of MB per built program).
        programs[prefill] = lambda w=w: build_program(w, prefill_length)
        programs[decode] = lambda w=w: build_program(w, 1)
    default = functions[BASE_NAME][1]
    with staged_export(out_path, keep_failed) as staging:
        files = save_staged(
            staging, programs, metadata, tokenizer, model, context_length, default_function=default
        )
        assert_same_states(staging.package)
        staged = staging.package
        package_bytes = folder_bytes(staged)
        # Measured in the saved package: what the base's functions read, and what each
        # adapter's functions read beyond that (its A and B, stored once for its prefill and
        # decode).
        base_bytes, own_bytes = pair_weight_bytes(staged, functions, BASE_NAME)
        sizes = SizeReport(
            kind="multifunction",
            package=out_path,
            base_weight_bytes=base_bytes,
            package_bytes=package_bytes,
            weight_file_bytes=weight_file_bytes(staged),
            function_pairs=len(functions),
            adapter_bytes=own_bytes,
            adapter_tensor_bytes={n: adapter_weight_bytes(weights[n]) for n in adapters},
        )
        validation = None if check is None else check(staged)
    return MultifunctionResult(
        path=out_path,
        precision=precision,
        context_length=context_length,
        prefill_length=prefill_length,
        package_bytes=package_bytes,
        weight_bytes=weight_bytes(base) + sum(sizes.adapter_tensor_bytes.values()),
        adapter_mode="multifunction",
        seconds=time.perf_counter() - start,
        files=files,
        functions=functions,
        adapters=adapters,
        sizes=sizes,
        fit=fitted,
        validation=relocate_reports(validation, out_path),
    )


def assert_same_states(package_path: Path) -> None:
    """Every function of the package declares the same states (names, shapes, dtypes): the app
    makes one state and passes it to every function, which Core ML accepts only then."""
    from .mil_eval import load_package

    package = load_package(package_path)
    declared = {
        name: sorted((n, s.shape, str(s.dtype)) for n, s in f.inputs.items() if s.is_state)
        for name, f in package.functions.items()
    }
    first = next(iter(declared.values()))
    different = [name for name, states in declared.items() if states != first]
    assert not different, f"functions {different} declare other states than {first}"


def validate_multifunction(
    path, model, adapters: Mapping[str, str | Path], prompt_ids: list[int], decode_steps: int = 8
) -> dict:
    """Validate every function pair against MLX: the base pair against the plain `model` (the
    export's reference), each adapter's pair against `model` with that adapter loaded.

    adapters: {name: folder} as the export named them (MultifunctionResult.adapters).
    Returns the ValidationReport of each name; raises CoreMLValidationError at the first failure.
    """
    from .validate import load_package, validate_package

    package = load_package(path)  # read once: every pair shares its base weights
    reports = {
        BASE_NAME: validate_package(
            package, model, prompt_ids, decode_steps, functions=function_pair(BASE_NAME)
        )
    }
    for name, folder in adapters.items():
        with adapter_loaded(model, folder):
            reports[name] = validate_package(
                package, model, prompt_ids, decode_steps, functions=function_pair(name)
            )
    return reports
