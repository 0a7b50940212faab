"""Prove that a saved Core ML package computes what the MLX model computes.

The package is read back from disk and evaluated op by op in numpy (mil_eval.py), independent
of the code that built it. A prompt goes through the package's `prefill` function in chunks of
its prefill length, then `decode` runs for a few steps; every position's logits are compared with
the MLX model's, run with its own KV cache. Both sides are fed the same tokens: each decode step
takes the MLX model's argmax of the previous position (teacher forcing), so one early
disagreement does not make every later position incomparable.

On macOS the real Core ML runtime runs the same calls and is compared too; elsewhere that part is
skipped and the report says so.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ondevice_lora.errors import OndeviceLoraError

from .mil_eval import MODES, Fp16Range, MilPackage, load_package
from .mil_storage import DECODE_FUNCTION, METADATA_PREFIX, PREFILL_FUNCTION

# fp32 exports compute what MLX computes in fp32: only summation order differs.
FP32_MAX_ABS = 1e-4
# fp16 and int4 exports round every op's result to fp16 (11 significant bits); over a decoder the
# logits drift by a few fp16 steps of their own magnitude. The bound is relative to the largest
# |logit| MLX produced on the prompt, so it means the same for a tiny test model and a real one:
# 1% of it (measured: ~0.1-0.3% on the test models and SmolLM2-135M).
FP16_MAX_ABS_RELATIVE = 1e-2
# The argmax must agree at every position, except where MLX itself ranks the two tokens closer
# than the package can resolve: fp16 logits are spaced 2^-10 of their magnitude apart, so a
# margin below FP16_TIE_RELATIVE of the largest |logit| is a tie in fp16 (measured: MLX margin
# 0.0018 at logits of 3.3, where fp16 stores both tokens as the same number).
MIN_ARGMAX_AGREEMENT = 1.0
FP16_TIE_RELATIVE = 2.0**-10


class CoreMLValidationError(OndeviceLoraError):
    """A package's outputs differ from MLX's past the tolerance; `.report` has the figures."""

    def __init__(self, report: ValidationReport):
        super().__init__(f"Core ML validation failed for {report.package}:\n{report.summary()}")
        self.report = report


@dataclass(frozen=True)
class Tolerances:
    """How close a package must come to MLX.

    max_abs: bound on the largest |logit difference|. tie_margin: an argmax disagreement
    where MLX's logits of the two tokens differ by no more than this is a near-tie, not an
    error. With relative=True both are fractions of the largest |logit| MLX produced.
    min_argmax_agreement: fraction of positions whose argmax must agree, near-ties aside.
    """

    max_abs: float
    tie_margin: float
    relative: bool = False
    min_argmax_agreement: float = MIN_ARGMAX_AGREEMENT

    def bound(self, logit_scale: float) -> float:
        return self.max_abs * max(logit_scale, 1.0) if self.relative else self.max_abs

    def tie(self, logit_scale: float) -> float:
        return self.tie_margin * max(logit_scale, 1.0) if self.relative else self.tie_margin


TOLERANCES = {
    "fp32": Tolerances(FP32_MAX_ABS, tie_margin=FP32_MAX_ABS),
    "fp16": Tolerances(FP16_MAX_ABS_RELATIVE, FP16_TIE_RELATIVE, relative=True),
    "int4": Tolerances(FP16_MAX_ABS_RELATIVE, FP16_TIE_RELATIVE, relative=True),
}


@dataclass
class Comparison:
    """Package logits against MLX's over the same positions.

    argmax_agreement counts every position; near_ties are the disagreements MLX itself calls
    a tie within the tolerance's tie margin, which the pass decision forgives.
    """

    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float
    mismatched_positions: list[int]
    near_ties: list[int]
    per_position_max_abs: list[float] = field(repr=False)

    @property
    def decisive_agreement(self) -> float:
        """Fraction of positions that agree or are near-ties."""
        wrong = len(self.mismatched_positions) - len(self.near_ties)
        return 1.0 - wrong / len(self.per_position_max_abs)

    def passes(self, bound: float, tolerances: Tolerances) -> bool:
        return (
            self.max_abs_diff <= bound
            and self.decisive_agreement >= tolerances.min_argmax_agreement
        )

    def describe(self) -> str:
        text = f"max |logit diff| {self.max_abs_diff:.3g} (mean {self.mean_abs_diff:.3g}), "
        text += f"argmax agreement {self.argmax_agreement:.1%}"
        if self.mismatched_positions:
            text += f", differs at positions {self.mismatched_positions}"
        if self.near_ties:
            text += f" ({self.near_ties} near-ties in MLX)"
        return text


@dataclass
class ValidationReport:
    """The comparison of one package (one prefill/decode pair of functions) with MLX.

    interpreter: the numpy evaluation of the saved package; runtime: Core ML itself, or None
    where it cannot run (runtime_skip_reason says why).
    """

    package: str
    functions: tuple[str, str]
    precision: str
    mode: str
    positions: int
    logit_scale: float
    max_abs_bound: float
    tolerances: Tolerances
    interpreter: Comparison
    runtime: Comparison | None = None
    runtime_skip_reason: str | None = None
    seconds: float = 0.0
    # The fp16-rounded results of the numpy evaluation: largest |activation|, headroom and the
    # first op that overflowed (None for an evaluation that rounds nothing to fp16).
    fp16_range: Fp16Range | None = None

    @property
    def headroom(self) -> float | None:
        """fp16's maximum over the largest |activation| the evaluation saw (None: no fp16)."""
        return None if self.fp16_range is None else self.fp16_range.headroom

    @property
    def max_abs_diff(self) -> float:
        return self.interpreter.max_abs_diff

    @property
    def argmax_agreement(self) -> float:
        return self.interpreter.argmax_agreement

    @property
    def runtime_checked(self) -> bool:
        return self.runtime is not None

    @property
    def passed(self) -> bool:
        checks = [self.interpreter] + ([self.runtime] if self.runtime else [])
        overflowed = self.fp16_range is not None and self.fp16_range.overflow is not None
        return not overflowed and all(c.passes(self.max_abs_bound, self.tolerances) for c in checks)

    def summary(self) -> str:
        """A few lines for the CLI and for error messages."""
        lines = [
            f"{'PASSED' if self.passed else 'FAILED'}: {self.functions[0]}/{self.functions[1]} "
            f"({self.precision}, {self.mode} evaluation) vs MLX over {self.positions} positions; "
            f"bound {self.max_abs_bound:.3g} (largest |logit| {self.logit_scale:.3g})",
            f"  numpy evaluation of the saved package: {self.interpreter.describe()}",
        ]
        fp16 = self.fp16_range
        if fp16 is not None and fp16.max_abs:
            lines.append(
                f"  fp16 activations: largest |x| {fp16.max_abs:.4g} at {fp16.max_where}; "
                f"headroom {fp16.headroom:.3g}x below fp16's 65,504"
            )
        if fp16 is not None and fp16.overflow is not None:
            lines.append(
                f"  fp16 OVERFLOW: {fp16.overflow}. The device computes this package in fp16 and "
                "gets inf there; export with rescaling on (the default) or a --calibration text "
                "that reaches such activations, or export at --precision fp32."
            )
        if self.runtime is not None:
            lines.append(f"  Core ML runtime: {self.runtime.describe()}")
        else:
            lines.append(f"  Core ML runtime not run: {self.runtime_skip_reason}")
        return "\n".join(lines)


class PackageRunner:
    """Feeds tokens through a package's prefill and decode functions with one shared state.

    By default the numpy interpreter evaluates every call; with runtime=True Core ML itself
    does (macOS only). Logits come back as fp32 (positions, vocab).
    """

    def __init__(
        self,
        package: MilPackage,
        functions: tuple[str, str] = (PREFILL_FUNCTION, DECODE_FUNCTION),
        mode: str = "declared",
        extra_inputs: dict[str, np.ndarray] | None = None,
        runtime: bool = False,
    ):
        self.package = package
        self.prefill_function, self.decode_function = functions
        self.extra_inputs = dict(extra_inputs or {})
        self.prefill_length = package_prefill_length(package, self.prefill_function)
        self.context_length = package_context_length(package)
        self.backend = (
            _CoreMLBackend(package.path, functions) if runtime else _Interpreter(package, mode)
        )
        self.state = self.backend.make_state()
        self.position = 0

    def _call(self, function: str, ids: np.ndarray) -> np.ndarray:
        if self.position + ids.shape[1] > self.context_length:
            raise OndeviceLoraError(
                f"{self.package.path}: {self.position + ids.shape[1]} tokens exceed the "
                f"package's context length of {self.context_length}."
            )
        inputs = {"input_ids": ids, "position": np.array([self.position], np.int32)}
        outputs = self.backend.predict(function, inputs | self.extra_inputs, self.state)
        return np.asarray(outputs["logits"], np.float32)[0]

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Run `ids` in chunks of prefill_length, the last padded with 0; (len(ids), vocab)."""
        rows = []
        for start in range(0, len(ids), self.prefill_length):
            chunk = list(ids[start : start + self.prefill_length])
            padded = chunk + [0] * (self.prefill_length - len(chunk))
            logits = self._call(self.prefill_function, np.array([padded], np.int32))
            rows.append(logits[: len(chunk)])
            # Padded positions wrote the cache past the real tokens; the next call overwrites them.
            self.position += len(chunk)
        return np.concatenate(rows)

    def decode(self, token: int) -> np.ndarray:
        """One token through the decode function; its logits (vocab,)."""
        logits = self._call(self.decode_function, np.array([[token]], np.int32))
        self.position += 1
        return logits[0]


class _Interpreter:
    """The numpy evaluation of the saved package (mil_eval.py)."""

    def __init__(self, package: MilPackage, mode: str):
        self.package, self.mode = package, mode

    def make_state(self):
        return self.package.make_state(self.mode)

    def predict(self, function: str, inputs: dict, state) -> dict:
        return self.package.predict(function, inputs, state, self.mode)


class _CoreMLBackend:
    """Core ML itself (macOS only): one MLModel per function, one MLState shared by both, as
    an app shares one state across the functions of a package."""

    def __init__(self, path: Path, functions: tuple[str, str]):
        import coremltools as ct

        self.models = {f: ct.models.MLModel(str(path), function_name=f) for f in functions}

    def make_state(self):
        return next(iter(self.models.values())).make_state()

    def predict(self, function: str, inputs: dict, state) -> dict:
        return self.models[function].predict(inputs, state=state)


def package_prefill_length(package: MilPackage, function: str = PREFILL_FUNCTION) -> int:
    """The fixed number of tokens the prefill function takes (its input_ids shape)."""
    spec = package.functions[function].inputs.get("input_ids")
    if spec is None or len(spec.shape) != 2 or spec.shape[1] is None:
        raise OndeviceLoraError(f"{package.path}: {function} has no fixed-shape input_ids.")
    return spec.shape[1]


def package_context_length(package: MilPackage) -> int:
    """The KV cache's length: metadata if present, else the key_cache state's third axis."""
    value = package.metadata.get(METADATA_PREFIX + "context_length")
    if value is not None:
        return int(value)
    states = package.state_specs()
    if "key_cache" not in states:
        raise OndeviceLoraError(f"{package.path}: no key_cache state and no context_length.")
    return states["key_cache"].shape[2]


def mlx_reference_logits(
    mlx_model, prompt_ids: list[int], decode_steps: int
) -> tuple[np.ndarray, list[int]]:
    """MLX's logits (positions, vocab) for the prompt and `decode_steps` greedy steps after it,
    with its own KV cache; also the tokens the decode steps were fed."""
    import mlx.core as mx

    from ondevice_lora.models.base import make_cache

    cache = make_cache(mlx_model)
    logits = mlx_model(mx.array([prompt_ids], dtype=mx.int32), cache=cache)[0]
    rows = [np.array(logits.astype(mx.float32))]
    fed = []
    for _ in range(decode_steps):
        token = int(np.argmax(rows[-1][-1]))
        fed.append(token)
        logits = mlx_model(mx.array([[token]], dtype=mx.int32), cache=cache)[0]
        rows.append(np.array(logits.astype(mx.float32)))
    return np.concatenate(rows), fed


def run_package(runner: PackageRunner, prompt_ids: list[int], fed_tokens: list[int]) -> np.ndarray:
    """The package's logits for the prompt then one decode call per token of `fed_tokens`."""
    rows = [runner.prefill(prompt_ids)]
    rows += [runner.decode(t)[None] for t in fed_tokens]
    return np.concatenate(rows)


def compare_logits(reference: np.ndarray, candidate: np.ndarray, tie_margin: float) -> Comparison:
    """Compare two (positions, vocab) logit arrays; `reference` is MLX's."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    # NaN anywhere is a failure, never a pass: it compares as infinitely far.
    diff = np.where(np.isnan(diff), np.inf, diff)
    ref_top, cand_top = np.argmax(reference, -1), np.argmax(candidate, -1)
    mismatched = [int(i) for i in np.flatnonzero(ref_top != cand_top)]
    rows = np.arange(len(reference))
    # How much MLX prefers its own choice over the package's, at each position.
    margin = reference[rows, ref_top] - reference[rows, cand_top]
    return Comparison(
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        argmax_agreement=1.0 - len(mismatched) / len(reference),
        mismatched_positions=mismatched,
        near_ties=[p for p in mismatched if margin[p] <= tie_margin],
        per_position_max_abs=diff.max(axis=-1).tolist(),
    )


def package_precision(package: MilPackage, function: str = DECODE_FUNCTION) -> str:
    """The precision the package says it has, else fp32 or fp16 from its logits' dtype."""
    precision = package.metadata.get(METADATA_PREFIX + "precision")
    if precision in TOLERANCES:
        return precision
    logits = package.functions[function].output_specs.get("logits")
    return "fp32" if logits is not None and logits.dtype == np.float32 else "fp16"


def validate_package(
    package_path: str | Path | MilPackage,
    mlx_model,
    prompt_ids: list[int],
    decode_steps: int = 8,
    mode: str = "auto",
    tolerances: Tolerances | None = None,
    functions: tuple[str, str] = (PREFILL_FUNCTION, DECODE_FUNCTION),
    extra_inputs: dict[str, np.ndarray] | None = None,
    raise_on_failure: bool = True,
) -> ValidationReport:
    """Compare a saved package with `mlx_model` on `prompt_ids` plus `decode_steps` decode steps.

    mode: "auto" (= "declared": each op rounded to its declared dtype, as on the device),
    "declared", "fp16" (every op rounded to fp16) or "fp32" (no rounding, states in fp32).
    tolerances: default TOLERANCES[precision], the precision from the package's metadata.
    functions: the (prefill, decode) pair to run, e.g. one adapter's functions of a
    multifunction package. extra_inputs: fed to every call (a swappable package's adapter).
    Raises CoreMLValidationError past the tolerances unless raise_on_failure is False.
    """
    start = time.perf_counter()
    mode = "declared" if mode == "auto" else mode
    if mode not in MODES:
        raise OndeviceLoraError(f"mode {mode!r}: expected auto or one of {', '.join(MODES)}.")
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise OndeviceLoraError("validate_package needs a non-empty prompt.")
    # A loaded package may be passed instead of a path: a package validated function pair by
    # function pair is read, and its shared weights de-quantised, once.
    package = package_path if isinstance(package_path, MilPackage) else load_package(package_path)
    missing = [f for f in functions if f not in package.functions]
    if missing:
        raise OndeviceLoraError(
            f"{package.path}: no function {', '.join(missing)}; it has {', '.join(package.functions)}."
        )
    context = package_context_length(package)
    if len(prompt_ids) + decode_steps > context:
        raise OndeviceLoraError(
            f"a prompt of {len(prompt_ids)} tokens and {decode_steps} decode steps do not fit "
            f"the package's context of {context} tokens; use a shorter prompt."
        )
    precision = package_precision(package, functions[1])
    tolerances = tolerances or TOLERANCES[precision]

    reference, fed = mlx_reference_logits(mlx_model, prompt_ids, decode_steps)
    logit_scale = float(np.abs(reference).max())
    tie_margin = tolerances.tie(logit_scale)
    runner = PackageRunner(package, functions, mode, extra_inputs)
    package.fp16_range = Fp16Range()
    interpreter = compare_logits(reference, run_package(runner, prompt_ids, fed), tie_margin)
    seen = package.fp16_range
    report = ValidationReport(
        package=str(package.path),
        functions=tuple(functions),
        precision=precision,
        mode=mode,
        positions=len(reference),
        logit_scale=logit_scale,
        max_abs_bound=tolerances.bound(logit_scale),
        tolerances=tolerances,
        interpreter=interpreter,
        fp16_range=seen if mode != "fp32" and (seen.max_abs or seen.overflow) else None,
    )
    report.runtime_skip_reason = runtime_unavailable_reason()
    if report.runtime_skip_reason is None:
        runner = PackageRunner(package, functions, mode, extra_inputs, runtime=True)
        report.runtime = compare_logits(reference, run_package(runner, prompt_ids, fed), tie_margin)
    report.seconds = time.perf_counter() - start
    if raise_on_failure and not report.passed:
        raise CoreMLValidationError(report)
    return report


def runtime_unavailable_reason() -> str | None:
    """Why the Core ML runtime cannot run here, or None where it can (macOS 15+)."""
    if platform.system() != "Darwin":
        return f"the Core ML runtime exists only on macOS (this is {platform.system()})"
    major = int(platform.mac_ver()[0].split(".")[0] or 0)
    if major < 15:
        return f"stateful multifunction packages need macOS 15 or later (this is {platform.mac_ver()[0]})"
    return None
