"""Real checkpoints as folders our loader reads, for the Core ML and fuse tests of the slow tier.

Until our GGUF reader takes Q5_0 (81 of Gemma 3 270M Q4_K_M's tensors), Gemma is read by
transformers' own GGUF loader (a reference we did not write), de-quantised to float32 and saved
as a Hub-style folder; `load(folder)` then reads it. Once it does, gemma3_model() can return
`load(gemma3_270m_path())` directly and nothing else changes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.real_models import gemma3_270m_path


def gemma3_hf_folder(folder: Path) -> Path:
    """Gemma 3 270M as a float32 Hub-style folder (config, safetensors, tokenizer), built once
    into `folder`."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    gguf = gemma3_270m_path()
    kwargs = {"gguf_file": gguf.name, "dtype": torch.float32}
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from safetensors.torch import save_file

    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    # transformers will not save_pretrained a model it read from GGUF; its tensors are plain
    # float32 after loading, so write them ourselves (a tied lm_head is the embedding).
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(partial)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"  # a GGUF names no dtype; these weights are float32
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    partial.rename(folder)
    return folder


def gemma3_cached_folder() -> Path:
    """Where gemma3_hf_folder's result is kept between runs: beside the assembled GGUF (several
    minutes to build on 2 cores)."""
    return gemma3_270m_path().parent / "gemma3-270m-hf-float32"


def gemma3_model(folder: Path | None = None):
    """(model, tokenizer) of Gemma 3 270M, float32, via gemma3_hf_folder (the cached folder by
    default). Once our loader reads the GGUF: return load(str(gemma3_270m_path()))."""
    from ondevice_lora.loading import load

    return load(str(gemma3_hf_folder(folder or gemma3_cached_folder())))
