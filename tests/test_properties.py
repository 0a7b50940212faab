"""Property tests: random and mutated input to each reader ends in our error with a message, or
in a result, never in another exception (a traceback for the user).

Readers: JSONL datasets (training and privacy scan), YAML training settings, config.json model
arguments, safetensors headers and GGUF headers. Each property runs a bounded number of examples
so the whole file stays a few seconds per reader in CI.
"""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondevice_lora.errors import OndeviceLoraError

BOUNDED = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# JSON values of every kind, strings with any code point (lone surrogates included).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """`valid` with a few bytes replaced, inserted or deleted, or cut short."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "replace" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[at]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


def outcome(read, content: bytes, name: str):
    """Write `content` to a fresh file called `name` and read it: our error or a result."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            return read(path)
        except OndeviceLoraError as e:
            assert str(e).strip(), "an error without a message"
            return e


# --- JSONL ---------------------------------------------------------------------------------------

VALID_JSONL = (
    json.dumps({"messages": [{"role": "user", "content": "Hi ana@example.com"},
                             {"role": "assistant", "content": "Hello!"}]}) + "\n"
    + json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"}]}) + "\n"
).encode()  # fmt: skip


def read_jsonl_both(path: Path):
    from ondevice_lora.data.records import read_jsonl
    from ondevice_lora.privacy.redact import scan_file

    with contextlib.suppress(OndeviceLoraError):  # our error is an answer; any other fails
        scan_file(path)
    return read_jsonl(path)


def jsonl_line(value) -> bytes:
    # ensure_ascii: lone surrogates become \\udxxx escapes, as a careless writer would leave them.
    return json.dumps(value).encode() + b"\n"


@BOUNDED
@given(st.one_of(
    mutated(VALID_JSONL),
    st.lists(json_values.map(jsonl_line), max_size=3).map(b"".join),
    st.lists(st.fixed_dictionaries({"messages": json_values}).map(jsonl_line), max_size=3).map(b"".join),
    st.binary(max_size=64),
))  # fmt: skip
def test_jsonl_readers_give_our_error_or_records(content):
    outcome(read_jsonl_both, content, "train.jsonl")


# --- YAML settings --------------------------------------------------------------------------------

VALID_YAML = (
    b"data: train.jsonl\nrank: 8\nalpha: 16\nlearning_rate: 1e-4\ntarget_modules: [q_proj]\n"
)
YAML_KEYS = ["rank", "alpha", "dropout", "learning_rate", "batch_size", "iters", "workers",
             "max_length", "valid_fraction", "target_modules", "num_layers", "seed", "epochs",
             "dp_epsilon", "warmup_steps", "loss_on", "fine_tune_type"]  # fmt: skip


def read_settings(path: Path):
    from ondevice_lora.training import TrainConfig

    return TrainConfig.from_yaml(path)


def yaml_text(values: dict) -> bytes:
    import yaml

    return yaml.safe_dump(values, allow_unicode=True).encode("utf-8", "surrogatepass")


@BOUNDED
@given(st.one_of(
    mutated(VALID_YAML),
    st.dictionaries(st.sampled_from(YAML_KEYS), json_values, max_size=5).map(yaml_text),
    st.binary(max_size=64),
))  # fmt: skip
def test_yaml_settings_give_our_error_or_a_config(content):
    outcome(read_settings, content, "train.yaml")


# --- config.json ----------------------------------------------------------------------------------

VALID_CONFIG = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": False,
}  # fmt: skip


def read_model_args(path: Path):
    from ondevice_lora.loading.weights import read_json
    from ondevice_lora.models import get_model_module

    config = read_json(path)
    return get_model_module(config.get("model_type")).ModelArgs.from_dict(config)


@BOUNDED
@given(st.one_of(
    st.builds(lambda changes, drop: {**{k: v for k, v in VALID_CONFIG.items() if k not in drop}, **changes},
              st.dictionaries(st.sampled_from(sorted(VALID_CONFIG)), json_values, max_size=3),
              st.sets(st.sampled_from(sorted(VALID_CONFIG)), max_size=2))
    .map(lambda c: json.dumps(c).encode()),
    mutated(json.dumps(VALID_CONFIG).encode()),
))  # fmt: skip
def test_config_json_gives_our_error_or_model_arguments(content):
    outcome(read_model_args, content, "config.json")


# --- safetensors headers ----------------------------------------------------------------------------


def safetensors_file(header: object, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


VALID_SAFETENSORS = safetensors_file(
    {"__metadata__": {"format": "mlx"},
     "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
     "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}},
    bytes(24),
)  # fmt: skip
tensor_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "Q4", 7]),
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 40), max_size=3) | json_values,
    },
)


def read_tensors(path: Path):
    from ondevice_lora.loading.weights import read_safetensors

    return read_safetensors(path)


@BOUNDED
@given(st.one_of(
    mutated(VALID_SAFETENSORS),
    st.builds(safetensors_file, st.dictionaries(st.text(max_size=4), tensor_entries | json_values,
                                                max_size=3), st.binary(max_size=40)),
))  # fmt: skip
def test_safetensors_headers_give_our_error_or_tensors(content):
    outcome(read_tensors, content, "model.safetensors")


# --- GGUF headers -----------------------------------------------------------------------------------


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


# One metadata entry of each kind (string, uint32, float array) and a 4x2 F32 tensor, the
# header padded to the 32-byte alignment.
VALID_GGUF = (
    b"GGUF" + struct.pack("<IQQ", 3, 1, 3)
    + gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")
    + gguf_string("general.alignment") + struct.pack("<II", 4, 32)
    + gguf_string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2) + struct.pack("<ff", 0, 1)
    + gguf_string("w") + struct.pack("<IQQIQ", 2, 4, 2, 0, 0)
).ljust(224, b"\0") + bytes(32)  # fmt: skip


def read_gguf(path: Path):
    from ondevice_lora.loading.gguf.reader import GGUFFile

    return GGUFFile(path)


def test_the_gguf_seed_file_is_valid(tmp_path):
    (tmp_path / "m.gguf").write_bytes(VALID_GGUF)
    assert read_gguf(tmp_path / "m.gguf").tensors["w"].shape == (2, 4)


@BOUNDED
@given(mutated(VALID_GGUF))
def test_gguf_headers_give_our_error_or_a_table(content):
    outcome(read_gguf, content, "model.gguf")


@pytest.mark.parametrize("name", ["train.jsonl", "train.yaml", "config.json", "model.gguf"])
def test_an_empty_file_is_our_error(name):
    readers = {"train.jsonl": read_jsonl_both, "train.yaml": read_settings,
               "config.json": read_model_args, "model.gguf": read_gguf}  # fmt: skip
    result = outcome(readers[name], b"", name)
    assert isinstance(result, OndeviceLoraError) or name == "train.yaml"
