"""LoRA / DoRA layers and adapter folders, held to PEFT's outputs and to exact parameter counts."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from ondevice_lora.adapters.files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterError,
    LoraConfig,
    apply_adapters,
    base_fingerprint,
    count_trainable,
    expected_trainable,
    load_adapter,
    save_adapter,
)
from ondevice_lora.adapters.layers import (
    ADAPTER_PARAMETER_NAMES,
    DoRALinear,
    LoRALinear,
    adapter_modules,
    fuse_adapters,
)
from ondevice_lora.loading import load_model
from ondevice_lora.loading.tokenizer import Tokenizer
from ondevice_lora.models import build_model
from tests.hf_fixtures import write_hf_model

TOKENS = mx.array([[5, 17, 42, 300, 7, 99, 256, 3], [1, 2, 3, 4, 5, 6, 7, 8]])
ALL_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """variant -> (folder, transformers model); written once for the whole module."""
    out = {}
    for variant in ("llama", "llama_tied_bias_head_dim"):
        folder = tmp_path_factory.mktemp(variant)
        out[variant] = (folder, write_hf_model(folder, variant))
    return out


def load_base(folder, kind: str = "fp32"):
    model, _ = load_model(folder)
    if kind == "fp16":
        model.set_dtype(mx.float16)
    elif kind == "4bit":
        nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def randomize_adapters(model, seed: int = 1):
    """Nonzero A, B and magnitudes, so that every term of the adapter math is exercised."""
    mx.random.seed(seed)
    for module in adapter_modules(model).values():
        module.lora_a = mx.random.normal(module.lora_a.shape) * 0.2
        module.lora_b = mx.random.normal(module.lora_b.shape) * 0.2
        if isinstance(module, DoRALinear):
            module.magnitude = module.magnitude * mx.random.uniform(
                0.5, 1.5, module.magnitude.shape
            )
    mx.eval(model.parameters())


def snapshot(params) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(params)}


@pytest.mark.parametrize("kind", ["fp32", "fp16", "4bit"])
@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_fresh_adapter_leaves_logits_unchanged(hf_folders, kind, fine_tune_type):
    model = load_base(hf_folders["llama_tied_bias_head_dim"][0], kind)
    before = np.array(model(TOKENS))
    apply_adapters(model, LoraConfig(target_modules="all-linear", fine_tune_type=fine_tune_type))
    # Exact for DoRA too: its output is written as a correction that is 0 when B = 0.
    np.testing.assert_array_equal(np.array(model(TOKENS)), before)


def hand_count(args, names, layers: int, rank: int, dora: bool) -> int:
    """rank * (in + out) (+ out for DoRA) per wrapped projection, from the config's sizes."""
    h, q = args.hidden_size, args.num_attention_heads * args.head_dim
    kv, inter = args.num_key_value_heads * args.head_dim, args.intermediate_size
    dims = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    per_layer = sum(rank * sum(dims[n]) + (dims[n][1] if dora else 0) for n in names)
    return layers * per_layer


@pytest.mark.parametrize("kind", ["fp32", "fp16", "4bit"])
@pytest.mark.parametrize(
    "targets, num_layers, rank, fine_tune_type",
    [
        (["q_proj", "v_proj"], None, 8, "lora"),
        ("all-linear", 1, 4, "lora"),
        (["self_attn.o_proj", "down_proj"], 2, 2, "dora"),
        ("all-linear", None, 16, "dora"),
    ],
)
def test_trainable_count_is_exact(hf_folders, kind, targets, num_layers, rank, fine_tune_type):
    # The untied model: "all-linear" must leave its lm_head alone.
    model = load_base(hf_folders["llama"][0], kind)
    config = LoraConfig(
        rank=rank, target_modules=targets, num_layers=num_layers, fine_tune_type=fine_tune_type
    )
    names = ALL_NAMES if targets == "all-linear" else [t.split(".")[-1] for t in targets]
    layers = num_layers or model.args.num_hidden_layers
    expected = hand_count(model.args, names, layers, rank, fine_tune_type == "dora")
    assert expected_trainable(model, config) == expected
    apply_adapters(model, config)
    assert count_trainable(model) == expected
    # Only adapter tensors are trainable, and the right layers are wrapped.
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert all(k.rsplit(".", 1)[1] in ADAPTER_PARAMETER_NAMES for k in trainable)
    first = model.args.num_hidden_layers - layers
    assert {int(p.split(".")[2]) for p in adapter_modules(model)} == set(range(first, 2))


def next_token_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()


@pytest.mark.parametrize("kind", ["fp32", "4bit"])
@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_training_changes_only_the_adapter(hf_folders, kind, fine_tune_type):
    model = load_base(hf_folders["llama_tied_bias_head_dim"][0], kind)
    base_before = snapshot(model.parameters())
    config = LoraConfig(target_modules="all-linear", fine_tune_type=fine_tune_type, dropout=0.1)
    apply_adapters(model, config)
    adapters_before = snapshot(model.trainable_parameters())
    model.train()
    optimizer = optim.AdamW(learning_rate=1e-2)
    step = nn.value_and_grad(model, next_token_loss)
    losses = []
    for _ in range(4):
        loss, grads = step(model, TOKENS)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    # Every base tensor (quantised codes, scales and biases included) is bit for bit the same.
    after = snapshot(model.parameters())
    base_after = {
        k.replace(".base.", "."): v
        for k, v in after.items()
        if k.rsplit(".", 1)[1] not in ADAPTER_PARAMETER_NAMES
    }
    assert base_after.keys() == base_before.keys()
    for name, value in base_before.items():
        assert base_after[name].dtype == value.dtype
        assert np.array_equal(base_after[name], value), name
    # Every adapter tensor moved.
    adapters_after = snapshot(model.trainable_parameters())
    assert adapters_after.keys() == adapters_before.keys()
    for name, value in adapters_before.items():
        assert not np.array_equal(adapters_after[name], value), name


def peft_model(hf_model, rank, alpha, use_rslora, use_dora):
    import peft

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=ALL_NAMES,
        use_rslora=use_rslora,
        use_dora=use_dora,
        lora_dropout=0.0,
    )
    return peft.get_peft_model(hf_model, config).eval()


@pytest.mark.parametrize("variant", ["llama", "llama_tied_bias_head_dim"])
@pytest.mark.parametrize(
    "fine_tune_type, use_rslora", [("lora", False), ("lora", True), ("dora", False), ("dora", True)]
)
def test_outputs_equal_peft(hf_folders, variant, fine_tune_type, use_rslora):
    folder, hf_model = hf_folders[variant]
    rank, alpha = 4, 8
    reference = peft_model(
        make_copy(hf_model), rank, alpha, use_rslora, use_dora=fine_tune_type == "dora"
    )
    model = load_base(folder)
    config = LoraConfig(
        rank=rank,
        alpha=alpha,
        target_modules="all-linear",
        fine_tune_type=fine_tune_type,
        use_rslora=use_rslora,
    )
    apply_adapters(model, config)
    randomize_adapters(model)

    # Copy our random adapter tensors into PEFT's modules of the same name.
    ours = adapter_modules(model)
    copied = 0
    with torch.no_grad():
        for name, module in reference.named_modules():
            path = name.removeprefix("base_model.model.")
            if path not in ours:
                continue
            layer = ours[path]
            module.lora_A["default"].weight.copy_(torch.from_numpy(np.array(layer.lora_a)))
            module.lora_B["default"].weight.copy_(torch.from_numpy(np.array(layer.lora_b)))
            if fine_tune_type == "dora":
                magnitude = torch.from_numpy(np.array(layer.magnitude))
                module.lora_magnitude_vector["default"].weight.copy_(magnitude)
            assert module.scaling["default"] == pytest.approx(layer.scale)
            copied += 1
    assert copied == len(ours) == 7 * model.args.num_hidden_layers

    with torch.no_grad():
        expected = reference(torch.from_numpy(np.array(TOKENS)).long()).logits.numpy()
    np.testing.assert_allclose(np.array(model(TOKENS)), expected, atol=1e-4, rtol=0)


def make_copy(hf_model):
    import copy

    return copy.deepcopy(hf_model)


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_fuse_matches_unfused(hf_folders, fine_tune_type):
    model = load_base(hf_folders["llama_tied_bias_head_dim"][0])
    apply_adapters(model, LoraConfig(target_modules="all-linear", fine_tune_type=fine_tune_type))
    randomize_adapters(model)
    unfused = np.array(model(TOKENS))
    fuse_adapters(model)
    assert not adapter_modules(model)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)
    np.testing.assert_allclose(np.array(model(TOKENS)), unfused, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_fuse_of_a_quantized_base(hf_folders, fine_tune_type):
    model = load_base(hf_folders["llama"][0], "4bit")
    config = LoraConfig(target_modules=["q_proj", "down_proj"], fine_tune_type=fine_tune_type)
    apply_adapters(model, config)
    randomize_adapters(model)
    layer = model.layers[0].self_attn.q_proj
    x = mx.random.normal((3, 64))
    expected = np.array(layer(x))
    # De-quantised: the same function as the adapter, up to float rounding.
    dense = layer.fuse(dequantize=True)
    assert isinstance(dense, nn.Linear) and not isinstance(dense, nn.QuantizedLinear)
    np.testing.assert_allclose(np.array(dense(x)), expected, atol=1e-4, rtol=0)
    # Re-quantised with the base's own settings: exactly the dense result, quantised again.
    fused = layer.fuse()
    assert isinstance(fused, nn.QuantizedLinear)
    assert (fused.group_size, fused.bits, fused.mode) == (32, 4, "affine")
    weight, scales, biases = mx.quantize(dense.weight, group_size=32, bits=4)
    for ours, reference in [(fused.weight, weight), (fused.scales, scales), (fused.biases, biases)]:
        assert np.array_equal(np.array(ours), np.array(reference))


@pytest.mark.parametrize("kind", ["fp32", "4bit"])
@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_save_and_load_round_trip(hf_folders, tmp_path, kind, fine_tune_type):
    folder = hf_folders["llama"][0]
    tokenizer = Tokenizer.from_folder(folder)
    model = load_base(folder, kind)
    identity = base_fingerprint(model, tokenizer)
    config = LoraConfig(
        rank=4,
        alpha=32,
        dropout=0.05,
        target_modules=["q_proj", "down_proj"],
        num_layers=1,
        fine_tune_type=fine_tune_type,
        use_rslora=True,
    )
    apply_adapters(model, config)
    randomize_adapters(model)
    expected = np.array(model(TOKENS))
    assert base_fingerprint(model, tokenizer) == identity  # wrapping does not change the base
    save_adapter(tmp_path, model, config, identity)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    saved = mx.load(str(tmp_path / ADAPTER_WEIGHTS_FILE))
    names = {"lora_a", "lora_b"} | ({"magnitude"} if fine_tune_type == "dora" else set())
    assert sorted(saved) == sorted(f"{p}.{n}" for p in adapter_modules(model) for n in names)
    assert all(k.startswith("model.layers.1.") for k in saved)
    stored = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert stored["rank"] == 4 and stored["alpha"] == 32 and stored["use_rslora"] is True
    assert stored["base"]["model_type"] == "llama"

    fresh = load_base(folder, kind)
    loaded = load_adapter(fresh, tmp_path, base_fingerprint(fresh, tokenizer))
    assert loaded == config
    for path, module in adapter_modules(model).items():
        other = adapter_modules(fresh)[path]
        assert type(other) is type(module) and other.scale == module.scale
        for name in module.adapter_parameter_names:
            assert np.array_equal(np.array(other[name]), np.array(module[name]))
    np.testing.assert_array_equal(np.array(fresh(TOKENS)), expected)


@pytest.fixture
def saved_adapter(hf_folders, tmp_path):
    """An fp32 llama adapter saved with its tokenizer; returns its folder."""
    folder = hf_folders["llama"][0]
    model = load_base(folder)
    config = LoraConfig(target_modules=["q_proj", "v_proj"])
    apply_adapters(model, config)
    save_adapter(
        tmp_path / "adapter", model, config, base_fingerprint(model, Tokenizer.from_folder(folder))
    )
    return tmp_path / "adapter"


def test_adapter_for_another_hidden_size_is_refused(hf_folders, saved_adapter):
    config = dict(json.loads((hf_folders["llama"][0] / "config.json").read_text()))
    config["hidden_size"] = 96
    other = build_model(config)
    with pytest.raises(AdapterError) as e:
        load_adapter(other, saved_adapter, base_fingerprint(other))
    message = str(e.value)
    assert str(saved_adapter) in message and "another base model" in message
    assert "hidden_size: 64 for the adapter, 96 for this model" in message
    assert not adapter_modules(other)


def test_adapter_for_another_tokenizer_is_refused(hf_folders, saved_adapter):
    folder = hf_folders["llama"][0]
    model = load_base(folder)
    tokenizer = Tokenizer.from_folder(folder)
    tokenizer.backend.add_tokens(["<|my_new_token|>"])
    with pytest.raises(AdapterError, match="tokenizer vocabulary"):
        load_adapter(model, saved_adapter, base_fingerprint(model, tokenizer))
    # Without a tokenizer to compare, the same base is accepted.
    load_adapter(model, saved_adapter, base_fingerprint(model))


@pytest.mark.parametrize("kind, reason", [("fp16", "float16"), ("4bit", "quantization")])
def test_adapter_for_another_dtype_is_refused(hf_folders, saved_adapter, kind, reason):
    model = load_base(hf_folders["llama"][0], kind)
    with pytest.raises(AdapterError, match=reason) as e:
        load_adapter(model, saved_adapter, base_fingerprint(model))
    assert "weights: dtypes" in str(e.value)


def test_malformed_adapter_config_names_file_line_and_column(saved_adapter, hf_folders):
    path = saved_adapter / ADAPTER_CONFIG_FILE
    path.write_text('{\n  "rank": 8,\n  "alpha": ,\n}\n')
    with pytest.raises(AdapterError) as e:
        load_adapter(load_base(hf_folders["llama"][0]), saved_adapter, None)
    assert str(path) in str(e.value) and "line 3, column 12" in str(e.value)


def test_invalid_settings_are_reported_together(saved_adapter):
    with pytest.raises(AdapterError) as e:
        LoraConfig(rank=0, dropout=1.5, fine_tune_type="lokr", target_modules="q_proj").validate()
    message = str(e.value)
    for field in ("rank", "dropout", "fine_tune_type", "target_modules"):
        assert field in message
    path = saved_adapter / ADAPTER_CONFIG_FILE
    data = json.loads(path.read_text())
    data["rnak"] = 4
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterError, match="unknown keys rnak"):
        load_adapter(None, saved_adapter, None)


def test_unknown_target_module_lists_the_available_ones(hf_folders):
    model = load_base(hf_folders["llama"][0])
    with pytest.raises(AdapterError) as e:
        apply_adapters(model, LoraConfig(target_modules=["q_proj", "wq", "lm_head"]))
    message = str(e.value)
    assert "wq, lm_head" in message and "match no linear layer" in message
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in message
    with pytest.raises(AdapterError, match="model has 2 decoder layers"):
        apply_adapters(model, LoraConfig(num_layers=3))
    assert not adapter_modules(model)


def test_missing_adapter_tensor_is_reported(hf_folders, saved_adapter):
    path = saved_adapter / ADAPTER_WEIGHTS_FILE
    tensors = mx.load(str(path))
    del tensors["model.layers.0.self_attn.q_proj.lora_b"]
    tensors["model.layers.0.self_attn.q_proj.extra"] = mx.zeros((2,))
    mx.save_safetensors(str(path), tensors)
    model = load_base(hf_folders["llama"][0])
    with pytest.raises(AdapterError) as e:
        load_adapter(model, saved_adapter, base_fingerprint(model))
    message = str(e.value)
    assert "missing 1: model.layers.0.self_attn.q_proj.lora_b" in message
    assert "unexpected 1: model.layers.0.self_attn.q_proj.extra" in message


def test_wrapping_a_non_linear_layer_is_a_type_error():
    with pytest.raises(TypeError):
        LoRALinear.from_base(nn.Embedding(10, 4), rank=2, alpha=4)
