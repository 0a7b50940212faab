"""Reading a saved ML Program's storage: Model.proto value types, immediate values and the blob
weight file, re-implemented from the published formats (MIL.proto, MILBlob StorageFormat) so a
package is read back without the code that wrote it.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ondevice_lora.errors import OndeviceLoraError

# The package's function names and metadata key prefix: the exporter writes them, the
# validator reads them.
PREFILL_FUNCTION, DECODE_FUNCTION = "prefill", "decode"
METADATA_PREFIX = "ondevice_lora."

# MIL DataType enum (MIL.proto) -> (numpy dtype, bits per element for packed sub-byte types).
_MIL_DTYPES = {
    1: (np.bool_, None),  # BOOL
    10: (np.float16, None),
    11: (np.float32, None),
    12: (np.float64, None),
    21: (np.int8, None),
    22: (np.int16, None),
    23: (np.int32, None),
    24: (np.int64, None),
    25: (np.int8, 4),  # INT4, widened to int8
    31: (np.uint8, None),
    32: (np.uint16, None),
    33: (np.uint32, None),
    34: (np.uint64, None),
    35: (np.uint8, 4),  # UINT4
    36: (np.uint8, 2),  # UINT2
    37: (np.uint8, 1),  # UINT1
    38: (np.uint8, 6),  # UINT6
    39: (np.uint8, 3),  # UINT3
}
_SIGNED_SUB_BYTE = {25}
_STRING = 2
# Blob storage's own dtype enum (MILBlob BlobDataType) -> the MIL DataType it stores.
_BLOB_TO_MIL = {1: 10, 2: 11, 3: 31, 4: 21, 6: 22, 7: 32, 8: 25, 9: 37, 10: 36, 11: 35}
_BLOB_TO_MIL.update({12: 39, 13: 38, 14: 23, 15: 33})
_BLOB_SENTINEL = 0xDEADBEEF
MODEL_PATH_PREFIX = "@model_path/"  # how a program names its package folder


class MilEvalError(OndeviceLoraError):
    """A package could not be read back or evaluated (corrupt file, unknown op, bad input)."""


@dataclass(frozen=True)
class TensorSpec:
    """The declared type of a value: numpy dtype and shape (None for a dimension not fixed)."""

    dtype: np.dtype
    shape: tuple[int | None, ...]
    is_state: bool = False


def tensor_spec(value_type, where: str) -> TensorSpec:
    kind = value_type.WhichOneof("type")
    is_state = kind == "stateType"
    if is_state:
        value_type = value_type.stateType.wrappedType
        kind = value_type.WhichOneof("type")
    if kind != "tensorType":
        raise MilEvalError(f"{where}: values of type {kind!r} are not supported (tensors only).")
    tensor = value_type.tensorType
    if tensor.dataType == _STRING:
        return TensorSpec(np.dtype(object), (), is_state)
    if tensor.dataType not in _MIL_DTYPES:
        raise MilEvalError(f"{where}: MIL data type {tensor.dataType} is not supported.")
    dims = tuple(
        d.constant.size if d.WhichOneof("dimension") == "constant" else None
        for d in tensor.dimensions
    )
    return TensorSpec(np.dtype(_MIL_DTYPES[tensor.dataType][0]), dims, is_state)


def _unpack_bits(raw: np.ndarray, nbits: int, count: int, signed: bool) -> np.ndarray:
    # Sub-byte values are packed little-endian: element i occupies bits [i*nbits, (i+1)*nbits).
    if 8 % nbits == 0:
        # Whole values per byte (1, 2, 4 bits): shift each byte once per slot.
        shifts = np.arange(0, 8, nbits, dtype=np.uint8)
        values = ((raw[:, None] >> shifts) & np.uint8((1 << nbits) - 1)).reshape(-1)[:count]
    else:
        bits = np.unpackbits(raw, bitorder="little")[: count * nbits].reshape(count, nbits)
        values = (bits.astype(np.uint8) << np.arange(nbits, dtype=np.uint8)).sum(1, np.uint8)
    if signed:
        return np.where(
            values >= 1 << (nbits - 1), values.astype(np.int16) - (1 << nbits), values
        ).astype(np.int8)
    return values.astype(np.uint8)


class WeightFile:
    """One MIL blob storage file (`weights/weight.bin`), read through a memory map.

    Layout (MILBlob StorageFormat): a 64-byte header {u32 count, u32 version=2, reserved}, then
    per blob a 64-byte metadata record {u32 sentinel 0xDEADBEEF, u32 blob dtype, u64 size in
    bytes, u64 data offset, u64 padding bits, reserved} followed by the data, 64-byte aligned.
    A program refers to a blob by the offset of its metadata record.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(self._map) < 64:
            raise MilEvalError(f"{path}: too short for a blob storage header.")
        count, version = struct.unpack_from("<II", self._map, 0)
        if version != 2:
            raise MilEvalError(f"{path}: blob storage version {version}, expected 2.")
        self.count = count

    def read(self, offset: int, mil_dtype: int, shape: tuple[int, ...]) -> np.ndarray:
        where = f"{self.path} at offset {offset}"
        if offset + 64 > len(self._map):
            raise MilEvalError(f"{where}: offset past the end of the file.")
        sentinel, blob_dtype, size, data_offset, padding_bits = struct.unpack_from(
            "<IIQQQ", self._map, offset
        )
        if sentinel != _BLOB_SENTINEL:
            raise MilEvalError(f"{where}: no blob metadata there (sentinel {sentinel:#x}).")
        if _BLOB_TO_MIL.get(blob_dtype) != mil_dtype:
            raise MilEvalError(
                f"{where}: blob holds dtype {blob_dtype}, the program declares MIL {mil_dtype}."
            )
        if data_offset + size > len(self._map):
            raise MilEvalError(f"{where}: blob data runs past the end of the file.")
        raw = np.frombuffer(self._map, np.uint8, count=size, offset=data_offset)
        np_dtype, nbits = _MIL_DTYPES[mil_dtype]
        count = int(np.prod(shape))
        if nbits is not None:
            if size * 8 - padding_bits != count * nbits:
                raise MilEvalError(f"{where}: {size} bytes do not hold {count} {nbits}-bit values.")
            values = _unpack_bits(raw, nbits, count, mil_dtype in _SIGNED_SUB_BYTE)
        else:
            if size != count * np.dtype(np_dtype).itemsize:
                raise MilEvalError(
                    f"{where}: {size} bytes do not hold {count} values of {np_dtype}."
                )
            values = raw.view(np_dtype)
        return values.reshape(shape)


def immediate_value(value, spec: TensorSpec, mil_dtype: int, where: str) -> np.ndarray | str:
    if value.WhichOneof("value") != "tensor":
        raise MilEvalError(f"{where}: immediate {value.WhichOneof('value')} values unsupported.")
    tensor = value.tensor
    kind = tensor.WhichOneof("value")
    shape = tuple(spec.shape)
    if kind == "strings":
        items = list(tensor.strings.values)
        return items[0] if shape == () else np.array(items, dtype=object).reshape(shape)
    if kind == "bytes":
        raw = np.frombuffer(tensor.bytes.values, np.uint8)
        np_dtype, nbits = _MIL_DTYPES[mil_dtype]
        if nbits is not None:
            count = int(np.prod(shape))
            return _unpack_bits(raw, nbits, count, mil_dtype in _SIGNED_SUB_BYTE).reshape(shape)
        return raw.view(np_dtype).reshape(shape)
    items = getattr(tensor, kind).values
    return np.array(list(items)).astype(spec.dtype).reshape(shape)


def model_file(package: Path) -> Path:
    """The Model.proto file of a package, found through its Manifest.json."""
    manifest = package / "Manifest.json"
    if not manifest.exists():
        raise MilEvalError(f"{package}: no Manifest.json; not an .mlpackage.")
    info = json.loads(manifest.read_text())
    root = info.get("itemInfoEntries", {}).get(info.get("rootModelIdentifier"), {})
    path = package / "Data" / root.get("path", "com.apple.CoreML/model.mlmodel")
    if not path.exists():
        raise MilEvalError(f"{package}: the model specification {path.name} is missing.")
    return path
