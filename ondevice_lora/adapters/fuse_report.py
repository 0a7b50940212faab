"""What a fuse loses: per-layer and whole-model measures, the warning thresholds, the report.

`fuse` (fuse.py) fills a FuseReport before it writes anything; print_report shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Below this share of the adapters' update surviving in the stored weights, fuse warns.
MIN_KEPT_SHARE = 0.9
# Above this, the fused logits are further from base + adapter than half the adapter's own
# effect on them (||fused - adapted|| / ||adapted - base||): the fused model is another model.
MAX_EFFECT_ERROR = 0.5
WORST_LAYERS_SHOWN = 10


class FuseLossWarning(UserWarning):
    """Fusing loses a noticeable part of what the adapters do."""


@dataclass
class LayerLoss:
    """What folding the adapters into one layer keeps.

    kept: <D, ΔW> / ||ΔW||^2 with D = Q(W + ΔW) - Q(W), Q the stored format: the share of the
        update along its own direction. A norm ratio ||D|| / ||ΔW|| would count as kept any
        change at all, such as codes that flip because ΔW moved their group's min or max (and so
        its scale): noise that does nothing the adapter learned. Q(W) rather than W because
        MLX's affine re-quantisation of already quantised weights is not exact: taking the
        difference cancels the grid shift that W and W + ΔW share.
    error: ||D - ΔW|| / ||ΔW||, how far the stored update is from the intended one.
    relative_size: ||ΔW|| / ||W||.
    """

    path: str
    kept: float
    error: float
    relative_size: float
    projected: float = field(repr=False)  # <D, ΔW>, for the whole-model share
    delta_sq: float = field(repr=False)  # ||ΔW||^2


@dataclass
class FuseReport:
    """The measured loss of one fuse, and the folder written."""

    out_folder: Path
    dequantized: bool
    dtype: str
    layers: list[LayerLoss]
    sample_tokens: int
    logits_error: float  # ||fused - adapted|| / ||adapted||, over all sample logits
    effect_error: float  # ||fused - adapted|| / ||adapted - base||
    warnings: list[str]
    dtype_note: str | None = None  # why fuse chose another dtype than the source's
    finite: bool = True  # every fused logit finite, evaluated in `dtype`

    @property
    def kept(self) -> float:
        """The share of the whole update kept, over every fused layer (big layers weigh more)."""
        total = sum(layer.delta_sq for layer in self.layers)
        return sum(layer.projected for layer in self.layers) / total if total else float("nan")

    def worst(self, n: int = WORST_LAYERS_SHOWN) -> list[LayerLoss]:
        # NaN (a layer the active adapters leave unchanged) sorts last.
        return sorted(self.layers, key=lambda x: (x.kept != x.kept, x.kept))[:n]


def loss_warnings(report: FuseReport) -> list[str]:
    """One message per threshold the report crosses, each saying what to do instead."""
    separate = "keep the adapter separate and load it on the base (`generate --adapter`)"
    if not report.dequantized:
        storage = "re-quantisation to the base's format"
        advice = f"Fuse with --dequantize instead (a dense, larger model), or {separate}."
    elif report.dtype != "float32":
        storage = f"{report.dtype} weights"
        advice = f"Fuse with --dtype float32 instead, or {separate}."
    else:
        storage, advice = "float32 weights", f"Better {separate}."
    found = []
    if not report.finite:
        found.append(
            f"the fused model's logits are not finite in {report.dtype}: its activations "
            f"overflow {report.dtype}, and it would generate garbage. Fuse with --dtype bfloat16 "
            "or --dtype float32."
        )
    if report.kept < MIN_KEPT_SHARE:
        found.append(
            f"only {report.kept:.1%} of the adapters' update survives {storage} (MIN_KEPT_SHARE "
            f"is {MIN_KEPT_SHARE:.0%}): rounding erases the rest, and the fused model answers "
            f"more like the base. {advice}"
        )
    if report.effect_error > MAX_EFFECT_ERROR:
        found.append(
            f"the fused model's logits differ from base + adapter by {report.effect_error:.0%} "
            f"of the adapters' own effect (MAX_EFFECT_ERROR is {MAX_EFFECT_ERROR:.0%}). {advice}"
        )
    return found


def print_report(report: FuseReport, console) -> None:
    """The worst layers as a rich table, then the summary and any warning."""
    from rich.markup import escape
    from rich.table import Table

    storage = (
        f"in {report.dtype} weights"
        if report.dequantized
        else "after re-quantising to the base's format"
    )
    shown = report.worst()
    table = Table(title=f"Fuse loss, worst {len(shown)} of {len(report.layers)} layers")
    table.add_column("layer")
    table.add_column("kept", justify="right")
    table.add_column("update error", justify="right")
    table.add_column("|ΔW|/|W|", justify="right")
    for layer in shown:
        table.add_row(
            layer.path, _percent(layer.kept), _percent(layer.error), f"{layer.relative_size:.2e}"
        )
    console.print(table)
    console.print(
        f"Update kept {storage}: {_percent(report.kept)} (warn below {MIN_KEPT_SHARE:.0%})",
        soft_wrap=True,
    )
    console.print(
        f"Logits ({report.dtype}) vs base + adapter on {report.sample_tokens} sample tokens: "
        f"relative error "
        f"{report.logits_error:.2e}, {_percent(report.effect_error)} of the adapters' effect "
        f"(warn above {MAX_EFFECT_ERROR:.0%})",
        soft_wrap=True,
    )
    if report.dtype_note:
        console.print(f"Note: {escape(report.dtype_note)}", soft_wrap=True)
    for message in report.warnings:
        console.print(f"[bold yellow]Warning:[/] {escape(message)}", soft_wrap=True)


def _percent(value: float) -> str:
    return "-" if value != value else f"{value:.1%}"
