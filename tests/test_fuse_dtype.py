"""`fuse` chooses the dtype it writes from what the model needs: a source that names no dtype
(a GGUF file; here a config without one) reads as float16, which is kept when the model's
activations fit it and replaced by bfloat16 when they do not; the report evaluates the fused
model in the dtype written."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ondevice_lora.adapters.files import LoraConfig
from ondevice_lora.adapters.fuse import fuse
from ondevice_lora.loading import load
from tests.adapter_fixtures import TOKENS, write_adapter
from tests.hf_fixtures import write_hf_model

CONFIG = LoraConfig(rank=4, alpha=8, target_modules="all-linear")


def base_without_dtype(folder, embedding_factor: float = 1.0):
    """A tiny llama whose config names no dtype, its embedding table times the factor."""
    write_hf_model(folder, "llama")
    config = json.loads((folder / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    if embedding_factor != 1.0:
        weights = load_file(folder / "model.safetensors")
        weights["model.embed_tokens.weight"] *= np.float32(embedding_factor)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def written_dtype(folder) -> str:
    config = json.loads((folder / "config.json").read_text())
    return config.get("dtype", config.get("torch_dtype"))


def test_fuse_keeps_float16_when_the_activations_fit(tmp_path):
    base = base_without_dtype(tmp_path / "base")
    adapter = write_adapter(base, tmp_path / "adapter", CONFIG, 0.1)
    report = fuse(base, [adapter], tmp_path / "fused", dequantize=True)
    assert report.dtype == "float16" and report.dtype_note is None and report.finite
    assert written_dtype(tmp_path / "fused") == "float16"


# bfloat16's 8 bits lose most of a small adapter's effect on this embedding-dominated model, and
# fuse rightly warns about it; the dtype is what is tested here.
@pytest.mark.filterwarnings("ignore::ondevice_lora.adapters.fuse_report.FuseLossWarning")
def test_fuse_writes_bfloat16_where_float16_would_overflow(tmp_path):
    # Table entries reach ~0.4: times 1e5 the residual stream reaches ~4e4 and more, past
    # float16's 65,504 / 2.
    base = base_without_dtype(tmp_path / "base", embedding_factor=1e5)
    adapter = write_adapter(base, tmp_path / "adapter", CONFIG, 0.1)
    report = fuse(base, [adapter], tmp_path / "fused", dequantize=True)
    assert report.dtype == "bfloat16" and report.finite
    assert "past float16" in report.dtype_note
    assert written_dtype(tmp_path / "fused") == "bfloat16"
    fused, _ = load(tmp_path / "fused")
    assert np.isfinite(np.array(fused(TOKENS).astype(mx.float32))).all()


def test_forcing_float16_on_such_a_model_is_reported_as_not_finite(tmp_path):
    base = base_without_dtype(tmp_path / "base", embedding_factor=1e6)
    adapter = write_adapter(base, tmp_path / "adapter", CONFIG, 0.1)
    with pytest.warns(UserWarning, match="not finite in float16"):
        report = fuse(base, [adapter], tmp_path / "fused", dequantize=True, dtype="float16")
    assert not report.finite


def test_convert_chooses_its_dtype_the_same_way(tmp_path, capsys):
    # `convert` of a source naming no dtype (a GGUF) also keeps float16 only where it fits.
    from ondevice_lora.loading.convert import convert

    fits = base_without_dtype(tmp_path / "fits")
    convert(fits, tmp_path / "fits-4bit", bits=4, group_size=32)
    assert written_dtype(tmp_path / "fits-4bit") == "float16"
    overflows = base_without_dtype(tmp_path / "overflows", embedding_factor=1e5)
    convert(overflows, tmp_path / "overflows-4bit", bits=4, group_size=32)
    assert written_dtype(tmp_path / "overflows-4bit") == "bfloat16"
    assert "past float16" in capsys.readouterr().err
    converted, _ = load(tmp_path / "overflows-4bit")
    assert np.isfinite(np.array(converted(TOKENS).astype(mx.float32))).all()
