"""Core ML exports on the device's arithmetic: activations past fp16's range, found in float32
before building, carried rescaled so the package stays finite, and caught by the validator
when they are not.

Tiny random models never reach fp16's 65,504, so the model here is made to: a Gemma 3 layout
whose embedding table is scaled up until the scaled embedding (times sqrt(hidden) = 8) passes
it, as Gemma 3 270M's residual stream does (|h| ~ 1e5).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

ct = pytest.importorskip("coremltools")

from converters.coreml.export import export_coreml  # noqa: E402
from converters.coreml.fp16_range import (  # noqa: E402
    FP16_MAX,
    Fp16Fit,
    calibration_ids,
    measure_ranges,
)
from converters.coreml.mil_eval import load_package  # noqa: E402
from converters.coreml.placement import failed_path  # noqa: E402
from converters.coreml.validate import (  # noqa: E402
    CoreMLValidationError,
    PackageRunner,
    validate_package,
)
from ondevice_lora.loading import load  # noqa: E402
from tests.hf_fixtures import COMMON, VARIANTS  # noqa: E402
from tests.tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

CONTEXT, PREFILL = 48, 16
PROMPT = [int(t) for t in np.random.default_rng(5).integers(3, 500, size=24)]
# Table entries of the random model reach ~0.45; times this and times sqrt(64), the largest
# embedding is ~1.1e5, past fp16's maximum, while the table itself still fits fp16.
EMBEDDING_FACTOR = 3e4


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    """An untied tiny Gemma 3 whose embeddings overflow fp16, and its tokenizer."""
    folder = tmp_path_factory.mktemp("gemma-huge")
    _, _, extra = VARIANTS["gemma3_text"]
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(**{**COMMON, **extra, "tie_word_embeddings": False})
    transformers.Gemma3ForCausalLM(config).eval().save_pretrained(folder)
    write_tiny_tokenizer(folder)
    model, tokenizer = load(str(folder))
    embed = model.model.embed_tokens
    embed.weight = embed.weight * EMBEDDING_FACTOR
    mx.eval(model.parameters())
    return model, tokenizer


@pytest.fixture(scope="module")
def packages(huge, tmp_path_factory):
    """The fp16 package built as the model is (it fails its validation: kept with
    keep_failed), and rescaled (the default), each validated before it is put in place."""
    model, tokenizer = huge
    root = tmp_path_factory.mktemp("packages")
    settings = dict(context_length=CONTEXT, prefill_length=PREFILL, check=check_with(model))
    plain = root / "plain.mlpackage"
    with pytest.raises(CoreMLValidationError, match="fp16 OVERFLOW") as failure:
        export_coreml(model, tokenizer, plain, "fp16", fit=None, keep_failed=True, **settings)
    assert not plain.exists() and failed_path(plain).is_dir()
    rescaled = export_coreml(model, tokenizer, root / "rescaled.mlpackage", "fp16", **settings)
    return failed_path(plain), failure.value.report, rescaled


def check_with(model):
    return lambda path: validate_package(path, model, PROMPT, decode_steps=4)


def logits(path, mode: str) -> np.ndarray:
    runner = PackageRunner(load_package(path), mode=mode)
    return runner.prefill(PROMPT)


def test_calibration_measures_the_range_in_float32(huge):
    model, tokenizer = huge
    texts = calibration_ids(tokenizer)
    ranges = measure_ranges(model, texts)
    assert len(ranges.layers) == 2 and ranges.tokens == sum(map(len, texts))
    assert ranges.largest_residual > FP16_MAX  # what fp16 could not hold
    # The first norm reads the scaled embedding itself.
    expected = max(float(mx.abs(model.model.embed(mx.array([ids]))).max()) for ids in texts)
    assert ranges.layers[0]["input_layernorm"].max_abs == pytest.approx(expected, rel=1e-6)
    assert model.model.layers[0].input_layernorm.__class__.__name__ == "RMSNorm"  # restored


def test_rescaled_package_is_the_same_function(packages):
    plain, _, rescaled = packages
    assert rescaled.fit.scale >= 32
    meta = load_package(rescaled.path).metadata
    assert float(meta["ondevice_lora.residual_scale"]) == rescaled.fit.scale
    assert load_package(plain).metadata["ondevice_lora.residual_scale"] == "1.0"
    # Without fp16 rounding both packages compute the same logits: the scale is exact.
    a, b = logits(plain, "fp32"), logits(rescaled.path, "fp32")
    assert np.isfinite(a).all()
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_unscaled_package_overflows_fp16_and_says_where(packages):
    _, report, _ = packages
    assert not report.passed
    overflow = report.fp16_range.overflow
    assert overflow.startswith("op mul") and "the embedding" in overflow, overflow
    assert "fp16 OVERFLOW" in report.summary() and "65,504" in report.summary()


def test_rescaled_package_passes_on_fp16_arithmetic(packages):
    *_, rescaled = packages
    report = rescaled.validation
    assert report.passed and report.fp16_range.overflow is None
    assert report.interpreter.argmax_agreement == 1.0
    assert report.package == str(rescaled.path)  # the path it was moved to
    # The largest value is the embedding table's own entry (~1.2e4 here, a weight); every
    # activation computed from it stays under it.
    assert report.headroom >= 4, report.summary()
    assert "headroom" in report.summary()


def test_failed_export_leaves_nothing_at_out(huge, tmp_path, capsys):
    model, tokenizer = huge
    out = tmp_path / "x.mlpackage"
    stale = tmp_path / ".x.mlpackage.partial-999999999"  # a killed export's folder
    stale.mkdir()
    settings = dict(context_length=CONTEXT, prefill_length=PREFILL, check=check_with(model))
    with pytest.raises(CoreMLValidationError, match="fp16 OVERFLOW"):
        export_coreml(model, tokenizer, out, "fp16", fit=Fp16Fit(rescale=False), **settings)
    said = capsys.readouterr().err
    assert "left by an interrupted run" in said and "nothing was written" in said
    assert list(tmp_path.iterdir()) == []
