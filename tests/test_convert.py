"""Quantised mlx-lm folders: ours load in mlx-lm, mlx-lm's load in ours, with the same logits."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from ondevice_lora.errors import OndeviceLoraError
from ondevice_lora.loading import load, load_model
from ondevice_lora.loading.convert import convert, convert_command, summarize
from tests.hf_fixtures import write_hf_model

# Both sides run the same quantised kernels on the same stored values; only summation order
# may differ.
LOGITS_TOLERANCE = 1e-4
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "llama"
    write_hf_model(folder, "llama")
    return folder


def max_logit_diff(model_a, model_b, ids: list[int]) -> float:
    x = mx.array([ids])
    return mx.abs(model_a(x) - model_b(x)).max().item()


def assert_quantised(model, bits: int, group_size: int) -> None:
    """Every Linear and the Embedding are quantised layers with the expected settings."""
    quantised = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    kinds = (nn.Linear, nn.Embedding, *quantised)
    layers = [m for _, m in model.named_modules() if isinstance(m, kinds)]
    # 7 projections per layer, the embedding, and the head when it is not tied.
    assert len(layers) >= 7 * len(model.layers) + 1
    for layer in layers:
        assert isinstance(layer, quantised), layer
        assert (layer.bits, layer.group_size) == (bits, group_size)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 32), (8, 64)])
def test_our_folder_loads_in_mlx_lm_and_ours(hf_folder, tmp_path, bits, group_size):
    out = convert(hf_folder, tmp_path / "q", bits=bits, group_size=group_size)

    config = json.loads((out / "config.json").read_text())
    expected = {"group_size": group_size, "bits": bits, "mode": "affine"}
    assert config["quantization"] == expected
    assert config["quantization_config"] == expected
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    theirs, their_tokenizer = mlx_lm.load(str(out))
    ours, our_tokenizer = load(out)
    assert_quantised(ours, bits, group_size)
    assert_quantised(theirs, bits, group_size)
    ids = our_tokenizer.encode(TEXT)
    assert their_tokenizer.encode(TEXT) == ids
    assert max_logit_diff(ours, theirs, ids) <= LOGITS_TOLERANCE


def test_converting_a_quantised_folder_requantises(hf_folder, tmp_path):
    """A 4-bit source goes to 8 bits through its de-quantised values, not its packed ints."""
    q4 = convert(hf_folder, tmp_path / "q4", bits=4, group_size=32)
    q8 = convert(q4, tmp_path / "q8", bits=8, group_size=64)
    source, _ = load_model(q4)
    converted, _ = load_model(q8)
    assert_quantised(converted, 8, 64)
    # Re-quantising the 4-bit values moves each by at most one 8-bit step (its scale): MLX's
    # affine grid is not centred on the group's range, so the bound is a step, not half of one.
    before = dict(source.named_modules())
    for path, layer in converted.named_modules():
        if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            diff = mx.abs(dequantized(layer) - dequantized(before[path]))
            step = mx.abs(mx.repeat(layer.scales, 64, axis=-1))  # MLX scales may be negative
            assert mx.all(diff <= step * 1.001).item(), path


def dequantized(layer) -> mx.array:
    return mx.dequantize(
        layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits
    )


def test_dtype_is_applied(hf_folder, tmp_path):
    out = convert(hf_folder, tmp_path / "q", bits=4, group_size=64, dtype="bfloat16")
    weights = dict(tree_flatten(load_model(out)[0].parameters()))
    assert weights["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    assert weights["model.norm.weight"].dtype == mx.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_mlx_lm_folder_loads_in_ours(tmp_path, variant, bits, group_size):
    source = tmp_path / "hf"
    write_hf_model(source, variant)
    out = tmp_path / "mlx"
    mlx_lm.convert(
        hf_path=str(source), mlx_path=str(out), quantize=True, q_group_size=group_size, q_bits=bits
    )
    theirs, their_tokenizer = mlx_lm.load(str(out))
    ours, _ = load_model(out)
    assert_quantised(ours, bits, group_size)
    ids = their_tokenizer.encode(TEXT)
    assert max_logit_diff(ours, theirs, ids) <= LOGITS_TOLERANCE
    # The padded batch path gives the same logits as an unpadded row.
    padded = mx.array([ids + [0, 0]])
    mask = mx.array([[1] * len(ids) + [0, 0]])
    np.testing.assert_allclose(
        np.array(ours(padded, attention_mask=mask)[:, : len(ids)]),
        np.array(theirs(mx.array([ids]))),
        atol=LOGITS_TOLERANCE,
    )


def test_cli_convert(hf_folder, tmp_path):
    out = tmp_path / "q"
    runner = CliRunner()
    args = ["--model", str(hf_folder), "--out", str(out), "--bits", "8", "--group-size", "32"]
    result = runner.invoke(convert_command, args)
    assert result.exit_code == 0, result.output
    summary = summarize(out)
    assert "bits per weight" in result.output
    assert f"{summary.bits_per_weight:.2f}" in result.output
    # 8 bits plus a float32 scale and bias per 32 weights: 10 bits, a little more for the norms.
    assert 10.0 <= summary.bits_per_weight < 10.1
    assert_quantised(load_model(out)[0], 8, 32)

    # A non-empty folder is refused, then replaced with --force.
    result = runner.invoke(convert_command, args)
    assert result.exit_code != 0
    assert "not empty" in result.output and "--force" in result.output
    result = runner.invoke(convert_command, [*args[:4], "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_cli_reports_every_bad_argument_at_once(hf_folder, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    args = ["--model", str(hf_folder), "--out", str(tmp_path / "full"), "--bits", "3"]
    args += ["--group-size", "48", "--dtype", "float64"]
    result = CliRunner().invoke(convert_command, args)
    assert result.exit_code != 0
    for problem in ("--bits must be one of 4, 8, got 3", "--group-size", "48", "float64"):
        assert problem in result.output
    assert "not empty" in result.output
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"


def test_refuses_to_overwrite_its_source(hf_folder):
    with pytest.raises(OndeviceLoraError, match="holds the source model"):
        convert(hf_folder, hf_folder, force=True)
