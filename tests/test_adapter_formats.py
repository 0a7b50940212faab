"""Adapter formats, held to the tools that read and write them: PEFT on transformers, mlx-lm,
and the `gguf` package for llama.cpp's GGUF LoRA files."""

from __future__ import annotations

import copy
import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_unflatten

from converters.formats import (
    AdapterFormatError,
    export_adapter,
    export_gguf_lora,
    export_mlx_lm,
    export_peft,
    import_adapter,
    import_mlx_lm,
    import_peft,
)
from converters.formats.cli import export_group, import_adapter_command
from converters.formats.common import alpha_for_scale, float32_alpha_for_scale
from ondevice_lora.adapters.files import (
    ADAPTER_CONFIG_FILE,
    LoraConfig,
    adapter_modules,
    apply_adapters,
    base_fingerprint,
    read_adapter_config,
    save_adapter,
)
from ondevice_lora.adapters.layers import DoRALinear
from ondevice_lora.cli import main
from ondevice_lora.loading import load
from ondevice_lora.loading.gguf.model import _unpermute_rows
from tests.hf_fixtures import COMMON, write_hf_model

TOKENS = mx.array([[5, 17, 42, 300, 7, 99, 256, 3], [1, 2, 3, 4, 5, 6, 7, 8]])
ATOL = 1e-4  # fp32 logits, ours against the reference tool's


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """variant -> (folder, transformers model), written once for the module."""
    out = {}
    for variant in ("llama", "llama_tied_bias_head_dim", "qwen2", "qwen3"):
        folder = tmp_path_factory.mktemp(variant)
        out[variant] = (folder, write_hf_model(folder, variant))
    return out


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.array(TOKENS)).long()).logits.numpy()


def make_adapter(folder, out, config: LoraConfig, seed: int = 1):
    """Our adapter on the base in `folder`, with random nonzero tensors, saved to `out`.

    Returns the adapted model, whose logits every export must reproduce.
    """
    model, tokenizer = load(folder)
    apply_adapters(model, config)
    mx.random.seed(seed)
    for module in adapter_modules(model).values():
        module.lora_a = mx.random.normal(module.lora_a.shape) * 0.3
        module.lora_b = mx.random.normal(module.lora_b.shape) * 0.3
        if isinstance(module, DoRALinear):
            module.magnitude = module.magnitude * mx.random.uniform(
                0.5, 1.5, module.magnitude.shape
            )
    mx.eval(model.parameters())
    save_adapter(out, model, config, base_fingerprint(model, tokenizer))
    return model


def assert_adapter_matters(expected, folder):
    """The adapter must move the logits, or matching them would prove nothing."""
    base, _ = load(folder)
    assert np.abs(expected - logits(base)).max() > 1e-2


# --- PEFT --------------------------------------------------------------------------------------

CASES = [
    ("lora", False, "all-linear", None),
    ("lora", True, ["q_proj", "v_proj"], 1),
    ("dora", False, ["self_attn.o_proj", "down_proj"], None),
    ("dora", True, "all-linear", 1),
]


def case_config(fine_tune_type, use_rslora, targets, num_layers) -> LoraConfig:
    """The adapter of one parametrised case: rank 3 and alpha 7, odd on purpose."""
    return LoraConfig(
        rank=3,
        alpha=7,
        target_modules=targets,
        num_layers=num_layers,
        fine_tune_type=fine_tune_type,
        use_rslora=use_rslora,
    )


@pytest.mark.parametrize("fine_tune_type, use_rslora, targets, num_layers", CASES)
def test_export_to_peft_matches_peft(
    bases, tmp_path, fine_tune_type, use_rslora, targets, num_layers
):
    from peft import PeftModel

    folder, hf_model = bases["llama"]
    config = case_config(fine_tune_type, use_rslora, targets, num_layers)
    ours = make_adapter(folder, tmp_path / "ours", config)
    expected = logits(ours)
    assert_adapter_matters(expected, folder)

    export_peft(tmp_path / "ours", tmp_path / "peft", base_model_name_or_path=str(folder))
    reference = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "peft").eval()
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in reference.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    assert wrapped == set(adapter_modules(ours))  # the same layers, no more, no fewer
    np.testing.assert_allclose(torch_logits(reference), expected, atol=ATOL, rtol=0)

    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["use_rslora"]) == (3, 7, use_rslora)
    assert saved["use_dora"] == (fine_tune_type == "dora")
    assert saved["layers_to_transform"] == (None if num_layers is None else [1])


def peft_adapter(hf_model, out, seed: int = 0, **options):
    """An adapter made and saved by PEFT itself, with random B (and magnitudes); returns its
    logits."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(**options)).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0, 0.3)
                if "default" in getattr(module, "lora_magnitude_vector", {}):
                    module.lora_magnitude_vector["default"].weight.mul_(1.3)
    model.save_pretrained(out)
    return torch_logits(model)


@pytest.mark.parametrize(
    "use_dora, use_rslora, targets, layers",
    [
        (False, False, ["q_proj", "k_proj", "v_proj", "o_proj"], [1]),
        (False, True, "all-linear", None),  # PEFT allows no layers_to_transform with it
        (True, False, ["gate_proj", "up_proj", "down_proj"], None),
        (True, True, ["q_proj", "down_proj"], [1]),
    ],
)
def test_peft_adapter_imports_and_matches(bases, tmp_path, use_dora, use_rslora, targets, layers):
    folder, hf_model = bases["llama"]
    expected = peft_adapter(
        hf_model,
        tmp_path / "peft",
        r=3,
        lora_alpha=7,
        target_modules=targets,
        layers_to_transform=layers,
        use_dora=use_dora,
        use_rslora=use_rslora,
    )
    assert_adapter_matters(expected, folder)
    import_peft(tmp_path / "peft", tmp_path / "ours", model=folder)
    config, base = read_adapter_config(tmp_path / "ours")
    assert (config.rank, config.alpha, config.use_rslora) == (3, 7, use_rslora)
    assert config.fine_tune_type == ("dora" if use_dora else "lora")
    assert config.num_layers == (None if layers is None else 1)
    assert base["model_type"] == "llama"
    model, _ = load(folder, adapter=tmp_path / "ours")  # checks the fingerprint too
    np.testing.assert_allclose(logits(model), expected, atol=ATOL, rtol=0)


# --- mlx-lm ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fine_tune_type, use_rslora, targets, num_layers",
    [("lora", True, "all-linear", None), ("dora", False, ["q_proj", "down_proj"], 1)],
)
def test_export_to_mlx_lm_loads_in_mlx_lm(
    bases, tmp_path, fine_tune_type, use_rslora, targets, num_layers
):
    import mlx_lm

    # Not qwen2: mlx-lm reads transformers 5's qwen2 config.json with another rope_theta, so
    # even its base model differs from transformers'. This llama has biases and a head_dim.
    folder, _ = bases["llama_tied_bias_head_dim"]
    config = case_config(fine_tune_type, use_rslora, targets, num_layers)
    ours = make_adapter(folder, tmp_path / "ours", config)
    expected = logits(ours)
    assert_adapter_matters(expected, folder)
    export_mlx_lm(tmp_path / "ours", tmp_path / "mlx")
    theirs, _ = mlx_lm.load(str(folder), adapter_path=str(tmp_path / "mlx"))
    np.testing.assert_allclose(logits(theirs), expected, atol=ATOL, rtol=0)
    saved = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    scales = {m.scale for m in adapter_modules(ours).values()}
    assert {saved["lora_parameters"]["scale"]} == scales  # the very same float
    assert saved["num_layers"] == (num_layers or 2)


def mlx_lm_adapter(folder, out, fine_tune_type, num_layers, lora_parameters, seed: int = 2):
    """An adapter made by mlx-lm's own tuner and saved as its trainer saves one; returns its
    logits."""
    import mlx_lm
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    model, _ = mlx_lm.load(str(folder))
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=fine_tune_type == "dora")
    mx.random.seed(seed)
    trainable = tree_flatten(model.trainable_parameters())
    randomized = [
        (
            k,
            v * mx.random.uniform(0.5, 1.5, v.shape)
            if k.endswith(".m")
            else mx.random.normal(v.shape),
        )
        for k, v in trainable
    ]
    model.update(tree_unflatten(randomized))
    out.mkdir()
    # As mlx_lm.lora does: every training argument in the config, the trainable tensors saved.
    args = {"model": str(folder), "fine_tune_type": fine_tune_type, "num_layers": num_layers}
    save_config(
        {**args, "lora_parameters": lora_parameters, "seed": 0}, out / "adapter_config.json"
    )
    mx.save_safetensors(
        str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    return logits(model.eval())  # new LoRA layers start in training mode, dropout on


@pytest.mark.parametrize(
    "fine_tune_type, num_layers, lora_parameters",
    [
        # 0.1 * 3 / 3 != 0.1 in floating point: the import must still keep the scale exactly.
        ("lora", 16, {"rank": 3, "scale": 0.1, "dropout": 0.0}),
        ("lora", 1, {"rank": 4, "scale": 20.0, "dropout": 0.05, "keys": ["self_attn.v_proj"]}),
        (
            "dora",
            -1,
            {"rank": 2, "scale": 2.7, "dropout": 0.0, "keys": ["mlp.up_proj", "self_attn.q_proj"]},
        ),
    ],
)
def test_mlx_lm_adapter_imports_and_matches(
    bases, tmp_path, fine_tune_type, num_layers, lora_parameters
):
    folder, _ = bases["llama"]
    expected = mlx_lm_adapter(folder, tmp_path / "mlx", fine_tune_type, num_layers, lora_parameters)
    assert_adapter_matters(expected, folder)
    base = load(folder)  # an already loaded base: only inspected, never wrapped
    import_mlx_lm(tmp_path / "mlx", tmp_path / "ours", model=base)
    assert not adapter_modules(base[0])
    config, _ = read_adapter_config(tmp_path / "ours")
    scale = lora_parameters["scale"]
    # Our layers and mlx-lm's multiply float32 tensors by the scale in float32; in float64 it
    # is exact when some alpha gives it (not for 0.1 at rank 3), else the nearest double.
    assert np.float32(config.scale) == np.float32(scale)
    assert config.scale == scale or abs(config.scale - scale) == math.ulp(scale)
    assert scale != 20.0 or config.scale == scale
    assert config.num_layers == (1 if num_layers == 1 else None)
    model, _ = load(folder, adapter=tmp_path / "ours")
    assert {m.scale for m in adapter_modules(model).values()} == {config.scale}
    np.testing.assert_allclose(logits(model), expected, atol=ATOL, rtol=0)


# --- GGUF LoRA ---------------------------------------------------------------------------------

# Written out independently of the code under test: llama.cpp's names for each projection.
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@pytest.mark.parametrize(
    "variant, arch, use_rslora, num_layers",
    [("llama_tied_bias_head_dim", "llama", True, None), ("qwen2", "qwen2", False, 1)],
)
def test_gguf_lora_reads_back(bases, tmp_path, variant, arch, use_rslora, num_layers):
    import gguf

    folder, _ = bases[variant]
    config = LoraConfig(
        rank=3, alpha=7, target_modules="all-linear", num_layers=num_layers, use_rslora=use_rslora
    )
    ours = make_adapter(folder, tmp_path / "ours", config)
    export_gguf_lora(tmp_path / "ours", tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(tmp_path / "adapter.gguf")

    def field(key):
        return reader.fields[key].contents()

    assert field("general.type") == "adapter"
    assert field("adapter.type") == "lora"
    assert field("general.architecture") == arch
    # llama.cpp computes alpha / rank in float32, with no rsLoRA: it must give our scale.
    alpha = np.float32(field("adapter.lora.alpha"))
    assert alpha / np.float32(3) == np.float32(ours.layers[-1].self_attn.q_proj.scale)

    args = ours.args
    tensors = {t.name: t for t in reader.tensors}
    expected_names = set()
    for path, module in adapter_modules(ours).items():
        layer, relative = int(path.split(".")[2]), path.split(".", 3)[3]
        name = f"blk.{layer}.{GGUF_NAMES[relative]}.weight"
        expected_names |= {f"{name}.lora_a", f"{name}.lora_b"}
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        out_dims, in_dims = module.lora_b.shape[0], module.lora_a.shape[1]
        # GGUF lists dimensions innermost first: ne = [in, r] and [r, out].
        assert list(a.shape) == [in_dims, 3] and list(b.shape) == [3, out_dims]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(a.data), np.array(module.lora_a))
        lora_b = np.asarray(b.data)
        heads = {"self_attn.q_proj": args.num_attention_heads}
        heads["self_attn.k_proj"] = args.num_key_value_heads
        if arch == "llama" and relative in heads:
            # Rows reordered as llama.cpp reorders the base's: undo it as our GGUF loader does.
            assert not np.array_equal(lora_b, np.array(module.lora_b))
            lora_b = np.array(_unpermute_rows(mx.array(lora_b), heads[relative]))
        np.testing.assert_array_equal(lora_b, np.array(module.lora_b))
    assert set(tensors) == expected_names


def test_gguf_export_refuses_dora(bases, tmp_path):
    folder, _ = bases["llama"]
    make_adapter(folder, tmp_path / "ours", LoraConfig(fine_tune_type="dora"))
    with pytest.raises(AdapterFormatError, match="dora adapter has no GGUF form"):
        export_gguf_lora(tmp_path / "ours", tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()


def test_alpha_keeps_the_scale():
    rng = np.random.default_rng(0)
    for scale, rank in zip(rng.uniform(0.01, 100, 3000), rng.integers(1, 513, 3000)):
        scale, rank = float(scale), int(rank)
        # Ours and mlx-lm: float64 alpha / rank, applied in float32.
        alpha = alpha_for_scale(scale, rank)
        assert abs(alpha / rank - scale) <= math.ulp(scale)
        assert np.float32(alpha / rank) == np.float32(scale)
        # llama.cpp: float32 alpha / rank, exact for power-of-two ranks, else within one ulp.
        got = float32_alpha_for_scale(scale, rank) / np.float32(rank)
        assert abs(got - np.float32(scale)) <= np.spacing(np.float32(scale))
        assert rank & (rank - 1) or got == np.float32(scale)


# --- bad input ---------------------------------------------------------------------------------


def test_peft_target_module_we_do_not_have(bases, tmp_path):
    folder, hf_model = bases["llama"]
    peft_adapter(hf_model, tmp_path / "peft", r=2, lora_alpha=4, target_modules=["q_proj"])
    config_path = tmp_path / "peft" / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["target_modules"] = ["q_proj", "c_attn"]  # GPT-2's fused attention projection
    config_path.write_text(json.dumps(data))
    with pytest.raises(AdapterFormatError) as e:
        import_peft(tmp_path / "peft", tmp_path / "ours", model=folder)
    message = str(e.value)
    assert str(tmp_path / "peft") in message and "c_attn" in message
    assert "match no linear layer" in message and "q_proj" in message
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("other", ["qwen3", "hidden_96"])
def test_peft_adapter_for_another_base(bases, tmp_path, other):
    import transformers

    if other == "qwen3":
        hf_model, made_for = bases["qwen3"][1], "Qwen3ForCausalLM"
    else:
        config = transformers.LlamaConfig(**{**COMMON, "hidden_size": 96})
        hf_model, made_for = transformers.LlamaForCausalLM(config).eval(), "LlamaForCausalLM"
    peft_adapter(
        hf_model, tmp_path / "peft", r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"]
    )
    with pytest.raises(AdapterFormatError) as e:
        import_peft(tmp_path / "peft", tmp_path / "ours", model=bases["llama"][0])
    message = str(e.value)
    assert "does not fit this llama base model" in message and made_for in message
    assert "misshapen" in message and "model.layers.0.self_attn.q_proj.lora_" in message
    assert not (tmp_path / "ours").exists()


def test_mlx_lm_adapter_for_another_base(bases, tmp_path):
    params = {"rank": 2, "scale": 1.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    mlx_lm_adapter(bases["qwen3"][0], tmp_path / "mlx", "lora", 2, params)
    with pytest.raises(AdapterFormatError, match="does not fit this llama base model"):
        import_mlx_lm(tmp_path / "mlx", tmp_path / "ours", model=bases["llama"][0])


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"bias": "all"}, "bias='all'"),
        ({"peft_type": "LOHA"}, "only 'LORA'"),
        ({"layers_to_transform": [0]}, "covers decoder layers [0] of 2"),
        ({"r": 0}, "rank must be a positive integer"),
    ],
)
def test_peft_settings_we_cannot_express(bases, tmp_path, edit, message):
    folder, hf_model = bases["llama"]
    peft_adapter(hf_model, tmp_path / "peft", r=2, lora_alpha=4, target_modules=["q_proj"])
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edit}))
    with pytest.raises(AdapterFormatError, match=message.replace("[", r"\[")):
        import_peft(tmp_path / "peft", tmp_path / "ours", model=folder)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"lora_parameters": {"rank": 2, "alpha": 4.0, "dropout": 0.0}}, "'scale' is missing"),
        ({"fine_tune_type": "full"}, "fine_tune_type 'full'"),
        ({"lora_parameters": {"rank": 2, "scale": -1.0}}, "scale must be a positive number"),
    ],
)
def test_mlx_lm_settings_we_cannot_express(bases, tmp_path, edit, message):
    folder, _ = bases["llama"]
    params = {"rank": 2, "scale": 1.0, "dropout": 0.0}
    mlx_lm_adapter(folder, tmp_path / "mlx", "lora", 2, params)
    config_path = tmp_path / "mlx" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edit}))
    with pytest.raises(AdapterFormatError, match=message):
        import_mlx_lm(tmp_path / "mlx", tmp_path / "ours", model=folder)


@pytest.mark.parametrize("fmt", ["peft", "mlx-lm"])
def test_malformed_adapter_config_names_file_line_and_column(bases, tmp_path, fmt):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{\n  "r": 8,\n  "lora_alpha": ,\n}\n')
    with pytest.raises(AdapterFormatError) as e:
        import_adapter(fmt, folder, tmp_path / "ours", model=bases["llama"][0])
    message = str(e.value)
    assert str(folder / "adapter_config.json") in message and "line 3, column 17" in message


@pytest.mark.parametrize("fmt", ["peft", "mlx-lm"])
def test_conversion_never_overwrites_its_source(bases, tmp_path, fmt):
    folder, _ = bases["llama"]
    make_adapter(folder, tmp_path / "ours", LoraConfig())
    before = {p.name: p.read_bytes() for p in (tmp_path / "ours").iterdir()}
    with pytest.raises(AdapterFormatError, match="would be overwritten"):
        export_adapter(fmt, tmp_path / "ours", tmp_path / "ours")
    with pytest.raises(AdapterFormatError, match="would be overwritten"):
        import_adapter(fmt, tmp_path / "ours", tmp_path / "ours" / ".", model=folder)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ours").iterdir()} == before


def test_unknown_format_lists_the_known_ones(tmp_path):
    with pytest.raises(AdapterFormatError, match="known formats: peft, mlx-lm, gguf-lora"):
        export_adapter("onnx", tmp_path, tmp_path / "out")
    with pytest.raises(AdapterFormatError, match="known formats: peft, mlx-lm, gguf-lora"):
        import_adapter("onnx", tmp_path, tmp_path / "out", model="unused")
    result = CliRunner().invoke(main, ["export", "onnx", "--adapter", "a", "--out", "b"])
    assert result.exit_code == 2
    assert "unknown export format 'onnx'; known formats: " in result.output
    assert all(name in result.output for name in ("peft", "mlx-lm", "gguf-lora", "coreml"))
    args = ["--format", "onnx", "--path", "a", "--model", "m", "--out", "b"]
    result = CliRunner().invoke(import_adapter_command, args)
    assert result.exit_code == 2 and "'peft', 'mlx-lm', 'gguf-lora'" in result.output


# --- the command line --------------------------------------------------------------------------


def test_cli_export_and_import_round_trip(bases, tmp_path):
    folder, _ = bases["llama"]
    config = LoraConfig(rank=4, alpha=16, target_modules=["q_proj", "o_proj"], num_layers=1)
    expected = logits(make_adapter(folder, tmp_path / "ours", config))
    runner = CliRunner()
    for fmt, out in [("peft", "peft"), ("mlx-lm", "mlx"), ("gguf-lora", "a.gguf")]:
        args = [fmt, "--adapter", str(tmp_path / "ours"), "--out", str(tmp_path / out)]
        result = runner.invoke(export_group, args)
        assert result.exit_code == 0, result.output
        assert str(tmp_path / out) in result.output
    for fmt, path in [("peft", "peft"), ("mlx-lm", "mlx"), ("gguf-lora", "a.gguf")]:
        back = tmp_path / f"back-{fmt}"
        args = ["--format", fmt, "--path", str(tmp_path / path), "--model", str(folder)]
        result = runner.invoke(import_adapter_command, [*args, "--out", str(back)])
        assert result.exit_code == 0, result.output
        model, _ = load(folder, adapter=back)
        np.testing.assert_allclose(logits(model), expected, atol=1e-6, rtol=0)
        imported = read_adapter_config(back)[0]
        assert (imported.rank, imported.scale, imported.num_layers) == (4, 4.0, 1)
    # A user error is one line on stderr with exit code 1, not a traceback.
    result = runner.invoke(
        export_group, ["peft", "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and "not an adapter folder" in result.output
    assert ADAPTER_CONFIG_FILE in result.output
