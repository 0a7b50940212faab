"""Several adapters on one loaded base: switching, disabling and mixing them at generation time.

The references: the base model loaded on its own, `load(..., adapter=)` (one LoRALinear per
layer), and a dense model whose weights we sum by hand in numpy.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from ondevice_lora import SamplingConfig, generate, load
from ondevice_lora.adapters.files import AdapterError, LoraConfig, read_adapter_config
from ondevice_lora.adapters.fingerprint import base_fingerprint
from ondevice_lora.adapters.layers import adapter_modules, wrapped_modules
from ondevice_lora.adapters.mix import (
    MultiAdapterLinear,
    active_adapters,
    adapter_names,
    load_adapters,
    multi_adapter_modules,
    remove_adapters,
    set_active,
)
from ondevice_lora.cli import main
from ondevice_lora.loading.weights import read_safetensors
from tests.adapter_fixtures import TOKENS, write_adapter, write_bases_with_adapters
from tests.hf_fixtures import write_hf_model

CONFIGS = {
    "a": LoraConfig(rank=4, alpha=8, target_modules="all-linear"),
    # Other layers, rank and scaling than "a": the layers each adapter wraps differ.
    "b": LoraConfig(rank=2, alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "d": LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "o_proj"], fine_tune_type="dora"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_bases_with_adapters(tmp_path_factory.mktemp("switching"), CONFIGS)


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS))


def loaded(folders, kind, names, **kwargs):
    model, tokenizer = load(folders[kind])
    adapters = {n: folders[f"{kind}/{n}"] for n in names}
    return load_adapters(model, adapters, tokenizer, **kwargs), tokenizer


@pytest.mark.parametrize("kind", ["base", "q4"])
def test_switching_changes_outputs_and_switching_back_restores_them(folders, kind):
    plain, _ = load(folders[kind])
    model, _ = loaded(folders, kind, ["a", "b", "d"])
    assert adapter_names(model) == ["a", "b", "d"] and active_adapters(model) == {}
    # Loaded but inactive, and disabled: the base's outputs, bit for bit.
    np.testing.assert_array_equal(logits(model), logits(plain))
    outputs = {}
    for name in ("a", "b", "d"):
        set_active(model, name)
        outputs[name] = logits(model)
        # One adapter computes exactly what the single-adapter path does.
        single, _ = load(folders[kind], adapter=folders[f"{kind}/{name}"])
        np.testing.assert_array_equal(outputs[name], logits(single))
    for a, b in [("a", "b"), ("a", "d"), ("b", "d")]:
        assert np.abs(outputs[a] - outputs[b]).max() > 1e-2
    for name in ("d", "a", "b", "a"):
        set_active(model, name)
        np.testing.assert_array_equal(logits(model), outputs[name])
    set_active(model, None)
    assert active_adapters(model) == {}
    np.testing.assert_array_equal(logits(model), logits(plain))


def test_the_base_is_loaded_once_and_never_changed(folders):
    model, tokenizer = load(folders["base"])
    identity = base_fingerprint(model, tokenizer)
    q_proj = model.layers[0].self_attn.q_proj
    load_adapters(model, {"a": folders["base/a"], "b": folders["base/b"]}, tokenizer)
    wrapper = model.layers[0].self_attn.q_proj
    assert isinstance(wrapper, MultiAdapterLinear) and wrapper.base is q_proj
    assert sorted(wrapper.adapters) == ["a", "b"]
    # k_proj is wrapped for "a" only; the model's identity is still the base's.
    assert list(model.layers[0].self_attn.k_proj.adapters) == ["a"]
    assert base_fingerprint(model, tokenizer) == identity
    # A third adapter later joins the same wrappers.
    load_adapters(model, {"d": folders["base/d"]}, tokenizer)
    assert model.layers[0].self_attn.q_proj is wrapper and sorted(wrapper.adapters) == list("abd")


def test_a_weighted_combination_equals_the_hand_computed_sum(folders):
    weights = {"a": 0.7, "b": -0.4}
    model, _ = loaded(folders, "base", ["a", "b"], active=weights)
    assert active_adapters(model) == weights

    # One layer: base(x) + sum_i w_i * scale_i * (x @ A_i.T) @ B_i.T, in numpy.
    layer = model.layers[1].self_attn.q_proj
    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    expected = np.array(layer.base(mx.array(x)))
    for name, w in weights.items():
        config, _ = read_adapter_config(folders[f"base/{name}"])
        tensors = read_safetensors(folders[f"base/{name}"] / "adapters.safetensors")
        a = np.array(tensors["model.layers.1.self_attn.q_proj.lora_a"])
        b = np.array(tensors["model.layers.1.self_attn.q_proj.lora_b"])
        expected += w * config.scale * (x @ a.T) @ b.T
    np.testing.assert_allclose(np.array(layer(mx.array(x))), expected, atol=1e-5, rtol=0)

    # The whole model: a dense base whose weights hold W + sum_i w_i * scale_i * B_i @ A_i.
    summed, _ = load(folders["base"])
    modules = dict(summed.named_modules())
    for name, w in weights.items():
        config, _ = read_adapter_config(folders[f"base/{name}"])
        tensors = read_safetensors(folders[f"base/{name}"] / "adapters.safetensors")
        for key, lora_a in tensors.items():
            path = key.removesuffix(".lora_a")
            if path != key:
                delta = w * config.scale * (tensors[f"{path}.lora_b"] @ lora_a)
                modules[path].weight = modules[path].weight + delta
    np.testing.assert_allclose(logits(model), logits(summed), atol=1e-4, rtol=0)


def test_dora_adapters_are_active_only_alone(folders):
    model, _ = loaded(folders, "base", ["a", "d"])
    for active in ({"a": 0.5, "d": 0.5}, {"d": 0.5}, {"a": 1, "d": 1}):
        with pytest.raises(AdapterError, match="DoRA adapter d can only be active alone"):
            set_active(model, active)
    # A zero weight leaves an adapter out, so this is DoRA alone.
    set_active(model, {"a": 0, "d": 1})
    assert active_adapters(model) == {"d": 1.0}


def test_generation_switches_without_reloading(folders):
    model, tokenizer = loaded(folders, "base", ["a", "b"])
    config = SamplingConfig(max_tokens=8)
    plain, _ = load(folders["base"])
    texts = {}
    for active in ("a", None, "b", "a", None):
        set_active(model, active)
        text = generate(model, tokenizer, "hi", config)
        assert texts.setdefault(active, text) == text
    assert texts[None] == generate(plain, tokenizer, "hi", config)
    assert len(set(texts.values())) == 3


def test_cli_generate_with_weighted_adapters_matches_the_api(folders):
    a, b = folders["base/a"], folders["base/b"]
    args = ["generate", "--model", str(folders["base"]), "--prompt", "hi", "--greedy"]
    args += ["--max-tokens", "8", "--adapter", str(a), "--adapter", str(b)]
    result = CliRunner().invoke(main, [*args, "--adapter-weight", "0.7", "--adapter-weight", "0.3"])
    assert result.exit_code == 0, result.output
    model, tokenizer = loaded(folders, "base", ["a", "b"], active={"a": 0.7, "b": 0.3})
    assert result.stdout.rstrip("\n") == generate(
        model, tokenizer, "hi", SamplingConfig(max_tokens=8)
    )
    # One weight per adapter, or none.
    result = CliRunner().invoke(main, [*args, "--adapter-weight", "0.7"])
    assert result.exit_code == 2 and "1 --adapter-weight for 2 --adapter" in result.stderr


@pytest.mark.parametrize(
    "variant, reason",
    [
        ("llama", "tie_word_embeddings: False for the adapter, True for this model"),
        ("qwen3", "model_type: 'qwen3' for the adapter, 'llama' for this model"),
    ],
)
def test_an_adapter_for_another_base_is_refused_and_changes_nothing(
    folders, tmp_path, variant, reason
):
    write_hf_model(tmp_path / "other", variant)
    foreign = write_adapter(tmp_path / "other", tmp_path / "foreign", CONFIGS["a"])
    model, tokenizer = loaded(folders, "base", ["b"], active="b")
    before = logits(model)
    with pytest.raises(AdapterError, match="trained on another base model") as error:
        load_adapters(model, {"a": folders["base/a"], "x": foreign}, tokenizer)
    assert str(foreign) in str(error.value) and reason in str(error.value)
    # Nothing was loaded, not even the good adapter listed before the bad one.
    assert adapter_names(model) == ["b"]
    np.testing.assert_array_equal(logits(model), before)


def test_tokenizer_mismatch_is_refused(folders):
    model, tokenizer = load(folders["base"])
    tokenizer.backend.add_tokens(["<|new|>"])
    with pytest.raises(AdapterError, match="tokenizer vocabulary"):
        load_adapters(model, [folders["base/a"]], tokenizer)
    assert not wrapped_modules(model)


def test_bad_names_and_selections_are_clear_errors(folders):
    model, tokenizer = load(folders["base"])
    with pytest.raises(AdapterError, match="no adapters loaded"):
        set_active(model, "a")
    with pytest.raises(AdapterError, match="no adapters to load"):
        load_adapters(model, {})
    with pytest.raises(AdapterError, match="without dots"):
        load_adapters(model, {"v1.2": folders["base/a"]})
    # A list of folders is named after them.
    load_adapters(model, [folders["base/a"], folders["base/b"]])
    assert adapter_names(model) == ["a", "b"]
    with pytest.raises(AdapterError, match="already loaded"):
        load_adapters(model, {"a": folders["base/a"]})
    with pytest.raises(AdapterError) as error:
        set_active(model, {"c": 1.0, "a": float("nan")})
    message = str(error.value)
    assert "unknown adapter 'c'" in message and "weight of 'a'" in message
    assert "Loaded adapters: a, b" in message
    with pytest.raises(AdapterError, match="adapter name, None or"):
        set_active(model, ["a"])


def test_a_model_with_a_single_adapter_applied_is_refused(folders):
    model, tokenizer = load(folders["base"], adapter=folders["base/a"])
    with pytest.raises(AdapterError, match="already has an adapter applied"):
        load_adapters(model, {"b": folders["base/b"]}, tokenizer)


def test_removing_adapters_gives_the_plain_base_back(folders):
    plain, _ = load(folders["q4"])
    model, _ = loaded(folders, "q4", ["a", "b"], active={"a": 1, "b": 1})
    remove_adapters(model, ["a"])
    assert adapter_names(model) == ["b"] and active_adapters(model) == {"b": 1.0}
    # Layers only "a" wrapped are plain again; q_proj still holds "b".
    assert isinstance(model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert list(model.layers[0].self_attn.q_proj.adapters) == ["b"]
    remove_adapters(model)
    assert not multi_adapter_modules(model) and not adapter_modules(model)
    np.testing.assert_array_equal(logits(model), logits(plain))
    with pytest.raises(AdapterError, match="no adapter named a"):
        remove_adapters(model, ["a"])
