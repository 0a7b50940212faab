"""`fuse` / `ondevice-lora fuse`: fused folders compute base + adapter, load in mlx-lm, and the
loss of re-quantising is measured and warned about."""

from __future__ import annotations

import json
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner

from ondevice_lora.adapters.files import AdapterError, LoraConfig
from ondevice_lora.adapters.fuse import MIN_KEPT_SHARE, FuseLossWarning, fuse, fuse_command
from ondevice_lora.adapters.mix import load_adapters
from ondevice_lora.errors import OndeviceLoraError
from ondevice_lora.loading import load
from ondevice_lora.loading.convert import (
    load_source,
    model_quantization,
    output_config,
    write_model_folder,
)
from tests.adapter_fixtures import TOKENS, write_adapter, write_bases_with_adapters
from tests.hf_fixtures import write_hf_model

CONFIGS = {
    "a": LoraConfig(rank=4, alpha=8, target_modules="all-linear"),
    "b": LoraConfig(rank=2, alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "d": LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "down_proj"], fine_tune_type="dora"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An fp32 base, the same base in 4 bits (fp32 scales), and adapters a, b, d for each."""
    return write_bases_with_adapters(tmp_path_factory.mktemp("fuse"), CONFIGS)


def adapted_logits(folders, kind, weights: dict) -> np.ndarray:
    """Logits of base + adapters, unfused: the reference every fused folder is held to."""
    model, tokenizer = load(folders[kind])
    load_adapters(model, {n: folders[f"{kind}/{n}"] for n in weights}, tokenizer, active=weights)
    return np.array(model(TOKENS))


def layers_of(model, kinds):
    return [m for _, m in model.layers[0].named_modules() if isinstance(m, kinds)]


@pytest.mark.parametrize("kind", ["base", "q4"])
@pytest.mark.parametrize("weights", [{"a": 1.0}, {"d": 1.0}, {"a": 0.7, "b": 0.3}])
def test_dequantized_fuse_equals_base_plus_adapters(folders, tmp_path, kind, weights):
    paths = [folders[f"{kind}/{n}"] for n in weights]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseLossWarning)
        report = fuse(folders[kind], paths, tmp_path, True, "float32", list(weights.values()))
    assert report.dequantized and report.kept == pytest.approx(1.0, abs=1e-4)
    assert report.effect_error < 1e-3
    config = json.loads((tmp_path / "config.json").read_text())
    assert (
        "quantization" not in config and config.get("dtype", config.get("torch_dtype")) == "float32"
    )
    fused, _ = load(tmp_path)
    assert not layers_of(fused, (nn.QuantizedLinear,)) and layers_of(fused, (nn.Linear,))
    expected = adapted_logits(folders, kind, weights)
    np.testing.assert_allclose(np.array(fused(TOKENS)), expected, atol=1e-4, rtol=0)


def test_requantized_fuse_prints_its_measured_loss(folders, tmp_path):
    args = ["--model", str(folders["q4"]), "--adapter", str(folders["q4/a"])]
    result = CliRunner().invoke(fuse_command, [*args, "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    report = fuse(folders["q4"], [folders["q4/a"]], tmp_path / "api")
    assert not report.dequantized and len(report.layers) == 14  # 7 projections x 2 layers
    output = " ".join(result.stdout.split())
    assert f"Fuse loss, worst 10 of {len(report.layers)} layers" in output
    assert f"Update kept after re-quantising to the base's format: {report.kept:.1%}" in output
    assert f"{report.effect_error:.1%} of the adapters' effect" in output
    assert report.worst()[0].path in output and "Wrote" in output
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    fused, _ = load(tmp_path / "cli")
    quantised = layers_of(fused, (nn.QuantizedLinear,))
    assert len(quantised) == 7 and {(q.bits, q.group_size) for q in quantised} == {(4, 32)}


def tiny_update(path, layer, delta):
    """A factor for lora_b that keeps every |ΔW| under 0.4 of the layer's smallest 4-bit step."""
    step = mx.abs(layer.base.scales).min()
    return (0.4 * step / mx.abs(delta).max()).item()


def test_fuse_warns_when_requantisation_erases_the_update(folders, tmp_path):
    tiny = write_adapter(folders["q4"], tmp_path / "tiny", CONFIGS["a"], scale_to=tiny_update)
    with pytest.warns(FuseLossWarning) as caught:
        report = fuse(folders["q4"], [tiny], tmp_path / "requantized")
    assert report.kept < 0.5 < MIN_KEPT_SHARE
    messages = [str(w.message) for w in caught]
    assert any("of the adapters' update survives re-quantisation" in m for m in messages)
    assert all("--dequantize" in m for m in messages)
    result = CliRunner().invoke(
        fuse_command, ["-m", str(folders["q4"]), "-a", str(tiny), "-o", str(tmp_path / "cli")]
    )
    assert result.exit_code == 0, result.output
    assert "Warning: only" in result.stdout and "--dequantize" in result.stdout
    # What the warning advises keeps the update.
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseLossWarning)
        report = fuse(folders["q4"], [tiny], tmp_path / "dense", dequantize=True, dtype="float32")
    assert report.kept == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    "dequantize, dtype", [(False, "float32"), (True, "float32"), (True, "bfloat16")]
)
def test_fused_folder_loads_in_mlx_lm_with_the_same_logits(folders, tmp_path, dequantize, dtype):
    fuse(folders["q4"], [folders["q4/a"]], tmp_path, dequantize, dtype)
    theirs, _ = mlx_lm.load(str(tmp_path))
    ours, _ = load(tmp_path)
    q_proj = ours.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) != dequantize
    assert (q_proj.weight if dequantize else q_proj.scales).dtype == getattr(mx, dtype)
    # float32 for numpy, which has no bfloat16; both compute in the folder's dtype.
    np.testing.assert_allclose(
        np.array(theirs(TOKENS).astype(mx.float32)),
        np.array(ours(TOKENS).astype(mx.float32)),
        atol=1e-4,
    )


def test_requantized_fuse_keeps_each_layers_own_format(folders, tmp_path):
    # A mixed base: layer 0's MLP in 8 bits with groups of 64, the embedding left dense.
    net, tokenizer, config = load_source(folders["base"])

    def settings(path, module):
        if not isinstance(module, nn.Linear):
            return False
        return {"group_size": 64, "bits": 8} if path.startswith("model.layers.0.mlp") else True

    nn.quantize(net, group_size=32, bits=4, class_predicate=settings)
    quant = model_quantization(net)
    assert quant["model.embed_tokens"] is False
    assert quant["model.layers.0.mlp.up_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    config = output_config(config, quant, "float32")
    write_model_folder(tmp_path / "mixed", net, tokenizer, config, folders["base"])
    adapter = write_adapter(tmp_path / "mixed", tmp_path / "adapter", CONFIGS["a"])

    fuse(tmp_path / "mixed", [adapter], tmp_path / "fused")
    fused, _ = load(tmp_path / "fused")
    base, _ = load(tmp_path / "mixed")

    def formats_of(model):
        return {
            path: (m.group_size, m.bits) if isinstance(m, nn.QuantizedLinear) else type(m).__name__
            for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding))
        }

    formats, fused_formats = formats_of(base), formats_of(fused)
    assert fused_formats == formats and formats["model.layers.0.mlp.down_proj"] == (64, 8)
    theirs, _ = mlx_lm.load(str(tmp_path / "fused"))
    np.testing.assert_allclose(np.array(theirs(TOKENS)), np.array(fused(TOKENS)), atol=1e-4)


def test_fusing_nothing_is_a_clear_error(folders, tmp_path):
    with pytest.raises(OndeviceLoraError, match="nothing to fuse"):
        fuse(folders["q4"], [], tmp_path / "out")
    result = CliRunner().invoke(fuse_command, ["-m", str(folders["q4"]), "-o", str(tmp_path)])
    assert result.exit_code == 1 and "nothing to fuse" in result.stderr
    assert not (tmp_path / "out").exists() and not any(tmp_path.iterdir())


def test_a_broken_adapter_is_a_clear_error_and_writes_nothing(folders, tmp_path):
    """An adapter whose weights hold a NaN (a diverged run) is refused, as PEFT's safe_merge
    refuses it, with a message rather than a traceback, and no output folder appears."""
    import shutil

    from ondevice_lora.loading.weights import read_safetensors

    broken = tmp_path / "broken"
    shutil.copytree(folders["q4/a"], broken)
    tensors = read_safetensors(broken / "adapters.safetensors")
    name = next(k for k in tensors if k.endswith("lora_b"))
    tensors[name] = mx.full(tensors[name].shape, float("nan"))
    mx.save_safetensors(str(broken / "adapters.safetensors"), tensors)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        fuse_command, ["-m", str(folders["q4"]), "-a", str(broken), "-o", str(out)]
    )
    assert result.exit_code == 1, result.output
    assert "non-finite weights" in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_an_adapter_for_another_architecture_is_refused(folders, tmp_path):
    write_hf_model(tmp_path / "qwen3", "qwen3")
    foreign = write_adapter(tmp_path / "qwen3", tmp_path / "foreign", CONFIGS["a"])
    with pytest.raises(OndeviceLoraError, match="trained on another base model") as error:
        fuse(folders["base"], [foreign], tmp_path / "out")
    assert "model_type: 'qwen3' for the adapter, 'llama' for this model" in str(error.value)
    # A 4-bit adapter on the fp32 base of the same model is refused too.
    with pytest.raises(OndeviceLoraError, match="quantization"):
        fuse(folders["base"], [folders["q4/a"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_invalid_fuse_settings_are_reported(folders, tmp_path):
    with pytest.raises(OndeviceLoraError) as error:
        fuse(folders["q4"], [folders["q4/a"]], folders["q4/a"], dtype="float8", weights=[1, 2])
    message = str(error.value)
    assert "is not empty" in message and "2 weights for 1 adapters" in message
    assert "--dtype must be one of" in message
    with pytest.raises(OndeviceLoraError, match="would overwrite the weights being read"):
        fuse(folders["q4"], [folders["q4/a"]], folders["q4"], force=True)
    with pytest.raises(OndeviceLoraError, match="not quantised, so there is nothing"):
        fuse(folders["base"], [folders["base/a"]], tmp_path / "out", dequantize=False)
    with pytest.raises(AdapterError, match="DoRA adapter d can only be active alone"):
        fuse(folders["base"], [folders["base/a"], folders["base/d"]], tmp_path / "out")
