"""Adapter folders for tests: a real base, our own wrapping and saving, random trained-like values."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ondevice_lora.adapters.files import LoraConfig, adapter_tensors, apply_adapters, save_adapter
from ondevice_lora.adapters.fingerprint import base_fingerprint
from ondevice_lora.loading import load


def write_adapter(
    base, folder, config: LoraConfig, lora_b_std: float = 0.2, seed: int = 0, scale_to=None
) -> Path:
    """Save an adapter for the model in `base` to `folder`; returns the folder.

    lora_a keeps its random initialisation (seeded), lora_b ~ N(0, lora_b_std) stands in for
    training, and DoRA magnitudes are moved off the base's row norms. scale_to(path, layer,
    delta) -> factor, if given, rescales each layer's lora_b (tests that need a given ΔW size).
    """
    mx.random.seed(seed)
    model, tokenizer = load(base)
    apply_adapters(model, config)
    rng = np.random.default_rng(seed)
    updates = []
    for name, value in adapter_tensors(model).items():
        if name.endswith(".lora_b"):
            updates.append((name, rng.normal(0, lora_b_std, value.shape)))
        elif name.endswith(".magnitude"):
            updates.append((name, np.array(value) * rng.uniform(0.8, 1.2, value.shape)))
    model.load_weights([(k, mx.array(v.astype(np.float32))) for k, v in updates], strict=False)
    if scale_to is not None:
        for path, layer in dict(model.named_modules()).items():
            if "lora_b" in layer:
                layer.lora_b = layer.lora_b * scale_to(path, layer, layer.delta_weight())
    save_adapter(folder, model, config, base_fingerprint(model, tokenizer))
    return Path(folder)


# Two token rows the adapter tests compute logits on.
TOKENS = mx.array([[5, 17, 42, 300, 7, 99, 256, 3], [1, 2, 3, 4, 5, 6, 7, 8]])


def write_bases_with_adapters(root: Path, configs: dict[str, LoraConfig]) -> dict[str, Path]:
    """An fp32 base and the same base in 4 bits (fp32 scales), with one adapter per config for
    each: keys "base", "q4", and "<base>/<name>" for the adapters (seeded by their order)."""
    from ondevice_lora.loading.convert import convert
    from tests.hf_fixtures import write_hf_model

    write_hf_model(root / "base", "llama_tied_bias_head_dim")
    convert(root / "base", root / "q4", bits=4, group_size=32, dtype="float32")
    out = {"base": root / "base", "q4": root / "q4"}
    for kind in ("base", "q4"):
        for seed, (name, config) in enumerate(configs.items()):
            out[f"{kind}/{name}"] = write_adapter(out[kind], root / kind / name, config, seed=seed)
    return out
