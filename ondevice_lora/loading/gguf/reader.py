"""Read GGUF files (llama.cpp's format) with numpy: metadata, tensor table and block decoders.

MLX's own reader takes only Q4_0/Q4_1/Q8_0/F16/F32, but most on-device downloads are K-quants
(Q4_K_M mixes Q4_K with Q6_K, and falls back to Q5_0 for matrices whose width is not a multiple
of 256). We parse the file ourselves (memory-mapped, nothing is copied until a tensor is decoded)
and turn each tensor into either

- an MLX affine-quantised triple (codes packed in uint32, scales, biases; 32 weights per group)
  when MLX's grid `w = scale * q + bias` represents the block exactly: Q4_0, Q4_1, Q4_K (4-bit),
  Q5_0, Q5_1, Q5_K (5-bit) and Q8_0 (8-bit); our own decoders, since they must keep the codes, or
- a de-quantised float array when it does not: Q2_K, Q3_K and Q6_K (their scales cover 16
  weights, finer than MLX's smallest group of 32) and IQ4_NL, IQ4_XS (a non-linear code table).
  These go through the `gguf` package's de-quantisers, llama.cpp's own numpy reference.

Layouts are ggml's (ggml-common.h): a tensor's first dimension (ne[0]) is the contiguous one, so
a GGUF shape (in, out) is the Hub's (out, in).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize

from ...errors import ModelLoadError

GROUP_SIZE = 32  # MLX group size for every type kept quantised
QK_K = 256  # weights per K-quant super-block

# ggml's type ids (ggml.h, enum ggml_type) -> names.
TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
# (weights per block, bytes per block) of the types we decode.
BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20),
    "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84),
    "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
}  # fmt: skip
SUPPORTED_TYPES = tuple(BLOCKS)
# type -> MLX bits (groups of 32)
KEPT_QUANTISED = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q8_0": 8}
# Why MLX's affine grid cannot hold the de-quantised types, for the note that names them.
WHY_DEQUANTISED = {
    "Q2_K": "scales per 16 weights",
    "Q3_K": "scales per 16 weights",
    "Q6_K": "scales per 16 weights",
    "IQ4_NL": "a non-linear code table",
    "IQ4_XS": "a non-linear code table",
}
# llama.cpp presets (general.file_type) whose every tensor type we read, to suggest instead.
READABLE_PRESETS = ("Q4_K_M", "Q5_K_M", "Q8_0", "Q4_0", "IQ4_XS", "Q3_K_M", "F16")

# GGUF metadata value types -> struct formats (strings and arrays are handled apart).
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # the Hub's order: (rows, columns) for a matrix
    type_name: str
    data: np.ndarray  # the raw bytes of the tensor (uint8), a view of the memory map


class GGUFFile:
    """The metadata and tensor table of a GGUF file; tensor data stays memory-mapped."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file.")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(
                    f"{path}: not a GGUF file (it does not start with the bytes 'GGUF'). "
                    "Pass a .gguf file written by llama.cpp, or a Hugging Face model folder."
                )
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 4
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, IndexError, OverflowError) as e:
            raise ModelLoadError(
                f"{path}: could not read the GGUF file ({e}); it may be truncated or damaged. "
                "Download it again."
            ) from None
        if not self.tensors:
            raise ModelLoadError(
                f"{path}: the GGUF file holds no tensors (a vocabulary-only file?); pass a model "
                "file with its weights."
            )

    def _read(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self._map, self._pos)
        self._pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def _string(self) -> str:
        n = self._read("Q")
        if self._pos + n > len(self._map):
            raise ValueError("a string runs past the end of the file")
        text = self._map[self._pos : self._pos + n].decode("utf-8")
        self._pos += n
        return text

    def _count(self, what: str, smallest_item: int) -> int:
        """A count read from the file, refused when its items could not fit in what is left
        (so a damaged count fails here, not after a huge allocation or a long loop)."""
        count = self._read("Q")
        if count * smallest_item > len(self._map) - self._pos:
            raise ValueError(f"{count} {what} cannot fit in the rest of the file")
        return count

    def _value(self, kind: int, depth: int = 0):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item_kind = self._read("I")
            if item_kind == _ARRAY and depth >= 1:
                # llama.cpp writes flat arrays; arrays nested deeper than one level are damage.
                raise ValueError("metadata arrays are nested more than two deep")
            item_size = struct.calcsize("<" + _SCALARS[item_kind]) if item_kind in _SCALARS else 8
            count = self._count("array items", item_size)
            if item_kind in _SCALARS and item_kind != 7:
                # Numeric arrays (token scores and types: one per vocabulary entry) in one go.
                fmt = _SCALARS[item_kind]
                values = np.frombuffer(self._map, "<" + fmt, count, self._pos)
                self._pos += values.nbytes
                return values.tolist()
            return [self._value(item_kind, depth + 1) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        value = self._read(_SCALARS[kind])
        if kind == 6:  # float32: the shortest text that reads back the same (1e-05)
            value = float(str(np.float32(value)))
        return value

    def _parse(self) -> None:
        version = self._read("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; this reader knows versions 2 and 3")
        # Each tensor entry takes at least 24 bytes, each metadata entry at least 12.
        n_tensors = self._count("tensors", 24)
        n_metadata = self._count("metadata entries", 12)
        self.metadata = {}
        for _ in range(n_metadata):
            key = self._string()
            self.metadata[key] = self._value(self._read("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._read("I")
            if n_dims > 4:  # GGML_MAX_DIMS
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 4")
            dims = [self._read("Q") for _ in range(n_dims)]
            kind, offset = self._read("IQ")
            infos.append((name, tuple(reversed(dims)), kind, offset))
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment is {alignment!r}; it must be a power of two")
        start = -(-self._pos // alignment) * alignment
        self.tensors = {}
        for name, shape, kind, offset in infos:
            type_name = TYPE_NAMES.get(kind, f"type {kind}")
            count = math.prod(shape)  # Python ints: a damaged shape cannot overflow
            per_block, block_bytes = BLOCKS.get(type_name, (1, 0))
            size = count // per_block * block_bytes
            if start + offset + size > len(self._map):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            data = np.frombuffer(self._map, np.uint8, size, start + offset)
            self.tensors[name] = TensorInfo(name, shape, type_name, data)

    def preset(self) -> str | None:
        """llama.cpp's preset the file was quantised with (general.file_type), e.g. Q4_K_M."""
        kind = self.metadata.get("general.file_type")
        try:
            return LlamaFileType(kind).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return None

    def check_types(self) -> None:
        """Refuse, naming each, tensors of types we do not decode (IQ1-IQ3, TQ1_0, TQ2_0...)."""
        unknown = [t for t in self.tensors.values() if t.type_name not in BLOCKS]
        if not unknown:
            return
        listed = ", ".join(f"{t.name} ({t.type_name})" for t in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        kinds = sorted({t.type_name for t in unknown})
        preset = self.preset()
        # Never suggest the preset the file already has: its types are the ones we refuse.
        others = [p for p in READABLE_PRESETS if p != preset]
        made = f" (llama.cpp preset {preset}, its general.file_type)" if preset else ""
        raise ModelLoadError(
            f"{self.path}{made} holds {len(unknown)} tensor(s) of types this loader does not "
            f"read ({', '.join(kinds)}): {listed}{more}. Readable types: "
            f"{', '.join(SUPPORTED_TYPES)}. Use a file quantised with a preset whose types all "
            f"load ({', '.join(others)}), or the Hugging Face checkpoint."
        )


# --- decoding ---------------------------------------------------------------------------------


def _f16(raw: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n,) float32 of the little-endian float16 they hold."""
    return np.ascontiguousarray(raw).view("<f2").reshape(raw.shape[0]).astype(np.float32)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, columns) codes -> MLX's packing: a little-endian bit stream in uint32 words, code i
    at bits i * bits .. i * bits + bits - 1 (for 4 and 8 bits: whole codes within each word)."""
    codes = codes.astype(np.uint8)
    if bits in (4, 8):  # whole codes per byte: skip the bit stream (embeddings are large)
        packed = codes if bits == 8 else codes[:, 0::2] | (codes[:, 1::2] << 4)
        return np.ascontiguousarray(packed).view("<u4")
    rows = codes.shape[0]
    stream = np.unpackbits(codes[..., None], axis=-1, bitorder="little")
    stream = stream[..., :bits].reshape(rows, -1)  # (rows, columns * bits)
    return np.ascontiguousarray(np.packbits(stream, axis=1, bitorder="little")).view("<u4")


def _unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of _pack: (rows, columns * bits / 32) uint32 words -> (rows, columns) codes."""
    rows, raw = words.shape[0], words.view(np.uint8)
    if bits == 8:
        return raw
    if bits == 4:
        return np.stack([raw & 15, raw >> 4], axis=2).reshape(rows, -1)
    stream = np.unpackbits(raw, axis=1, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint8))[None, None, :]
    return (stream.reshape(rows, -1, bits) * weights).sum(axis=2, dtype=np.uint8)


def _low_high_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) codes: weights 0-15 are the low nibbles, 16-31 the high ones."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: (n, 4) bytes, a little-endian uint32 -> (n, 32) codes' bit 4 (weight j's is
    bit j), already shifted into place."""
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block.

    Bytes 0-3 hold scales 0-3 in their low six bits, bytes 4-7 the mins 0-3; bytes 8-11 hold
    the low four bits of scales 4-7 (low nibble) and mins 4-7 (high nibble), whose top two bits
    are the spare top bits of bytes 0-3 and 4-7.
    """
    low, high, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & 63, (rest & 15) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([high & 63, (rest >> 4) | ((high >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _q4_k_codes(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 256) codes: each 32 bytes give 32 low nibbles then 32 high ones."""
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 15, qs >> 4], axis=2).reshape(-1, QK_K)


def decode_affine(t: TensorInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A kept-quantised tensor as MLX's (codes uint32, scales, biases, bits), in the Hub's shape;
    scales and biases are float32 (exact: each is a float16 times a small integer)."""
    rows, columns = t.shape[0], int(np.prod(t.shape[1:]))
    per_block, block_bytes = BLOCKS[t.type_name]
    blocks = t.data.reshape(-1, block_bytes)
    name = t.type_name
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        d = _f16(blocks[:, 0:2])
        if name == "Q4_0":  # w = d * (q - 8)
            codes, biases = _low_high_nibbles(blocks[:, 2:]), -8.0 * d
        elif name == "Q4_1":  # w = d * q + m
            codes, biases = _low_high_nibbles(blocks[:, 4:]), _f16(blocks[:, 2:4])
        elif name == "Q5_0":  # w = d * (q - 16); 4 bytes of fifth bits, then the nibbles
            codes = _low_high_nibbles(blocks[:, 6:]) | _fifth_bits(blocks[:, 2:6])
            biases = -16.0 * d
        else:  # Q5_1: w = d * q + m
            codes = _low_high_nibbles(blocks[:, 8:]) | _fifth_bits(blocks[:, 4:8])
            biases = _f16(blocks[:, 2:4])
        scales = d
    elif name == "Q8_0":  # w = d * q, q signed: codes q + 128, bias -128 d
        d = _f16(blocks[:, 0:2])
        codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        scales, biases = d, -128.0 * d
    elif name in ("Q4_K", "Q5_K"):  # 8 groups of 32: w = d * scale_j * q - dmin * min_j
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scales_mins(blocks[:, 4:16])
        if name == "Q4_K":
            codes = _q4_k_codes(blocks[:, 16:])
        else:  # Q4_K's layout plus a fifth bit: bit j of qh[l] for weight l of group j
            qh = blocks[:, 16:48]  # (n, 32)
            high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
            codes = _q4_k_codes(blocks[:, 48:]).reshape(-1, 8, 32) | (high << 4)  # (n, 8, 32)
        scales, biases = d[:, None] * sc, -(dmin[:, None] * mn)
    else:
        raise AssertionError(name)
    bits = KEPT_QUANTISED[name]
    groups = columns // GROUP_SIZE
    codes = _pack(codes.reshape(rows, columns), bits)
    return (
        codes,
        scales.astype(np.float32).reshape(rows, groups),
        biases.astype(np.float32).reshape(rows, groups),
        bits,
    )


def decode_float(t: TensorInfo) -> np.ndarray:
    """Any supported tensor de-quantised to float32, in the Hub's shape."""
    name = t.type_name
    if name == "F32":
        return t.data.view("<f4").reshape(t.shape)
    if name == "F16":
        return t.data.view("<f2").astype(np.float32).reshape(t.shape)
    if name == "BF16":
        return (t.data.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
    if name in KEPT_QUANTISED:
        codes, scales, biases, bits = decode_affine(t)
        rows = codes.shape[0]
        q = _unpack(codes, bits).reshape(rows, -1, GROUP_SIZE)
        w = q.astype(np.float32) * scales[:, :, None] + biases[:, :, None]
        return w.reshape(t.shape)
    # The rest only de-quantise: llama.cpp's own numpy reference does it.
    rows = t.shape[0] if t.shape else 1
    w = dequantize(t.data.reshape(rows, -1), GGMLQuantizationType[name])
    return w.astype(np.float32).reshape(t.shape)
