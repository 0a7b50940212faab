"""Reading and writing safetensors weight files, single or sharded, with clear errors."""

from __future__ import annotations

import json
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(
                f"{path}: not a safetensors file (its header is not JSON: {e})."
            ) from None
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ModelLoadError(
            f"{path}: truncated: its header describes {expected} bytes but the file has {size} "
            f"({expected - size} missing). The download or copy was interrupted; fetch it again."
        )


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
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
            "Fix the file or fetch it again."
        ) from None


def write_json(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")
