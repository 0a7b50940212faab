"""The quickstart's last stage: base and adapter in one Core ML package, proven against MLX.

The package is the one an iOS app loads (see examples/ios): a multifunction package with a
prefill/decode pair of functions for the plain base and one for the adapter, both over the same
int4 base weights (the 4-bit codes MLX trained on, stored once) and one KV-cache state, the
adapter as an unmerged low-rank branch; the tokenizer files go beside it. After writing it, the
saved package is read back and every function pair's logits are compared with MLX's, base and
adapter (validate_multifunction); past the tolerance that raises, as every export does.

coremltools is an optional dependency (`pip install "ondevice-lora[coreml]"`): without it the
stage is skipped with that message, and the rest of the quickstart still runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from ..adapters.files import read_adapter_config
from ..loading import load

PACKAGE_NAME = "personal.mlpackage"
ADAPTER_NAME = "personal"  # its functions: prefill_personal / decode_personal
DECODE_STEPS = 2  # decode steps compared after the prompt: the second reads what the first cached


@dataclass
class ExportOutcome:
    """What the export stage did. package is None when it was skipped (skipped_reason says why)."""

    package: Path | None
    functions: dict[str, list[str]] = field(default_factory=dict)  # name -> [prefill, decode]
    validated: bool = False
    summary: str = ""
    skipped_reason: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "package": str(self.package) if self.package is not None else None,
            "functions": self.functions,
            "validated": self.validated,
            "skipped_reason": self.skipped_reason,
            "summary": self.summary,
            "seconds": self.seconds,
        }


def coreml_unavailable_reason() -> str | None:
    """Why the Core ML export cannot run in this environment, or None when it can."""
    try:
        import converters.coreml.multifunction  # noqa: F401
    except ImportError as e:
        if "coremltools" in str(e):
            return (
                "coremltools is not installed; install it with "
                '`pip install "ondevice-lora[coreml]"` and run the quickstart again'
            )
        return f"the Core ML exporter could not be imported ({e})"
    return None


def export_adapter(
    adapter_dir: Path,
    out_dir: Path,
    context_length: int,
    prefill_length: int,
    prompt: str,
    console: Console,
    prompt_tokens: int | None = None,
) -> ExportOutcome:
    """Export the built-in base with the adapter in `adapter_dir` to out_dir, then validate.

    prompt: a question, rendered in the chat template, on which every function pair must
    match MLX; prompt_tokens: compare only its first tokens (None: all that fit the context).
    Validation evaluates the package op by op in numpy, so every token costs seconds.
    """
    reason = coreml_unavailable_reason()
    if reason is not None:
        console.print(f"[yellow]Core ML export skipped: {reason}.")
        return ExportOutcome(
            None, skipped_reason=reason, summary=f"Core ML export skipped: {reason}"
        )
    from converters.coreml.multifunction import export_multifunction, validate_multifunction
    from converters.coreml.weights import quantize_for_int4

    seconds = {}
    start = time.perf_counter()
    # The exporter takes the plain base and the adapter as a folder. A fresh load (under a
    # second) rather than unwrapping the trained model: the base is then certainly untouched.
    base, tokenizer = load(None)
    _, fingerprint = read_adapter_config(adapter_dir)
    # Layers whose codes an int4 package would re-quantise (none on a 4-bit base) are
    # quantised the same way here, so the MLX model is exactly what the package must match.
    quantize_for_int4(base)
    result = export_multifunction(
        base,
        tokenizer,
        {ADAPTER_NAME: adapter_dir},
        Path(out_dir) / PACKAGE_NAME,
        precision="int4",
        context_length=context_length,
        prefill_length=prefill_length,
        fingerprint=fingerprint,
    )
    seconds["export"] = round(time.perf_counter() - start, 2)
    console.print(result.summary())
    console.print(result.sizes.table())

    start = time.perf_counter()
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    limit = min(prompt_tokens or context_length, context_length - DECODE_STEPS)
    prompt_ids = prompt_ids[:limit]
    pairs = ", ".join("/".join(pair) for pair in result.functions.values())
    console.print(f"validating {pairs} against MLX on {len(prompt_ids)} prompt tokens...")
    # Raises CoreMLValidationError past the tolerance: a package that computes something else
    # than the trained model must not look like a success.
    reports = validate_multifunction(
        result.path, base, result.adapters, prompt_ids, decode_steps=DECODE_STEPS
    )
    seconds["validate"] = round(time.perf_counter() - start, 2)
    for report in reports.values():
        console.print(report.summary())
    return ExportOutcome(
        package=result.path,
        functions={name: list(pair) for name, pair in result.functions.items()},
        validated=all(r.passed for r in reports.values()),
        summary="\n".join([result.summary()] + [r.summary() for r in reports.values()]),
        seconds=seconds,
    )
