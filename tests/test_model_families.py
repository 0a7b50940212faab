"""Gemma 3, Phi-3 (and Phi-4-mini's partial rotary and LongRoPE), SmolLM3 and sliding-window
Mistral against the references we did not write.

Each family's tiny model is saved by transformers; our loader reads those files unchanged.
Logits and greedy decoding are held to transformers over sequences longer than the sliding
window (8), fused folders to mlx-lm, adapters on Phi-3's fused projections to PEFT, and Core ML
packages (merged and multifunction) to MLX by the validator's own interpreter.
"""

from __future__ import annotations

import copy
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import torch

from converters.formats import export_peft, import_peft
from ondevice_lora.adapters.files import LoraConfig, adapter_modules, apply_adapters
from ondevice_lora.adapters.fingerprint import base_fingerprint
from ondevice_lora.adapters.fuse import fuse
from ondevice_lora.generation.generate import SamplingConfig, generate_tokens
from ondevice_lora.loading import load, load_model
from ondevice_lora.training.step import make_step
from tests.adapter_fixtures import write_adapter
from tests.hf_fixtures import VOCAB_SIZE, WINDOW, write_hf_model

FAMILIES = ["mistral_sliding", "smollm3", "phi3", "phi3_longrope_partial", "gemma3_text"]
LOGITS_ATOL = 1e-4
LENGTH = 32  # four sliding windows; the LongRoPE variant's original context is 32 too
RNG = np.random.default_rng(11)
IDS = RNG.integers(3, VOCAB_SIZE, size=(2, 40))
FIXTURES = {}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """variant -> (folder, transformers model), written once per module."""

    def make(variant: str):
        if variant not in FIXTURES:
            folder = tmp_path_factory.mktemp(variant)
            FIXTURES[variant] = (folder, write_hf_model(folder, variant))
        return FIXTURES[variant]

    return make


def torch_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        mask = None if mask is None else torch.tensor(mask)
        return model(input_ids=torch.tensor(ids), attention_mask=mask).logits.numpy()


@pytest.mark.parametrize("variant", FAMILIES)
def test_logits_match_transformers_past_the_sliding_window(family, variant):
    folder, reference = family(variant)
    model, config = load_model(folder)
    assert config["model_type"] == reference.config.model_type
    ids = IDS[:, :LENGTH]
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: the window counts padding positions, as HF's does
    expected = torch_logits(reference, ids, mask)
    ours = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    real = mask.astype(bool)
    assert np.abs(ours[real] - expected[real]).max() <= LOGITS_ATOL
    assert LENGTH > WINDOW


def test_longrope_switches_to_the_long_factors_past_the_original_context(family):
    folder, reference = family("phi3_longrope_partial")
    model, _ = load_model(folder)
    for length in (32, 40):  # the original context is 32: short factors, then long ones
        expected = torch_logits(reference, IDS[:, :length])
        ours = np.array(model(mx.array(IDS[:, :length])))
        np.testing.assert_allclose(ours, expected, atol=LOGITS_ATOL, rtol=0)
    short, long = (np.array(model(mx.array(IDS[:, :n])))[:, :8] for n in (32, 40))
    assert np.abs(short - long).max() > 1e-2  # the two factor lists really differ


@pytest.mark.parametrize("variant", ["mistral_sliding", "gemma3_text"])
def test_packed_rows_keep_each_example_to_itself_within_its_window(family, variant):
    folder, _ = family(variant)
    model, _ = load_model(folder)
    a, b = IDS[0, :20], IDS[1, :12]
    row = mx.array(np.concatenate([a, b])[None])
    positions = mx.array(np.concatenate([np.arange(20), np.arange(12)])[None])
    segments = mx.array(np.array([0] * 20 + [1] * 12)[None])
    packed = np.array(model(row, position_ids=positions, segment_ids=segments))[0]
    alone = [np.array(model(mx.array(x[None])))[0] for x in (a, b)]
    np.testing.assert_allclose(packed, np.concatenate(alone), atol=LOGITS_ATOL, rtol=0)


# A prompt whose greedy continuation stays varied past position 32 (most fall into a loop of
# one token there, which would hide the difference the LongRoPE switch makes).
VARIED_PROMPT = [int(t) for t in np.random.default_rng(24).integers(3, VOCAB_SIZE, size=8)]


@pytest.mark.parametrize(
    "variant, length, prompt",
    [(v, LENGTH, [int(t) for t in IDS[0, :8]]) for v in FAMILIES]
    + [("phi3_longrope_partial", 40, VARIED_PROMPT)],
    ids=[*FAMILIES, "phi3_longrope_past_the_original_context"],
)
def test_greedy_decoding_with_the_cache_matches_transformers_generate(
    family, variant, length, prompt
):
    """Decoding runs well past the window; at 40 tokens, LongRoPE switches to its long factors
    mid-generation, where transformers re-feeds the whole sequence (and so do we)."""
    folder, reference = family(variant)
    model, _ = load_model(folder)
    new = length - len(prompt)
    ours = list(generate_tokens(model, prompt, SamplingConfig(max_tokens=new), eos_ids=()))
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new,
            pad_token_id=0,
        )
    assert ours == out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", FAMILIES)
def test_a_few_training_steps_on_a_4bit_base_lower_the_loss(family, variant):
    folder, _ = family(variant)
    model, _ = load(folder)
    nn.quantize(model, group_size=32, bits=4)
    mx.random.seed(0)
    config = LoraConfig(rank=8, alpha=16)  # the default targets: q_proj, v_proj or qkv_proj
    paths = apply_adapters(model, config)
    expected = "qkv_proj" if variant.startswith("phi3") else "v_proj"
    assert paths and all(p.endswith(("q_proj", expected)) for p in paths)
    optimizer = optim.Adam(learning_rate=1e-2)
    step = make_step(model, optimizer)
    ids = mx.array(IDS[:, :LENGTH])
    batch = (ids[:, :-1], ids[:, 1:], mx.ones((2, LENGTH - 1)))
    losses = []
    for _ in range(12):
        loss, _, _ = step(batch, None, True)
        mx.eval(loss, model.parameters())
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("variant", FAMILIES)
def test_fused_folder_matches_the_adapter_and_loads_in_transformers(family, variant, tmp_path):
    import transformers

    folder, _ = family(variant)
    config = LoraConfig(rank=4, alpha=8, target_modules="all-linear")
    adapter = write_adapter(folder, tmp_path / "adapter", config, 0.2)
    adapted, _ = load(folder, adapter=adapter)
    ids = IDS[:, :LENGTH]
    expected = np.array(adapted(mx.array(ids)))
    base, _ = load(folder)
    assert np.abs(expected - np.array(base(mx.array(ids)))).max() > 1e-2  # the adapter matters

    fuse(folder, [adapter], tmp_path / "fused", dequantize=True)
    ours, _ = load(tmp_path / "fused")
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), expected, atol=LOGITS_ATOL, rtol=0)
    # mlx-lm's versions of these families differ from transformers' on these configs (no
    # sliding window for Mistral and Phi-3, only sliding_window_pattern for Gemma 3), so the
    # fused folder is held to transformers, which reads it as a Hub checkpoint.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    np.testing.assert_allclose(torch_logits(theirs, ids), expected, atol=LOGITS_ATOL, rtol=0)


# --- adapters on fused projections, the way PEFT trains them -----------------------------------


def test_adapter_on_fused_projections_exports_to_peft_and_matches(family, tmp_path):
    from peft import PeftModel

    folder, reference = family("phi3")
    config = LoraConfig(rank=3, alpha=7, target_modules=["qkv_proj", "gate_up_proj"])
    adapter = write_adapter(folder, tmp_path / "ours", config, 0.3)
    ours, _ = load(folder, adapter=adapter)
    ids = IDS[:, :LENGTH]
    expected = np.array(ours(mx.array(ids)))

    export_peft(adapter, tmp_path / "peft", base_model_name_or_path=str(folder))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft").eval()
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    assert wrapped == set(adapter_modules(ours))
    np.testing.assert_allclose(torch_logits(peft_model, ids), expected, atol=LOGITS_ATOL, rtol=0)


def test_peft_adapter_on_fused_projections_imports_and_matches(family, tmp_path):
    import peft

    folder, reference = family("phi3")
    torch.manual_seed(0)
    options = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"])
    trained = peft.get_peft_model(copy.deepcopy(reference), options).eval()
    with torch.no_grad():
        for module in trained.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0, 0.3)
    trained.save_pretrained(tmp_path / "peft")
    ids = IDS[:, :LENGTH]
    expected = torch_logits(trained, ids)

    import_peft(tmp_path / "peft", tmp_path / "ours", model=folder)
    model, _ = load(folder, adapter=tmp_path / "ours")
    shapes = {p: m.lora_b.shape for p, m in adapter_modules(model).items()}
    assert shapes["model.layers.0.self_attn.qkv_proj"] == (4 * 16 + 2 * 2 * 16, 4)
    assert shapes["model.layers.0.mlp.gate_up_proj"] == (2 * 128, 4)
    np.testing.assert_allclose(np.array(model(mx.array(ids))), expected, atol=LOGITS_ATOL, rtol=0)


# --- Core ML --------------------------------------------------------------------------------

CONTEXT, PREFILL, STEPS = 32, 8, 8
PROMPT = [int(t) for t in IDS[0, :20]]  # prompt and decode steps: 28 positions, past the window


@pytest.mark.parametrize("variant", FAMILIES)
def test_coreml_merged_and_multifunction_exports_validate(family, variant, tmp_path):
    pytest.importorskip("coremltools")
    from converters.coreml.export import export_coreml
    from converters.coreml.multifunction import export_multifunction, validate_multifunction
    from converters.coreml.validate import validate_package
    from converters.coreml.weights import quantize_for_int4

    folder, _ = family(variant)
    adapters = {
        "chat": write_adapter(folder, tmp_path / "chat", LoraConfig(rank=2, alpha=4), 0.2),
        "all": write_adapter(
            folder, tmp_path / "all", LoraConfig(rank=4, alpha=8, target_modules="all-linear")
        ),
    }
    # Merged: the adapter folded into an fp32 package, held to MLX with the adapter loaded.
    adapted, tokenizer = load(folder, adapter=adapters["all"])
    merged = tmp_path / "merged.mlpackage"
    export_coreml(
        adapted, tokenizer, merged, "fp32", context_length=CONTEXT, prefill_length=PREFILL
    )
    report = validate_package(merged, adapted, PROMPT, STEPS)
    assert report.passed and report.positions == len(PROMPT) + STEPS

    # Multifunction: one int4 base shared by both adapters' functions, each validated.
    base, tokenizer = load(folder)
    fingerprint = base_fingerprint(base, tokenizer)  # the one the adapters recorded
    quantize_for_int4(base)
    package = tmp_path / "multi.mlpackage"
    result = export_multifunction(
        base,
        tokenizer,
        adapters,
        package,
        context_length=CONTEXT,
        prefill_length=PREFILL,
        fingerprint=fingerprint,
    )
    reports = validate_multifunction(package, base, result.adapters, PROMPT, STEPS)
    assert set(reports) == {"base", "chat", "all"} and all(r.passed for r in reports.values())


def test_coreml_refuses_a_context_past_the_longrope_switch(family, tmp_path):
    pytest.importorskip("coremltools")
    from converters.coreml.export import export_coreml

    folder, _ = family("phi3_longrope_partial")
    model, tokenizer = load(folder)
    with pytest.raises(Exception, match="original context of 32"):
        export_coreml(model, tokenizer, tmp_path / "m.mlpackage", "fp32", context_length=64)


def test_swappable_export_refuses_fused_projections_clearly(family, tmp_path):
    pytest.importorskip("coremltools")
    from converters.coreml.export import CoreMLExportError
    from converters.coreml.swappable import export_swappable

    folder, _ = family("phi3")
    model, tokenizer = load(folder)
    with pytest.raises(CoreMLExportError, match="qkv_proj.*--mode merged"):
        export_swappable(model, tokenizer, tmp_path / "s.mlpackage", targets="all-linear")


@pytest.mark.parametrize("variant", ["gemma3_text", "mistral_sliding"])
def test_layer_types_of_the_wrong_length_get_a_clear_error(family, variant, tmp_path):
    import json
    import shutil

    from ondevice_lora.errors import ModelLoadError

    folder = Path(shutil.copytree(family(variant)[0], tmp_path / "copy"))
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = ["sliding_attention"] * 3  # the model has 2 layers
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as error:
        load_model(folder)
    assert str(folder) in str(error.value)
    assert "layer_types has 3 entries for num_hidden_layers 2" in str(error.value)
