"""Tiny random models written by transformers in the Hub's own folder layout.

They are the references the tests hold our implementation to: transformers computes them, we
load the files it saved.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tests.tiny_tokenizer import write_tiny_tokenizer

VOCAB_SIZE = 512
COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=256,
    # Wider than the usual 0.02 so logits are well separated and greedy choices are not ties.
    initializer_range=0.1,
)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# Sliding-window variants use a window this short so that the tests' sequences (24+ tokens)
# run past it.
WINDOW = 8

# name -> (transformers config class, model class, extra config)
VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3_rope_scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_scaling": LLAMA3_SCALING, "rope_theta": 500000.0},
    ),
    "llama_tied_bias_head_dim": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True, "head_dim": 32},
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "mistral_sliding": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "smollm3": (
        "SmolLM3Config",
        "SmolLM3ForCausalLM",
        # Layer 2 of 2 is NoPE; pad_token_id must lie inside the tiny vocabulary.
        {"no_rope_layer_interval": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {"pad_token_id": 0, "eos_token_id": 2, "sliding_window": WINDOW},
    ),
    "phi3_longrope_partial": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            "pad_token_id": 0,
            "eos_token_id": 2,
            "tie_word_embeddings": True,
            "max_position_embeddings": 256,
            "original_max_position_embeddings": 32,
            # Phi-4-mini rotates 3/4 of each head: 12 of 16 features, 6 frequencies.
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 24,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
        },
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen2_untied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": True}),
    "qwen3_untied": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}


def make_hf_model(variant: str, seed: int = 0):
    """A random transformers model of `variant`, in eval mode, fp32."""
    config_name, model_name, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**COMMON, **extra})
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        # Random norms and biases too (they start at one and zero), so every weight is tested.
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def write_hf_model(folder: Path, variant: str = "llama", seed: int = 0, template="chatml"):
    """Save a random `variant` model and a real tiny tokenizer to `folder`; returns the model."""
    folder = Path(folder)
    model = make_hf_model(variant, seed)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder, template=template, vocab_size=VOCAB_SIZE)
    return model
