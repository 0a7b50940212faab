"""Slow tier: Core ML int4 exports of real checkpoints, validated on the device's arithmetic.

Gemma 3 270M's residual stream reaches ~1e5, past fp16's 65,504: before rescaling, its int4
package gave inf logits and 0% argmax agreement. SmolLM2-135M (the built-in model) reaches
2.5e4. Each package is validated with every fp16-typed result rounded to fp16, against MLX in
float32 (the int4-quantised model: the codes the package keeps).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("coremltools")

from converters.coreml.cli import DECODE_STEPS, VALIDATION_TEXT, _validation_prompt  # noqa: E402
from converters.coreml.export import export_coreml  # noqa: E402
from converters.coreml.fp16_range import Fp16Fit  # noqa: E402
from converters.coreml.multifunction import export_multifunction, validate_multifunction  # noqa: E402
from converters.coreml.validate import validate_package  # noqa: E402
from converters.coreml.weights import quantize_for_int4  # noqa: E402
from ondevice_lora.adapters.files import LoraConfig  # noqa: E402
from ondevice_lora.adapters.fingerprint import base_fingerprint  # noqa: E402
from ondevice_lora.loading import load  # noqa: E402
from tests.adapter_fixtures import write_adapter  # noqa: E402
from tests.real_models import gemma3_270m_path  # noqa: E402

pytestmark = pytest.mark.slow

POSITIONS = 64  # prompt + greedy decode steps compared with MLX
CONTEXT, PREFILL = 96, 32
FIT = Fp16Fit(calibration_texts=(VALIDATION_TEXT,))


def prompt_and_steps(tokenizer) -> tuple[list[int], int]:
    ids = _validation_prompt(tokenizer, POSITIONS - DECODE_STEPS)
    return ids, POSITIONS - len(ids)


@pytest.fixture(scope="module")
def gemma():
    """Gemma 3 270M in float32, its base fingerprint, then quantised to int4 as the CLI does."""
    model, tokenizer = load(str(gemma3_270m_path()))
    fingerprint = base_fingerprint(model, tokenizer)
    quantize_for_int4(model)
    return model, tokenizer, fingerprint


def assert_fits_fp16(report, min_agreement: float) -> None:
    summary = report.summary()
    assert report.passed, summary
    assert report.positions == POSITIONS
    assert report.fp16_range.overflow is None and np.isfinite(report.max_abs_diff), summary
    assert report.interpreter.argmax_agreement >= min_agreement, summary
    assert "headroom" in summary
    print(summary)


def test_gemma_int4_merged_export_passes_on_fp16_arithmetic(gemma, tmp_path):
    model, tokenizer, fingerprint = gemma
    ids, steps = prompt_and_steps(tokenizer)
    result = export_coreml(
        model,
        tokenizer,
        tmp_path / "gemma.mlpackage",
        "int4",
        CONTEXT,
        fingerprint=fingerprint,
        prefill_length=PREFILL,
        fit=FIT,
        check=lambda path: validate_package(path, model, ids, steps),
    )
    print(result.fit.summary())
    assert result.fit.ranges.largest_residual > 65504 and result.fit.scale >= 16
    assert_fits_fp16(result.validation, 0.98)


def test_gemma_int4_multifunction_export_passes_on_fp16_arithmetic(gemma, tmp_path):
    model, tokenizer, fingerprint = gemma
    config = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = write_adapter(str(gemma3_270m_path()), tmp_path / "tone", config, 0.02)
    ids, steps = prompt_and_steps(tokenizer)
    result = export_multifunction(
        model,
        tokenizer,
        [adapter],
        tmp_path / "multi.mlpackage",
        "int4",
        CONTEXT,
        PREFILL,
        fingerprint=fingerprint,
        fit=FIT,
        check=lambda path: validate_multifunction(path, model, {"tone": adapter}, ids, steps),
    )
    assert list(result.validation) == ["base", "tone"]
    for report in result.validation.values():
        assert_fits_fp16(report, 0.98)


# SmolLM2's 8x headroom is checked on its real-tier exports (tests/test_real_models.py).
