"""Fit a decoder into fp16 before building it: measure its activations, then carry the residual
stream divided by a power of two where it would come close to fp16's largest value.

An iPhone runs int4 and fp16 packages in fp16 (the Neural Engine knows no other type), whose
largest finite value is 65,504. Real checkpoints pass it: Gemma 3 270M's residual stream reaches
|h| ~ 1e5, SmolLM2-135M's 2.5e4 at the first position. Every norm that reads the residual is an
RMSNorm, and RMSNorm(x; eps) == RMSNorm(x / s; eps / s^2) for any s > 0, so the whole residual
stream can be carried as h / s: the embedding and every write into the residual (o_proj and
down_proj, or Gemma's post-norm weights) are scaled by 1 / s once, at export, and the norms
reading it take eps / s^2. Every normalised value, and so the logits, is the same function; a
power of two makes the scaling itself exact in fp16.

    ranges = measure_ranges(model, calibration_ids(tokenizer))
    scale = residual_scale(ranges)              # 1.0 when the model fits with margin
    weights = rescale_residual(weights, scale)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ondevice_lora.errors import OndeviceLoraError
from ondevice_lora.models.activation_range import FP16_MAX, ActivationRanges, measure_ranges

from .build import DecoderWeights, LinearWeights

# Keep every measured value under FP16_MAX / SAFETY_MARGIN: the calibration text is not every
# text a user will type, and a fp16 sum rounds up by a few steps on the way.
SAFETY_MARGIN = 16.0
# Built-in calibration text: plain prose, a list, code and digits, so that the ranges seen
# cover more than one kind of input. The validation prompt and --calibration FILE add to it.
CALIBRATION_PARAGRAPHS = (
    "The river rose during the night, and by morning the lower fields were under water. The "
    "farmers moved their animals to the hill and waited for the rain to stop.",
    "Shopping list: 2 litres of milk, 12 eggs, 500 g of flour, 3 lemons, a jar of honey.",
    "def mean(values):\n    return sum(values) / len(values)\n\nprint(mean([3, 1, 4, 1, 5]))",
    "In 1969 the first people walked on the Moon; 384,400 km away, their words reached Earth "
    "about 1.3 seconds later.",
)
MAX_CALIBRATION_TOKENS = 256  # per text: enough to see the ranges, quick on a laptop


class CalibrationError(OndeviceLoraError):
    """A calibration file cannot be read."""


def calibration_ids(tokenizer, extra_texts: list[str] = ()) -> list[list[int]]:
    """Token ids of the built-in paragraphs and `extra_texts` (the validation prompt, the
    user's --calibration file), each cut to MAX_CALIBRATION_TOKENS."""
    texts = list(CALIBRATION_PARAGRAPHS) + [t for t in extra_texts if t.strip()]
    return [tokenizer.encode(t)[:MAX_CALIBRATION_TOKENS] for t in texts]


def read_calibration_file(path) -> str:
    """The text of a --calibration file (UTF-8), or a CalibrationError saying what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"{path}: calibration file not found.") from None
    except UnicodeDecodeError as e:
        raise CalibrationError(
            f"{path}: byte {e.start} is not UTF-8; give the calibration text as a UTF-8 file."
        ) from None
    if not text.strip():
        raise CalibrationError(f"{path}: the calibration file is empty; give a few paragraphs.")
    return text


def residual_scale(ranges: ActivationRanges, margin: float = SAFETY_MARGIN) -> float:
    """The smallest power of two s >= 1 that brings the largest |residual| under
    FP16_MAX / margin."""
    limit = FP16_MAX / margin
    return float(2.0 ** max(0, math.ceil(math.log2(ranges.largest_residual / limit))))


def rescale_residual(w: DecoderWeights, scale: float) -> DecoderWeights:
    """`w` computing the same logits with its residual stream carried divided by `scale`.

    The embedding (through its scale factor, so a tied lm_head keeps the table as it is) and
    every write into the residual are divided by `scale`: o_proj and down_proj outputs in
    pre-norm models, the post-norm weights in Gemma's sandwich-normed layers. The builder
    gives the norms that read the residual eps / scale^2 (build.convert_layer).
    """
    if scale == 1.0:
        return w
    if math.log2(scale) != int(math.log2(scale)):
        raise ValueError(f"the residual scale must be a power of two, got {scale}")
    layers = []
    for layer in w.layers:
        if layer.pre_feedforward_layernorm is not None:  # Gemma: norms write the residual
            layers.append(
                dataclasses.replace(
                    layer,
                    post_attention_layernorm=layer.post_attention_layernorm / scale,
                    post_feedforward_layernorm=layer.post_feedforward_layernorm / scale,
                )
            )
            continue
        writes = {}
        for name in ("o_proj", "down_proj"):
            lin: LinearWeights = getattr(layer, name)
            writes[name] = dataclasses.replace(lin, output_scale=lin.output_scale / scale)
        layers.append(dataclasses.replace(layer, **writes))
    embed_scale = (w.embed_scale or 1.0) / scale
    return dataclasses.replace(
        w, layers=layers, embed_scale=embed_scale, residual_scale=w.residual_scale * scale
    )


@dataclass
class FitReport:
    """What the exporter measured and chose."""

    ranges: ActivationRanges
    scale: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = self.ranges.summary()
        if self.scale == 1.0:
            return text + "; no rescaling needed"
        return text + (
            f"; residual stream carried divided by {self.scale:g} (largest |residual| "
            f"{self.ranges.largest_residual / self.scale:.4g} in the package)"
        )


@dataclass(frozen=True)
class Fp16Fit:
    """How an int4 or fp16 export fits the model into fp16.

    rescale: carry the residual stream divided by a power of two where the calibration text
    says it would pass FP16_MAX / margin (off: build the model as it is, e.g. to see it fail).
    calibration_texts: added to the built-in paragraphs (the validation prompt, --calibration).
    """

    rescale: bool = True
    calibration_texts: tuple[str, ...] = ()
    margin: float = SAFETY_MARGIN


DEFAULT_FIT = Fp16Fit()


def fit_fp16(model, tokenizer, w: DecoderWeights, fit: Fp16Fit | None) -> tuple:
    """(weights to build, FitReport) for an export of `model` whose weights are `w`; fp32
    exports and fit=None are left as they are, with no report."""
    if fit is None or w.precision.np_dtype == np.float32:
        return w, None
    if tokenizer is None:  # no text to calibrate on: a fixed spread of token ids
        ids = [np.random.default_rng(0).integers(0, model.args.vocab_size, 64).tolist()]
    else:
        ids = calibration_ids(tokenizer, list(fit.calibration_texts))
    ranges = measure_ranges(model, ids)
    scale = residual_scale(ranges, fit.margin) if fit.rescale else 1.0
    return rescale_residual(w, scale), FitReport(ranges, scale)
