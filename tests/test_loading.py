"""Loading Hugging Face folders: logits match transformers, and bad input gets a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from ondevice_lora.errors import ModelLoadError, TokenizerError
from ondevice_lora.loading import load, load_model
from ondevice_lora.loading.weights import INDEX_FILE
from tests.hf_fixtures import VARIANTS, write_hf_model

# fp32 on both sides; differences come only from summation order.
LOGITS_TOLERANCE = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[1]

# Three rows of 9 positions: full, right-padded (last 3 are padding), left-padded (first 4).
IDS = [
    [5, 71, 300, 12, 9, 401, 77, 250, 3],
    [42, 8, 199, 310, 66, 120, 0, 0, 0],
    [0, 0, 0, 0, 17, 90, 260, 33, 501],
]
MASK = [[1] * 9, [1] * 6 + [0] * 3, [0] * 4 + [1] * 5]


def our_logits(model, ids=IDS, mask=MASK) -> np.ndarray:
    return np.array(model(mx.array(ids), attention_mask=mx.array(mask)))


def assert_close_at_real_tokens(ours: np.ndarray, reference: np.ndarray, mask=MASK) -> None:
    real = np.array(mask, dtype=bool)  # (B, L): compare only where there is a token
    diff = np.abs(ours[real] - reference[real]).max()
    assert diff <= LOGITS_TOLERANCE, f"max abs logit difference {diff}"


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama") / "model"
    write_hf_model(folder, "llama")
    return folder


def copy_folder(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "copy"))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers_with_padding(tmp_path, variant):
    reference = write_hf_model(tmp_path, variant)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)
        ).logits.numpy()
    model, config = load_model(tmp_path)
    assert config["model_type"] == reference.config.model_type
    assert_close_at_real_tokens(our_logits(model), expected)


def test_sharded_weights_load_the_same(tmp_path):
    reference = write_hf_model(tmp_path / "single", "qwen2_untied")
    # The embedding alone is 128 KB of float32: 50 KB shards split the model into several files.
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / INDEX_FILE).exists()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()

    single, _ = load_model(tmp_path / "single")
    sharded, _ = load_model(tmp_path / "sharded")
    np.testing.assert_array_equal(our_logits(sharded), our_logits(single))


def fill_hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """Lay out `files` the way huggingface_hub caches a download of `repo_id` at main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)


def run_offline(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run Python code with the Hub cache in tmp_path and every network path shut."""
    env = dict(os.environ)
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    env.pop("HF_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_hub_id_loads_from_the_cache_offline(tmp_path, llama_folder):
    fill_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", llama_folder)
    code = (
        "import json, mlx.core as mx\n"
        "from ondevice_lora.loading import load\n"
        "model, tokenizer = load('tiny-org/tiny-llama')\n"
        f"logits = model(mx.array({IDS}), attention_mask=mx.array({MASK}))\n"
        "print(json.dumps({'logits': logits.tolist(), 'eos': tokenizer.eos_token_ids}))\n"
    )
    result = run_offline(code, tmp_path)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    model, _ = load_model(llama_folder)
    assert_close_at_real_tokens(np.array(got["logits"], dtype=np.float32), our_logits(model))
    assert got["eos"] == [2]


def test_hub_id_missing_from_the_cache_offline(tmp_path):
    (tmp_path / "hub").mkdir()
    code = (
        "from ondevice_lora.loading import load\n"
        "from ondevice_lora.errors import ModelLoadError\n"
        "try:\n"
        "    load('tiny-org/not-downloaded')\n"
        "except ModelLoadError as e:\n"
        "    print('ModelLoadError:', e)\n"
    )
    result = run_offline(code, tmp_path)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert message.startswith("ModelLoadError: tiny-org/not-downloaded")
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message


# Bad input: each error names the file or folder and says what is wrong.


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unknown_model_type(tmp_path, llama_folder):
    folder = copy_folder(llama_folder, tmp_path)
    edit_config(folder, model_type="gpt_nine")
    with pytest.raises(ModelLoadError) as error:
        load_model(folder)
    message = str(error.value)
    assert str(folder / "config.json") in message
    assert "'gpt_nine' is not supported" in message
    assert "gemma3_text, llama, mistral, phi3, qwen2, qwen3, smollm3" in message


def test_missing_unexpected_and_misshapen_weights_in_one_error(tmp_path, llama_folder):
    folder = copy_folder(llama_folder, tmp_path)
    weights = mx.load(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.extra.weight"] = mx.zeros((4, 4))
    weights["model.norm.weight"] = mx.zeros((32,))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(ModelLoadError) as error:
        load_model(folder)
    message = str(error.value)
    assert str(folder) in message
    assert "missing 1: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected 1: model.layers.0.self_attn.extra.weight" in message
    assert "misshapen 1: model.norm.weight (32,) (expected (64,))" in message


def test_truncated_safetensors(tmp_path, llama_folder):
    folder = copy_folder(llama_folder, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as error:
        load_model(folder)
    message = str(error.value)
    assert str(path) in message and "truncated" in message


def test_config_that_is_not_json(tmp_path, llama_folder):
    folder = copy_folder(llama_folder, tmp_path)
    (folder / "config.json").write_text('{\n  "model_type": "llama",\n  hidden_size: 64\n}\n')
    with pytest.raises(ModelLoadError) as error:
        load_model(folder)
    message = str(error.value)
    assert str(folder / "config.json") in message
    assert "not valid JSON at line 3, column 3" in message


def test_folder_without_tokenizer(tmp_path, llama_folder):
    folder = copy_folder(llama_folder, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    with pytest.raises(TokenizerError) as error:
        load(folder)
    message = str(error.value)
    assert str(folder) in message and "no tokenizer.json" in message


def test_folder_without_config(tmp_path, llama_folder):
    folder = copy_folder(llama_folder, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError) as error:
        load_model(folder)
    message = str(error.value)
    assert str(folder) in message and "no config.json" in message


def test_folder_without_weights(tmp_path, llama_folder):
    folder = copy_folder(llama_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as error:
        load_model(folder)
    message = str(error.value)
    assert str(folder) in message and "no weights found" in message


def test_index_naming_a_missing_shard(tmp_path):
    reference = write_hf_model(tmp_path / "single", "llama")
    folder = tmp_path / "sharded"
    reference.save_pretrained(folder, max_shard_size="50KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(ModelLoadError) as error:
        load_model(folder)
    message = str(error.value)
    assert str(folder / INDEX_FILE) in message
    assert shards[1].name in message and "not in the folder" in message


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load(tmp_path / "nowhere")
