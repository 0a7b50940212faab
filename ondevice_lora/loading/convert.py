"""Convert any model we load into an mlx-lm folder quantised to 4 or 8 bits.

The output is the layout mlx-lm writes (config.json with a `quantization` entry, safetensors with
`.weight`/`.scales`/`.biases` per quantised layer, tokenizer files), so mlx-lm and we both load it.
The folder-writing pieces (load_source, check_out_folder, model_quantization, output_config,
write_model_folder) are shared with `fuse`, which writes the same layout.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import OndeviceLoraError, format_list, user_errors
from ..models.activation_range import FP16_MAX, measure_ranges
from ..models.base import dequantized_weight
from .hf import load_config, load_model, resolve_model_path
from .weights import INDEX_FILE, read_json, save_weights, write_json

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")
# Tensor types of a .gguf output (converters/formats/gguf_model.py writes them).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")

# Files of a model folder that --force replaces: a stale shard, index or chat_template.jinja left
# beside the new files would be read instead of (or as well as) them.
_MODEL_FILES = [
    "model*.safetensors",
    INDEX_FILE,
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]


def check_convert_args(
    out_folder, bits: int, group_size: int, dtype: str | None, force: bool = False
) -> None:
    """Raise one OndeviceLoraError listing every problem with the conversion settings."""
    problems = []
    if bits not in BITS:
        problems.append(f"--bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        allowed = ", ".join(map(str, GROUP_SIZES))
        problems.append(f"--group-size must be one of {allowed}, got {group_size!r}")
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    problems += check_out_folder(out_folder, force)
    if problems:
        raise OndeviceLoraError("cannot convert:\n  " + "\n  ".join(problems))


def check_out_folder(out_folder, force: bool = False) -> list[str]:
    """The problems with writing a model folder, or a .gguf file, to `out_folder` ([] if none)."""
    out = Path(out_folder)
    if is_gguf_file(out):
        # One file for llama.cpp (converters/formats/gguf_model.py): never a folder.
        if out.is_dir():
            return [f"--out {out} is a folder; a .gguf output is one file, give a file path"]
        if out.exists() and not force:
            return [f"--out {out} exists; choose a new file or pass --force to replace it"]
        return []
    if out.exists() and not out.is_dir():
        return [f"--out {out} is a file, not a folder"]
    if out.is_dir() and any(out.iterdir()) and not force:
        return [
            f"--out {out} is not empty; choose a new folder or pass --force to replace "
            "the model files in it"
        ]
    return []


def is_gguf_file(path) -> bool:
    """Whether an --out path asks for one GGUF file rather than a model folder."""
    return str(path).lower().endswith(".gguf")


def check_gguf_type(out, gguf_type: str | None) -> list[str]:
    """The problems with asking for a GGUF tensor type ([] if none)."""
    if gguf_type is None:
        return []
    if gguf_type not in GGUF_TYPES:
        return [f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}"]
    if not is_gguf_file(out):
        return [f"--gguf-type applies to a .gguf --out, not to the folder {out}"]
    return []


def write_model(
    out, net: nn.Module, tokenizer, config: dict, source: Path, force: bool, gguf_type=None
) -> Path:
    """Write a model folder, or one GGUF file when `out` ends in .gguf (gguf_type: its tensor
    type, see converters/formats/gguf_model.py; None keeps each layer's own)."""
    if is_gguf_file(out):
        from converters.formats.gguf_model import write_gguf_model

        return write_gguf_model(out, net, tokenizer, gguf_type)
    return write_model_folder(out, net, tokenizer, config, source, force)


def check_not_source(out_folder, source: Path, action: str = "convert") -> None:
    """Refuse an output folder that is the source model's own folder."""
    out = Path(out_folder)
    if out.exists() and out.resolve() == source.resolve():
        raise OndeviceLoraError(
            f"cannot {action}: --out {out} holds the source model {source}; "
            "writing there would overwrite the weights being read. Choose another folder."
        )


def convert(
    model: str | os.PathLike,
    out_folder: str | os.PathLike,
    bits: int = 4,
    group_size: int = 64,
    dtype: str | None = None,
    force: bool = False,
    gguf_type: str | None = None,
) -> Path:
    """Quantise `model` (a folder, .gguf file or Hub id; None: the built-in model) to an mlx-lm
    folder, or to one GGUF file when `out_folder` ends in .gguf; returns the output.

    bits: 4 or 8 (affine); group_size: 32, 64 or 128 values share one scale and bias; every
    Linear and Embedding whose input size divides by `group_size` is quantised, the rest kept.
    dtype: float16, bfloat16 or float32 for the scales, biases and unquantised weights
    (default: the source config's dtype, else float16). An already quantised source is
    de-quantised first, since its grid differs from the target's. force: allow a non-empty
    `out_folder`, replacing the model files in it. A GGUF file gets llama.cpp's block types
    instead of MLX's groups: gguf_type f32, f16, bf16, q8_0, q4_0 or q4_1 (default: q8_0 for
    8 bits, q4_1 for 4), encoded as llama.cpp encodes them.
    """
    check_convert_args(out_folder, bits, group_size, dtype, force)
    problems = check_gguf_type(out_folder, gguf_type)
    if problems:
        raise OndeviceLoraError("cannot convert:\n  " + "\n  ".join(problems))
    source = resolve_model_path(model if model is not None else _default_model())
    check_not_source(out_folder, source)
    net, tokenizer, config = load_source(source)
    if dtype is None:
        # float16 only where the activations fit it (a GGUF names no dtype; Gemma 3 needs more).
        dtype, note = output_dtype(net, source_dtype(config), sample_inputs(tokenizer))
        if note:
            print(f"note: {note}", file=sys.stderr)

    dequantize_model(net)
    net.set_dtype(getattr(mx, dtype))
    if is_gguf_file(out_folder):
        gguf_type = gguf_type or {8: "q8_0", 4: "q4_1"}[bits]
        return write_model(out_folder, net, tokenizer, config, source, force, gguf_type)
    nn.quantize(
        net,
        group_size=group_size,
        bits=bits,
        mode="affine",
        # Quantisation groups run along the input dimension, so it must divide evenly.
        class_predicate=lambda _, m: (
            hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0
        ),
    )

    quant = {"group_size": group_size, "bits": bits, "mode": "affine"}
    config = output_config(config, quant, dtype)
    return write_model_folder(out_folder, net, tokenizer, config, source, force)


def write_model_folder(
    out_folder, net: nn.Module, tokenizer, config: dict, source: Path, force: bool = False
) -> Path:
    """Write `net`'s parameters, `config`, the tokenizer and generation_config.json (the
    source's, with the tokenizer's eos ids) to `out_folder` in mlx-lm's layout.

    force: replace the model files already in `out_folder` (stale shards would be read too).
    """
    out = Path(out_folder)
    if force and out.is_dir():
        for pattern in _MODEL_FILES:
            for stale in out.glob(pattern):
                stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out, dict(tree_flatten(net.parameters())))
    write_json(out / "config.json", config)
    tokenizer.save(out)
    write_json(out / "generation_config.json", _generation_config(source, tokenizer))
    return out


def _default_model() -> Path:
    from .defaults import default_model_path

    return default_model_path()


def load_source(path: Path):
    """(model, tokenizer, config) of a local folder or .gguf file, as `load` reads them."""
    from .tokenizer import Tokenizer

    if path.is_file() and path.suffix == ".gguf":
        from .hf import load_gguf

        net, tokenizer, config = load_gguf(path)
        return net, tokenizer, dict(config)
    if path.is_file():
        raise OndeviceLoraError(
            f"{path}: a model is a folder (config.json, *.safetensors, tokenizer.json) "
            "or a .gguf file."
        )
    net, config = load_model(path)
    return net, Tokenizer.from_folder(path), config


# Sample inputs for the logits comparison: short, varied, and in every tokenizer's alphabet.
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "On Monday it rained; on Friday the sun came out at 7:30.",
)
MAX_SAMPLE_TOKENS = 64
# float16 is kept only where the activations measured stay under its maximum by this factor:
# other texts reach further than the samples (SmolLM2-135M: 2.5e4, kept; Gemma 3: 1e5, not).
FP16_HEADROOM = 2.0


def output_dtype(net: nn.Module, source: str, inputs: list[mx.array]) -> tuple[str, str | None]:
    """The dtype to write when the user names none: the source's, unless that is float16 and
    the model's activations (measured in float32 on the sample texts, adapters active) would
    pass float16's range, then bfloat16 (float32's range at half its size), with a note.

    A GGUF source has no dtype of its own and reads as float16: Gemma 3 270M's residual stream
    reaches ~1e5, past float16's 65,504, and a float16 Gemma generates only padding.
    """
    if source != "float16":
        return source, None
    ranges = measure_ranges(net, [ids[0].tolist() for ids in inputs])
    if ranges.largest * FP16_HEADROOM <= FP16_MAX:
        return source, None
    return "bfloat16", (
        f"writing bfloat16, not the source's float16: the model's activations reach "
        f"{ranges.largest:.3g} on the sample texts, past float16's {FP16_MAX:.0f} / "
        f"{FP16_HEADROOM:g} (give --dtype to choose)"
    )


def sample_inputs(tokenizer, samples: Sequence[str] = SAMPLE_TEXTS) -> list[mx.array]:
    """The sample texts as [1, tokens] arrays, at most MAX_SAMPLE_TOKENS each."""
    inputs = [tokenizer.encode(text)[:MAX_SAMPLE_TOKENS] for text in samples]
    inputs = [mx.array([ids]) for ids in inputs if ids]
    if not inputs:
        raise OndeviceLoraError("the sample texts encode to no tokens.")
    return inputs


def source_dtype(config: dict) -> str:
    """The floating dtype a source config names (float16 when it names none)."""
    # transformers 5 writes `dtype`, older versions `torch_dtype`.
    for key in ("dtype", "torch_dtype"):
        if config.get(key) in DTYPES:
            return config[key]
    return "float16"


def dequantize_model(net: nn.Module) -> None:
    """Replace every quantised layer of `net` by the float layer its weights stand for."""
    replaced = []
    for path, module in net.named_modules():
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        weight = dequantized_weight(module)
        if isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(*weight.shape)
        else:
            out_dims, in_dims = weight.shape
            layer = nn.Linear(in_dims, out_dims, bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias
        layer.weight = weight
        replaced.append((path, layer))
    if replaced:
        net.update_modules(tree_unflatten(replaced))


def model_quantization(net: nn.Module) -> dict | None:
    """mlx-lm's `quantization` entry for `net` as it is, layer by layer: the commonest
    {group_size, bits, mode} as the default, an entry for each quantised layer that differs, and
    False for each Linear or Embedding kept unquantised. None if nothing is quantised."""
    quantised = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    settings, dense = {}, []
    for path, module in net.named_modules():
        if isinstance(module, quantised):
            settings[path] = (module.group_size, module.bits, module.mode)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            dense.append(path)
    if not settings:
        return None

    def entry(s):
        return {"group_size": s[0], "bits": s[1], "mode": s[2]}

    common = Counter(settings.values()).most_common(1)[0][0]
    quant = entry(common)
    for path, s in sorted(settings.items()):
        if s != common:
            quant[path] = entry(s)
    for path in sorted(dense):
        quant[path] = False
    return quant


def output_config(config: dict, quant: dict | None, dtype: str) -> dict:
    """The source's config.json with `quant` (mlx-lm's `quantization` entry; None for a dense
    model) and `dtype` in place of what it said."""
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if quant is not None:
        # mlx-lm reads `quantization`; it also writes the same under `quantization_config`, the
        # key transformers-side tools look at, so we write both.
        config["quantization"] = dict(quant)
        config["quantization_config"] = dict(quant)
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype
    return config


def _generation_config(source: Path, tokenizer) -> dict:
    """The source's generation_config.json (if a folder has one) with the tokenizer's eos ids."""
    path = source / "generation_config.json"
    config = read_json(path) if source.is_dir() and path.is_file() else {}
    eos = tokenizer.eos_token_ids
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if tokenizer.bos_token_id is not None:
        config.setdefault("bos_token_id", tokenizer.bos_token_id)
    return config


def gguf_type_option(default: str):
    return click.option(
        "--gguf-type",
        type=click.Choice(GGUF_TYPES),
        default=None,
        help=f"Tensor type of a .gguf --out's weight matrices [default: {default}].",
    )


@dataclass
class FolderSummary:
    """What a converted folder costs: bytes on disk and stored bits per model weight."""

    size_bytes: int
    parameters: int
    bits_per_weight: float


def summarize(folder: str | os.PathLike) -> FolderSummary:
    """Size on disk of a model folder, and bits per weight of its safetensors files.

    A quantised weight counts as the values it packs (32 / bits per uint32), so the ratio is
    the storage per original weight, scales and biases included.
    """
    folder = Path(folder)
    quant = load_config(folder).get("quantization") or {}
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(_safetensors_header(path))
    stored_bytes, parameters = 0, 0
    for name, info in tensors.items():
        start, end = info["data_offsets"]
        stored_bytes += end - start
        base = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and f"{base}.scales" in tensors:
            continue  # quantisation overhead, not model weights
        count = math.prod(info["shape"])
        if info["dtype"] == "U32" and f"{base}.scales" in tensors:
            layer = quant.get(base)
            bits = layer["bits"] if isinstance(layer, dict) else quant["bits"]
            count = count * 32 // bits
        parameters += count
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return FolderSummary(size, parameters, 8 * stored_bytes / max(parameters, 1))


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return header


@click.command("convert")
@click.option(
    "--model",
    "-m",
    default=None,
    help="Model folder, .gguf file or Hub id. Default: the built-in SmolLM2-135M-Instruct.",
)
@click.option(
    "--out",
    "-o",
    required=True,
    help="Output folder (new or empty), or a .gguf file for llama.cpp, Ollama and LM Studio.",
)
@click.option("--bits", type=int, default=4, show_default=True, help="4 or 8.")
@click.option("--group-size", type=int, default=64, show_default=True, help="32, 64 or 128.")
@click.option("--dtype", default=None, help="float16, bfloat16 or float32 [default: source's].")
@click.option("--force", is_flag=True, help="Replace the model files in a non-empty --out.")
@gguf_type_option("q8_0 for --bits 8, q4_1 for --bits 4")
@user_errors
def convert_command(model, out, bits, group_size, dtype, force, gguf_type):
    """Quantise a model to an mlx-lm folder (affine, 4 or 8 bits) or a GGUF file."""
    path = convert(
        model, out, bits=bits, group_size=group_size, dtype=dtype, force=force, gguf_type=gguf_type
    )
    if is_gguf_file(path):
        from converters.formats.gguf_model import bits_per_weight

        size = path.stat().st_size / 2**20
        click.echo(f"Wrote {path} (GGUF, {size:.1f} MiB, {bits_per_weight(path):.2f} bits/weight)")
        return
    summary = summarize(path)
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    click.echo(f"Wrote {path} ({bits}-bit, group size {group_size}): {format_list(files)}")
    click.echo(
        f"{summary.size_bytes / 2**20:.1f} MiB on disk, {summary.parameters:,} weights, "
        f"{summary.bits_per_weight:.2f} bits per weight"
    )
