"""`load(..., adapter=)` and `ondevice-lora generate --adapter`: the adapter changes the output,
and an adapter for another base is refused."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from ondevice_lora import SamplingConfig, generate, load
from ondevice_lora.adapters.files import LoraConfig, adapter_tensors, apply_adapters, save_adapter
from ondevice_lora.adapters.fingerprint import base_fingerprint
from ondevice_lora.cli import main
from ondevice_lora.errors import OndeviceLoraError
from tests.hf_fixtures import write_hf_model


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    write_hf_model(root / "base", "qwen3_untied")
    model, tokenizer = load(root / "base")
    apply_adapters(model, LoraConfig(rank=4, alpha=32, target_modules="all-linear"))
    # A trained adapter has non-zero B; random values stand in for training here.
    rng = np.random.default_rng(0)
    for name, value in adapter_tensors(model).items():
        if name.endswith("lora_b"):
            new = mx.array(rng.normal(0, 0.2, value.shape).astype(np.float32))
            model.load_weights([(name, new)], strict=False)
    save_adapter(
        root / "adapter",
        model,
        LoraConfig(rank=4, alpha=32, target_modules="all-linear"),
        base_fingerprint(model, tokenizer),
    )
    return root / "base", root / "adapter", model


def test_loading_with_an_adapter_gives_the_adapted_logits(base_and_adapter):
    base, adapter, adapted = base_and_adapter
    tokens = mx.array([[5, 17, 42, 7]])
    loaded, _ = load(base, adapter=adapter)
    plain, _ = load(base)
    np.testing.assert_allclose(np.array(loaded(tokens)), np.array(adapted(tokens)), atol=1e-5)
    assert np.abs(np.array(loaded(tokens)) - np.array(plain(tokens))).max() > 1e-2


def test_cli_generate_with_adapter_matches_the_api(base_and_adapter):
    base, adapter, _ = base_and_adapter
    args = ["generate", "--model", str(base), "--adapter", str(adapter), "--prompt", "hi"]
    result = CliRunner().invoke(main, [*args, "--greedy", "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    model, tokenizer = load(base, adapter=adapter)
    expected = generate(model, tokenizer, "hi", SamplingConfig(max_tokens=8))
    plain_model, _ = load(base)
    plain = generate(plain_model, tokenizer, "hi", SamplingConfig(max_tokens=8))
    assert result.stdout.rstrip("\n") == expected
    assert expected != plain


def test_adapter_for_another_base_is_refused(base_and_adapter, tmp_path):
    _, adapter, _ = base_and_adapter
    write_hf_model(tmp_path / "other", "llama")
    with pytest.raises(OndeviceLoraError, match="trained on another base") as info:
        load(tmp_path / "other", adapter=adapter)
    assert str(adapter) in str(info.value)
    result = CliRunner().invoke(
        main,
        [
            "generate",
            "--model",
            str(tmp_path / "other"),
            "--adapter",
            str(adapter),
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
        ],
    )
    assert result.exit_code == 1
    assert "trained on another base" in result.stderr
