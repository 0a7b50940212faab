"""The identity of a base model: what an adapter records about the model it was trained on.

An adapter only means something on the base it was trained against. The fingerprint hashes the
architecture, every base parameter's name, shape and dtype (a quantised base differs from a
dense one), and the tokenizer's vocabulary; readable parts are kept beside the hash so that a
mismatch can be explained rather than just refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import mlx.nn as nn

from .layers import base_parameters

# ModelArgs fields that change what the base computes. Parameter names and shapes are hashed
# separately; max_position_embeddings is left out since it changes nothing about the weights.
ARCHITECTURE_FIELDS = (
    "model_type hidden_size num_hidden_layers intermediate_size num_attention_heads "
    "num_key_value_heads head_dim vocab_size rms_norm_eps rope_theta rope_scaling "
    "tie_word_embeddings"
).split()


def _sha256(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _architecture(model: nn.Module) -> dict:
    args = dataclasses.asdict(model.args)
    arch = {k: args[k] for k in ARCHITECTURE_FIELDS if k in args}
    scaling = arch.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    # transformers 5 writes the plain rotation as {"rope_type": "default", ...}; older configs
    # write nothing. Both mean the same model.
    arch["rope_scaling"] = (
        None if kind == "default" else {k: v for k, v in scaling.items() if k != "rope_theta"}
    )
    return arch


def _quantization(model: nn.Module) -> dict | None:
    # isinstance, not the exact type: a quantised layer may run under a subclass of MLX's
    # (cpu_matmul switches the class during training) and is still the same base.
    kinds = ((nn.QuantizedLinear, "linear"), (nn.QuantizedEmbedding, "embedding"))
    found: dict[str, list] = {}
    for _, module in model.named_modules():
        kind = next((name for cls, name in kinds if isinstance(module, cls)), None)
        if kind:
            settings = {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}
            if settings not in found.setdefault(kind, []):
                found[kind].append(settings)
    # One setting per kind is the usual case; mixed-precision bases keep the whole list.
    return {k: v[0] if len(v) == 1 else v for k, v in sorted(found.items())} or None


def base_fingerprint(model: nn.Module, tokenizer=None) -> dict:
    """The identity of a base model, stored in adapter_config.json under "base".

    `fingerprint` is a sha256 over the architecture fields, every base parameter's name, shape
    and dtype, and the tokenizer's vocabulary when one is given. The parts are kept beside it
    (readable, or as their own hashes) so that a mismatch can be explained.
    """
    weights = sorted(
        (name, list(v.shape), str(v.dtype)) for name, v in base_parameters(model).items()
    )
    dtypes: dict[str, int] = {}
    for _, _, dtype in weights:
        short = dtype.removeprefix("mlx.core.")
        dtypes[short] = dtypes.get(short, 0) + 1
    arch = _architecture(model)
    weights_part = {"sha256": _sha256(weights), "dtypes": dict(sorted(dtypes.items()))}
    tokenizer_part = None
    if tokenizer is not None:
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        tokenizer_part = {"sha256": _sha256(sorted(vocab.items())), "vocab_size": len(vocab)}
    return {
        "model_type": arch["model_type"],
        "quantization": _quantization(model),
        "fingerprint": _sha256([arch, weights_part["sha256"], tokenizer_part]),
        "architecture": arch,
        "weights": weights_part,
        "tokenizer": tokenizer_part,
    }


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two base_fingerprint() results; [] if they match.

    The tokenizer is compared only when both sides know it.
    """
    if "architecture" not in saved or "weights" not in saved:
        # A hand-written or foreign "base" entry: only the overall hash can be compared.
        same = saved.get("fingerprint") == current["fingerprint"]
        return [] if same else [f"fingerprint {saved.get('fingerprint')!r} differs"]
    diffs = []
    if saved.get("model_type") != current["model_type"]:
        diffs.append(
            f"model_type: {saved.get('model_type')!r} for the adapter, "
            f"{current['model_type']!r} for this model"
        )
    a, b = saved["architecture"], current["architecture"]
    for key in sorted(set(a) | set(b)):
        if key != "model_type" and a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} for the adapter, {b.get(key)!r} for this model")
    if saved.get("quantization") != current["quantization"]:
        diffs.append(
            f"quantization: {saved.get('quantization')} for the adapter, "
            f"{current['quantization']} for this model"
        )
    if saved["weights"].get("sha256") != current["weights"]["sha256"]:
        sd, cd = saved["weights"].get("dtypes"), current["weights"]["dtypes"]
        detail = f"dtypes {sd} vs {cd}" if sd != cd else "parameter names or shapes"
        diffs.append(f"weights: {detail} differ")
    st, ct = saved.get("tokenizer"), current["tokenizer"]
    if st and ct and st.get("sha256") != ct["sha256"]:
        size = (
            f"{st.get('vocab_size')} tokens for the adapter, {ct['vocab_size']} for this model"
            if st.get("vocab_size") != ct["vocab_size"]
            else "same size, different tokens"
        )
        diffs.append(f"tokenizer vocabulary: {size}")
    return diffs
