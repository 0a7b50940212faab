"""Reading and writing safetensors weight files, single or sharded, with clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx

from ..atomic import write_atomically, write_text_atomically
from ..errors import ModelLoadError, format_list

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def check_safetensors_file(path: Path) -> None:
    """Raise ModelLoadError if `path` is not a complete safetensors file.

    Reads only the header: a file cut short by an interrupted download or copy is caught here
    with its sizes, before a reader fails somewhere deep inside.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelLoadError(
                f"{path}: {size} bytes is too short to be a safetensors file "
                "(truncated or empty). Download or copy it again."
            )
        header_len = int.from_bytes(prefix, "little")
        if 8 + header_len > size:
            raise ModelLoadError(
                f"{path}: truncated: the header alone should be {header_len} bytes but the file "
                f"has {size}. Download or copy it again."
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ModelLoadError(
                f"{path}: not a safetensors file (its header is not JSON: {e})."
            ) from None
    problems = header_problems(header)
    if problems:
        raise ModelLoadError(
            f"{path}: not a valid safetensors file: {format_list(problems, 3)}. It is damaged, "
            "or was not written by a safetensors writer; fetch or export it again."
        )
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ModelLoadError(
            f"{path}: truncated: its header describes {expected} bytes but the file has {size} "
            f"({expected - size} missing). The download or copy was interrupted; fetch it again."
        )


# Bytes per element of the safetensors dtypes.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def header_problems(header) -> list[str]:
    """What is wrong with a parsed safetensors header ([] if nothing): every entry must be
    {"dtype", "shape", "data_offsets"} whose byte range fits its shape and dtype, so a crafted
    header is refused here rather than handed to a reader that trusts it."""
    if not isinstance(header, dict):
        return [f"the header is a JSON {type(header).__name__}, not an object"]
    problems = []
    for name, entry in header.items():
        if name == "__metadata__":  # MLX writes null when there is none
            if entry is not None and not (
                isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
            ):
                problems.append("__metadata__ must map names to strings")
            continue
        if not isinstance(entry, dict):
            problems.append(f"{name!r} is not an object")
            continue
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            problems.append(f"{name!r} has dtype {dtype!r}")
        elif not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            problems.append(f"{name!r} has shape {shape!r}")
        elif not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
            and offsets[1] - offsets[0] == math.prod(shape) * DTYPE_SIZES[dtype]
        ):
            problems.append(f"{name!r} has data_offsets {offsets!r} for shape {shape} {dtype}")
    return problems


def read_safetensors(path: str | Path) -> dict[str, mx.array]:
    path = Path(path)
    check_safetensors_file(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises bare RuntimeError/ValueError without the path
        raise ModelLoadError(f"{path}: could not read safetensors: {e}") from e


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that hold a model folder's weights."""
    index_path = folder / INDEX_FILE
    if index_path.exists():
        index = read_json(index_path)
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise ModelLoadError(
                f"{index_path} lists shards that are not in the folder: {format_list(missing)}. "
                "Download the missing files."
            )
        return [folder / n for n in names]
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{folder}: no weights found: expected {SINGLE_FILE}, or shards named "
            f"model-*.safetensors with {INDEX_FILE}."
        )
    return files


def load_weights(folder: Path) -> dict[str, mx.array]:
    weights = {}
    for path in weight_files(folder):
        weights.update(read_safetensors(path))
    return weights


def save_weights(
    folder: Path, weights: dict[str, mx.array], max_shard_bytes: int = 5 << 30
) -> list[Path]:
    """Write `weights` as model.safetensors, or as shards with an index past `max_shard_bytes`.

    Each file is written beside its final name and renamed into place, so a failed save never
    leaves a half-written file under the real name.
    """
    shards, current, current_bytes = [], {}, 0
    for name in sorted(weights):
        size = weights[name].nbytes
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = weights[name]
        current_bytes += size
    shards.append(current)

    folder.mkdir(parents=True, exist_ok=True)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    paths = []
    for name, shard in zip(names, shards):
        paths.append(folder / name)
        write_atomically(
            paths[-1], lambda tmp, s=shard: mx.save_safetensors(str(tmp), s, {"format": "mlx"})
        )
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(w.nbytes for w in weights.values())},
            "weight_map": {k: n for n, s in zip(names, shards) for k in s},
        }
        write_json(folder / INDEX_FILE, index)
    return paths


def read_json(path: Path) -> dict:
    """Read a JSON file, naming the file, line and column when it is malformed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found.") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: not UTF-8 text ({e.reason}); fetch it again.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
            "Fix the file or fetch it again."
        ) from None
    except RecursionError:
        raise ModelLoadError(f"{path}: JSON nested too deeply to be a model file.") from None
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"{path}: expected a JSON object {{...}} of settings, got a JSON {type(data).__name__}."
        )
    return data


def write_json(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")
