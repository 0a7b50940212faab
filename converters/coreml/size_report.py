"""What an export costs an app in bytes, and what shipping merged copies instead would cost.

Every export (merged, multifunction, swappable) fills one SizeReport. The figures come from two
places: the weights as the builder stored them (int4 codes count half a byte, see
export.weight_bytes) and the files on disk. The merged-copies figure is computed, not built:
one merged package per adapter would hold the whole base again (a LoRA update folded into a
4-bit weight gives another 4-bit weight of the same size) plus one prefill/decode program.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .build import DecoderWeights, LoraBranch

WEIGHTS_FOLDER = "Data/com.apple.CoreML/weights"
MIB = 1024 * 1024


def branch_bytes(branch: LoraBranch, itemsize: int) -> int:
    """Bytes an unmerged adapter branch adds to a package: A, B (and DoRA's row factor)."""
    arrays = (branch.a, branch.b, branch.row_factor)
    return sum(a.size * itemsize for a in arrays if a is not None)


def adapter_weight_bytes(w: DecoderWeights) -> int:
    """Bytes of every constant adapter branch in `w`, at the compute dtype."""
    itemsize = np.dtype(w.precision.np_dtype).itemsize
    linears = [lin for layer in w.layers for lin in layer.linears().values()]
    return sum(branch_bytes(x.lora, itemsize) for x in linears if x.lora is not None)


def blobs_by_function(package: Path) -> dict[str, dict[tuple[str, int], int]]:
    """For each function of a saved package, the weight blobs it reads: (file, offset) -> the
    bytes that blob takes in its file (64-byte record plus data, padded to 64 bytes, as the
    blob storage format lays them out). A blob two functions share is one entry in both."""
    from coremltools.proto import Model_pb2

    from .mil_storage import model_file

    spec = Model_pb2.Model()
    spec_path = model_file(Path(package))
    spec.ParseFromString(spec_path.read_bytes())
    sizes: dict[tuple[str, int], int] = {}

    def blob_size(file_name: str, offset: int) -> int:
        path = spec_path.parent / file_name.removeprefix("@model_path/")
        with open(path, "rb") as f:
            f.seek(offset + 8)  # the record: u32 sentinel, u32 dtype, u64 size, ...
            size = int.from_bytes(f.read(8), "little")
        return 64 + -(-size // 64) * 64

    found = {}
    for name, function in spec.mlProgram.functions.items():
        values = []
        for op in function.block_specializations[function.opset].operations:
            values += list(op.attributes.values())
            values += [
                b.value for arg in op.inputs.values() for b in arg.arguments if b.HasField("value")
            ]
        blobs = {}
        for value in values:
            if value.WhichOneof("value") == "blobFileValue":
                key = (value.blobFileValue.fileName, value.blobFileValue.offset)
                if key not in sizes:
                    sizes[key] = blob_size(*key)
                blobs[key] = sizes[key]
        found[name] = blobs
    return found


def pair_weight_bytes(
    package: Path, pairs: dict[str, tuple[str, str]], base: str
) -> tuple[int, dict[str, int]]:
    """Measured from the package: the bytes of the blobs the `base` pair of functions reads,
    and for every other pair the bytes of the blobs it reads that the base pair does not."""
    blobs = blobs_by_function(package)

    def union(name: str) -> dict:
        return {k: v for f in pairs[name] for k, v in blobs[f].items()}

    base_blobs = union(base)
    own = {
        name: sum(v for k, v in union(name).items() if k not in base_blobs)
        for name in pairs
        if name != base
    }
    return sum(base_blobs.values()), own


def weight_file_bytes(package: Path) -> int:
    """Bytes of the package's weight files (weight.bin): shared constants stored once."""
    folder = Path(package) / WEIGHTS_FOLDER
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@dataclass
class SizeReport:
    """The bytes of one export.

    base_weight_bytes: the base's weights as stored. adapter_bytes: per adapter, what it adds
    to the package (adapters_inside) or the size of its adapter file (swappable), measured;
    adapter_tensor_bytes: its A and B (and DoRA factor) at the compute dtype, computed.
    package_bytes / weight_file_bytes: measured on disk; the difference is the program text
    and layout. function_pairs: prefill/decode pairs in the package.
    """

    kind: str
    package: Path
    base_weight_bytes: int
    package_bytes: int
    weight_file_bytes: int
    function_pairs: int
    adapter_bytes: dict[str, int] = field(default_factory=dict)
    adapters_inside: bool = True
    adapter_tensor_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def program_bytes(self) -> int:
        return self.package_bytes - self.weight_file_bytes

    @property
    def total_bytes(self) -> int:
        """What the app ships: the package, plus the adapter files of a swappable export."""
        outside = 0 if self.adapters_inside else sum(self.adapter_bytes.values())
        return self.package_bytes + outside

    @property
    def merged_copy_bytes(self) -> int:
        """Estimated size of one merged package: the base's weights plus one pair's program."""
        return self.base_weight_bytes + self.program_bytes // max(self.function_pairs, 1)

    @property
    def merged_total_bytes(self) -> int:
        """Estimated size of one merged package per adapter (at least one)."""
        return max(len(self.adapter_bytes), 1) * self.merged_copy_bytes

    def table(self) -> Table:
        table = Table(title=f"{self.kind} export: {self.package.name}", title_justify="left")
        table.add_column("part")
        table.add_column("bytes", justify="right")
        table.add_column("MiB", justify="right")

        def row(label: str, value: int, style: str | None = None):
            table.add_row(label, f"{value:,}", f"{value / MIB:.2f}", style=style)

        row("base weights", self.base_weight_bytes)
        where = "in the package" if self.adapters_inside else "file"
        for name, value in self.adapter_bytes.items():
            tensors = self.adapter_tensor_bytes.get(name)
            detail = f"; tensors {tensors:,}" if tensors is not None else ""
            row(f"adapter {name} ({where}{detail})", value)
        row(f"program text and layout ({self.function_pairs} function pairs)", self.program_bytes)
        row("package on disk", self.package_bytes)
        row("total shipped", self.total_bytes, style="bold")
        n = max(len(self.adapter_bytes), 1)
        row(
            f"instead, merged copies: {n} x {self.merged_copy_bytes:,} (estimate)",
            self.merged_total_bytes,
        )
        return table

    def render(self, width: int = 100) -> str:
        """The table as plain text (for click.echo and logs)."""
        console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
        console.print(self.table())
        saved = self.merged_total_bytes / self.total_bytes if self.total_bytes else 0.0
        console.print(f"merged copies would be {saved:.1f}x the size of this export")
        return console.export_text()
