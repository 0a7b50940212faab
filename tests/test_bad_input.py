"""Bad input ends in our error with a message naming the file and the fix, never a traceback:
crafted JSONL lines, YAML, config.json, safetensors and GGUF headers, flags, and non-finite
numbers (hyper-parameters, losses, adapter tensors)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from ondevice_lora.adapters.files import ADAPTER_WEIGHTS_FILE, LoraConfig
from ondevice_lora.data.errors import DatasetError
from ondevice_lora.data.records import read_jsonl
from ondevice_lora.errors import ModelLoadError, OndeviceLoraError
from ondevice_lora.loading import load
from ondevice_lora.loading.gguf.reader import GGUFFile
from ondevice_lora.loading.hf import load_model
from ondevice_lora.loading.weights import read_safetensors
from ondevice_lora.privacy.redact import scan_file
from ondevice_lora.training import TrainConfig
from ondevice_lora.training.config import ConfigError, read_yaml
from tests.hf_fixtures import write_hf_model

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-input") / "model"
    write_hf_model(folder, "llama")
    return folder


def write_lines(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


# --- JSONL: training and the privacy commands read it alike --------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"text": "a\\ud800b"}', "surrogate"),
        ('{"messages": [{"role": "user", "content": "\\udfff"}]}', "surrogate"),
        (b'{"text": "caf\xe9"}', "not UTF-8"),
    ],
    ids=["deeply-nested", "lone-surrogate-text", "lone-surrogate-chat", "latin-1"],
)
def test_bad_jsonl_lines_are_clear_errors_in_train_and_scan(tmp_path, line, expected):
    path = write_lines(tmp_path / "train.jsonl", json.dumps(CHAT), line)
    for read in (read_jsonl, scan_file):
        with pytest.raises(DatasetError) as error:
            read(path)
        assert f"{path}, line 2" in str(error.value) and expected in str(error.value)


# --- settings: YAML, flags, non-finite numbers -----------------------------------------------------


def test_non_utf8_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_bytes(b"rank: 8\ndata: caf\xe9.jsonl\n")
    with pytest.raises(ConfigError, match=r"train.yaml: not UTF-8 text .* at byte 18"):
        read_yaml(path)


def test_yaml_with_non_text_keys_is_a_clear_error(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("rank: 8\n1: 2\n")
    with pytest.raises(ConfigError, match="setting names must be text"):
        read_yaml(path)


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"workers": 0}, "workers must be an integer >= 1"),
        ({"alpha": math.nan}, "alpha must be a positive number, got nan"),
        ({"alpha": math.inf}, "alpha must be a positive number, got inf"),
        ({"learning_rate": math.nan}, "learning_rate must be > 0"),
        ({"dropout": math.nan}, "dropout must be a number in [0, 1)"),
        ({"weight_decay": -math.inf}, "weight_decay must be >= 0"),
    ],
)
def test_bad_hyper_parameters_are_refused_up_front(settings, expected):
    with pytest.raises(ConfigError) as error:
        TrainConfig(data="d.jsonl", **settings).validate()
    assert expected in str(error.value)


def test_adapter_path_naming_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a file; it must be a folder"):
        TrainConfig(data="d.jsonl", adapter_path=str(tmp_path / "notes.txt")).validate()
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flag, value", [("--alpha", "nan"), ("--workers", "0")])
def test_train_cli_refuses_bad_flags_with_a_message(tmp_path, flag, value):
    from ondevice_lora.training.cli import train_command

    data = write_lines(tmp_path / "d.jsonl", json.dumps(CHAT))
    args = ["--data", str(data), "--adapter-path", str(tmp_path / "ad"), flag, value]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and f"{flag}: " in result.output
    assert not (tmp_path / "ad").exists()


def test_generate_refuses_a_prompt_that_is_not_utf8():
    from ondevice_lora.generation.cli import generate_command

    # What Python makes of the bytes b"caf\xe9" in argv under a UTF-8 locale.
    result = CliRunner().invoke(generate_command, ["--prompt", "caf\udce9"])
    assert result.exit_code == 2 and "--prompt is not UTF-8 text" in result.output


# --- config.json ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c: [c], "expected a JSON object"),
        (lambda c: {**c, "num_hidden_layers": "two"}, "num_hidden_layers must be an integer"),
        (lambda c: {**c, "num_attention_heads": 0}, "num_attention_heads must be a positive"),
        (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "hidden_size is missing"),
        (lambda c: {**c, "rms_norm_eps": "small"}, "rms_norm_eps must be a number"),
        (lambda c: {**c, "rope_scaling": 3}, "rope_scaling must be an object"),
    ],
    ids=["list", "layers-text", "zero-heads", "no-hidden-size", "eps-text", "scaling-number"],
)
def test_bad_config_json_is_a_clear_error(model_folder, tmp_path, change, expected):
    folder = tmp_path / "model"
    folder.mkdir()
    for file in model_folder.iterdir():
        (folder / file.name).symlink_to(file)
    config = json.loads((model_folder / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(ModelLoadError) as error:
        load_model(folder)
    assert "config.json" in str(error.value) and expected in str(error.value)


# --- safetensors headers ---------------------------------------------------------------------------


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "header, data, expected",
    [
        ([1, 2], b"", "the header is a JSON list"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8), "data_offsets"),
        ({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "dtype 'Q9'"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape [-2]"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "data_offsets"),
        ({"w": [1]}, b"", "'w' is not an object"),
        ({"__metadata__": {"format": 1}}, b"", "__metadata__"),
    ],
    ids=["list", "short-range", "dtype", "negative-shape", "reversed", "entry", "metadata"],
)
def test_crafted_safetensors_headers_are_clear_errors(tmp_path, header, data, expected):
    path = tmp_path / "adapters.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    with pytest.raises(ModelLoadError) as error:
        read_safetensors(path)
    assert str(path) in str(error.value) and expected in str(error.value)


# --- GGUF headers ----------------------------------------------------------------------------------


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def gguf_bytes(metadata: list[bytes], tensors: list[bytes], data: bytes = bytes(64)) -> bytes:
    """A GGUF v3 file: metadata entries and tensor infos as given (already encoded)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    return head + b"".join(metadata) + b"".join(tensors) + data


def uint32_entry(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<II", 4, value)


def f32_tensor(name: str, n: int) -> bytes:
    return gguf_string(name) + struct.pack("<IQIQ", 1, n, 0, 0)


def nested_array(depth: int) -> bytes:
    value = struct.pack("<IQ", 4, 0)  # an empty uint32 array
    for _ in range(depth):
        value = struct.pack("<IQ", 9, 1) + value
    return gguf_string("nested") + struct.pack("<I", 9) + value


@pytest.mark.parametrize(
    "content, expected",
    [
        (gguf_bytes([uint32_entry("general.alignment", 0)], [f32_tensor("w", 4)]), "alignment"),
        (gguf_bytes([uint32_entry("general.alignment", 24)], [f32_tensor("w", 4)]), "alignment"),
        (gguf_bytes([nested_array(3)], [f32_tensor("w", 4)]), "nested"),
        (gguf_bytes([], []), "holds no tensors"),
        (b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0), "cannot fit"),
        (gguf_bytes([], [gguf_string("w") + struct.pack("<I", 9)]), "9 dimensions"),
    ],
    ids=["alignment-0", "alignment-24", "nested-arrays", "no-tensors", "huge-count", "dims"],
)
def test_crafted_gguf_files_are_clear_errors(tmp_path, content, expected):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as error:
        GGUFFile(path)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_a_gguf_without_model_metadata_is_a_clear_error(tmp_path):
    from ondevice_lora.loading.hf import load_gguf

    path = tmp_path / "model.gguf"
    architecture = gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")
    path.write_bytes(gguf_bytes([architecture], [f32_tensor("w", 4)]))
    with pytest.raises(ModelLoadError, match="the GGUF metadata does not describe a model"):
        load_gguf(path)


def test_a_well_formed_crafted_gguf_reads(tmp_path):
    # The builder above makes valid files: what the failures above test is the one change each.
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes([uint32_entry("general.alignment", 32)], [f32_tensor("w", 4)]))
    assert list(GGUFFile(path).tensors) == ["w"]


# --- non-finite adapters -----------------------------------------------------------------------------


def test_an_adapter_with_nan_weights_is_refused(model_folder, tmp_path):
    from converters.formats.peft import export_peft
    from tests.adapter_fixtures import write_adapter

    folder = write_adapter(model_folder, tmp_path / "ad", LoraConfig(rank=2))
    tensors = mx.load(str(folder / ADAPTER_WEIGHTS_FILE))
    name = sorted(tensors)[0]
    tensors[name] = mx.full(tensors[name].shape, np.nan)
    mx.save_safetensors(str(folder / ADAPTER_WEIGHTS_FILE), tensors)
    for use in (
        lambda: load(model_folder, adapter=folder),
        lambda: export_peft(folder, tmp_path / "p"),
    ):
        with pytest.raises(
            OndeviceLoraError,
            match=rf"non-finite weights \(NaN or infinity\) in 1 adapter tensor\(s\): {name}",
        ):
            use()
    assert not (tmp_path / "p").exists()
