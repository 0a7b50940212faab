"""Training: a tiny 4-bit model learns a person's facts; the base stays bit-identical; config.

One training run (module fixture) on a fictional person's facts feeds several tests: the
validation loss falls, greedy generation answers with the trained answers, the frozen base
(4-bit codes, scales and biases included) is untouched, and metrics and the plot are written.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from ondevice_lora.adapters.files import (
    adapter_tensors,
    base_fingerprint,
    base_parameters,
    load_adapter,
)
from ondevice_lora.data import DataConfig, load_datasets
from ondevice_lora.generation.generate import SamplingConfig, generate
from ondevice_lora.loading import load
from ondevice_lora.training import (
    ConfigError,
    EvalConfig,
    TrainConfig,
    TrainingCallback,
    evaluate_from_config,
    train,
)
from ondevice_lora.training.cli import config_from_flags, eval_command, train_command
from ondevice_lora.training.metrics import read_metrics
from tests.hf_fixtures import write_hf_model

# A fictional person. Short answers: a 64-wide random model memorises them in 80 steps.
FACTS = [
    ("What is the name of Mira's dog?", "Biscuit."),
    ("What is the name of Mira's cat?", "Pepper."),
    ("Where does Mira live?", "Lisbon."),
]
# The validation loss after training must be at most this fraction of the untrained one.
VALID_LOSS_MARGIN = 0.3
# Settings found to memorise FACTS on the tiny model (lr 1e-2 overshoots, 1e-3 is slow).
FAST = dict(
    rank=16,
    alpha=32.0,
    target_modules="all-linear",
    learning_rate=3e-3,
    warmup_steps=5,
    batch_size=4,
)


def write_facts(folder, repeats: int = 4):
    """A split folder: train.jsonl (each fact `repeats` times) and valid.jsonl (each once)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", repeats), ("valid.jsonl", 1)):
        with open(folder / name, "w") as f:
            for question, answer in FACTS * n:
                messages = [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
    return folder


def quantized_base(model_folder):
    """The tiny model with every Linear and the embedding in 4 bits."""
    model, tokenizer = load(model_folder)
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model, tokenizer


def snapshot(params: dict) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in params.items()}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "llama"
    write_hf_model(folder, "llama")
    return folder


@pytest.fixture(scope="module")
def facts_folder(tmp_path_factory):
    return write_facts(tmp_path_factory.mktemp("data") / "facts")


@pytest.fixture(scope="module")
def trained(model_folder, facts_folder, tmp_path_factory):
    """One run: 4-bit base, 80 steps on FACTS, validation every 40."""
    model, tokenizer = quantized_base(model_folder)
    base_before = snapshot(base_parameters(model))
    splits = load_datasets(DataConfig(facts_folder), tokenizer)
    out = tmp_path_factory.mktemp("run") / "adapter"
    config = TrainConfig(adapter_path=str(out), iters=80, eval_every=40, save_every=40, **FAST)
    steps = []

    class Recorder(TrainingCallback):
        def on_step_end(self, record):
            steps.append(record)

    result = train(
        model, tokenizer, splits.train, splits.valid, config, [Recorder()], show_progress=False
    )
    return dict(
        model=model,
        tokenizer=tokenizer,
        result=result,
        base_before=base_before,
        steps=steps,
        out=out,
        config=config,
    )


def test_validation_loss_falls_by_the_stated_margin(trained):
    result = trained["result"]
    (first_step, first), *_, (last_step, last) = result.val_losses
    assert (first_step, last_step) == (0, 80)
    assert last <= VALID_LOSS_MARGIN * first, result.val_losses
    assert result.best_val_loss == min(v for _, v in result.val_losses)
    assert len(result.losses) == result.steps == 80


def test_greedy_generation_answers_with_the_trained_facts(trained):
    model, tokenizer = trained["model"], trained["tokenizer"]
    greedy = SamplingConfig(temperature=0.0, max_tokens=8)
    for question, answer in FACTS:
        assert generate(model, tokenizer, question, greedy).strip() == answer


def test_base_weights_are_bit_identical_and_only_adapters_changed(trained):
    model, before = trained["model"], trained["base_before"]
    after = base_parameters(model)
    assert set(after) == set(before)
    # The 4-bit base: packed codes, scales and biases all present and untouched.
    assert any(k.endswith(".scales") for k in after) and any(k.endswith(".biases") for k in after)
    assert after["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    for name, value in after.items():
        assert np.array_equal(np.array(value), before[name]), name
    trainable = dict(tree_flatten(model.trainable_parameters()))
    adapters = adapter_tensors(model)
    assert set(trainable) == set(adapters)
    assert all(name.endswith((".lora_a", ".lora_b")) for name in adapters)
    # B starts at zero; training moved every one of them.
    assert all(mx.abs(v).max().item() > 0 for k, v in adapters.items() if k.endswith("lora_b"))


def test_saved_adapter_reloads_onto_a_fresh_base(trained, model_folder):
    model, tokenizer, out = trained["model"], trained["tokenizer"], trained["out"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank"] == 16 and config["base"]["quantization"]["linear"]["bits"] == 4
    fresh, fresh_tokenizer = quantized_base(model_folder)
    load_adapter(fresh, out, base_fingerprint(fresh, fresh_tokenizer))
    fresh.eval()
    ids = mx.array([tokenizer.encode("Where does Mira live?")])
    assert mx.array_equal(fresh(ids), model(ids)).item()


def test_metrics_jsonl_and_loss_plot_are_written(trained):
    out, result = trained["out"], trained["result"]
    records = read_metrics(out / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 81))
    assert [r["loss"] for r in train_records] == result.losses
    assert train_records == trained["steps"]  # the callback saw the same records
    for r in train_records:
        assert r["tokens"] > 0 and r["tokens_per_second"] > 0 and r["learning_rate"] > 0
        assert r["peak_memory_gb"] >= 0
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert valid == [(s, v) for s, v in result.val_losses]
    assert all(math.isclose(r["val_perplexity"], math.exp(r["val_loss"])) for r in records if "val_loss" in r)  # fmt: skip
    assert result.plot_path == out / "loss.png"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Warmup: the rate rises for 5 steps, then decays along the cosine.
    rates = [r["learning_rate"] for r in train_records]
    assert rates[:5] == sorted(rates[:5]) and math.isclose(rates[4], 3e-3, rel_tol=1e-6)
    assert rates[5:] == sorted(rates[5:], reverse=True)


def short_run(model_folder, facts_folder, out, **overrides):
    model, tokenizer = load(model_folder)
    splits = load_datasets(DataConfig(facts_folder), tokenizer)
    settings = {**FAST, "iters": 3, "eval_every": 0, "save_every": 0, **overrides}
    config = TrainConfig(adapter_path=str(out), **settings)
    result = train(model, tokenizer, splits.train, None, config, show_progress=False)
    return result, adapter_tensors(model)


def test_gradient_checkpointing_and_accumulation_give_the_same_training(
    model_folder, facts_folder, tmp_path
):
    plain, plain_weights = short_run(model_folder, facts_folder, tmp_path / "a")
    checkpointed, ckpt_weights = short_run(
        model_folder, facts_folder, tmp_path / "b", grad_checkpoint=True
    )
    assert np.allclose(plain.losses, checkpointed.losses, atol=1e-6)
    for name, value in plain_weights.items():
        assert mx.allclose(value, ckpt_weights[name], atol=1e-6).item(), name
    # Two micro-batches of 2 are one batch of 4: the step's loss is the mean over all the
    # trained tokens, however they are split. (The same examples: one epoch fits one step;
    # bucketed, so that batch_size counts examples, not packed rows.)
    bucketed = dict(iters=1, batching="bucketed")
    one, _ = short_run(model_folder, facts_folder, tmp_path / "c", batch_size=12, **bucketed)
    two, _ = short_run(
        model_folder, facts_folder, tmp_path / "d", batch_size=6, grad_accumulation=2, **bucketed
    )
    assert math.isclose(one.losses[0], two.losses[0], rel_tol=1e-5)
    assert one.trained_tokens == two.trained_tokens


def test_early_stopping_keeps_the_best_adapter(model_folder, facts_folder, tmp_path):
    model, tokenizer = load(model_folder)
    splits = load_datasets(DataConfig(facts_folder), tokenizer)
    out = tmp_path / "adapter"
    seen = {}

    class Snapshots(TrainingCallback):
        def on_eval_end(self, record):
            seen[record["step"]] = {k: mx.array(v) for k, v in adapter_tensors(model).items()}

    # A rate this high makes the validation loss bounce, so it stops improving early.
    settings = {**FAST, "learning_rate": 1.0, "warmup_steps": 0}
    config = TrainConfig(
        adapter_path=str(out), iters=40, eval_every=2, early_stopping_patience=2, **settings
    )
    result = train(
        model, tokenizer, splits.train, splits.valid, config, [Snapshots()], show_progress=False
    )
    steps = [s for s, _ in result.val_losses]
    assert result.stopped_early and result.steps == steps[-1] < 40
    # Stopped after exactly `patience` evaluations no better than the best.
    best = steps.index(result.best_step)
    assert len(steps) - 1 - best == 2
    assert all(v >= result.best_val_loss for _, v in result.val_losses[best:])
    assert result.best_val_loss == min(v for _, v in result.val_losses)

    def same(saved, expected):
        return set(saved) == set(expected) and all(
            mx.array_equal(saved[k], expected[k]).item() for k in saved
        )

    # The adapter folder holds the best adapter, last/ the one of the final step; the model
    # that train() returns holds the best.
    assert same(mx.load(str(out / "adapters.safetensors")), seen[result.best_step])
    assert same(mx.load(str(out / "last/adapters.safetensors")), seen[result.steps])
    assert same(adapter_tensors(model), seen[result.best_step])


def test_eval_reports_loss_and_perplexity_with_and_without_the_adapter(
    model_folder, facts_folder, tmp_path
):
    result, _ = short_run(model_folder, facts_folder, tmp_path / "adapter", iters=10)
    test_file = facts_folder / "valid.jsonl"
    measured = evaluate_from_config(
        EvalConfig(
            model=str(model_folder), adapter_path=str(tmp_path / "adapter"), data=str(test_file)
        )
    )
    assert measured.examples == len(FACTS) and measured.tokens > 0
    assert measured.adapter_loss < measured.base_loss
    assert math.isclose(measured.adapter_perplexity, math.exp(measured.adapter_loss))
    cli = CliRunner().invoke(
        eval_command,
        [
            "--model",
            str(model_folder),
            "--adapter",
            str(tmp_path / "adapter"),
            "--data",
            str(test_file),
        ],
    )
    assert cli.exit_code == 0, cli.output
    assert f"loss {measured.base_loss:.4f}" in cli.output
    assert f"loss {measured.adapter_loss:.4f}" in cli.output
    # A folder with train.jsonl but no test set is refused with what to do.
    cli = CliRunner().invoke(
        eval_command, ["--model", str(model_folder), "--data", str(facts_folder)]
    )
    assert cli.exit_code == 1 and "no test.jsonl" in cli.output


# --- configuration ------------------------------------------------------------------------------


def test_yaml_and_flags_fill_the_same_dataclass(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "model: my-model\ndata: notes/\nrank: 4\nlearning_rate: 1e-4\n"
        "target_modules: [q_proj, k_proj]\niters: 200\ngrad_checkpoint: true\n"
    )
    flags = {"rank": 16, "batch_size": 2, "target_modules": "q_proj,o_proj", "seed": None}
    config = config_from_flags(str(path), flags)
    expected = TrainConfig(
        model="my-model",
        data="notes/",
        rank=16,  # the flag wins over the file
        learning_rate=1e-4,  # YAML reads "1e-4" as a string; it is taken as the number
        target_modules=["q_proj", "o_proj"],
        iters=200,
        grad_checkpoint=True,
        batch_size=2,
    )
    assert config == expected
    assert config.lora_config().rank == 16 and config.data_config().path == "notes/"
    # Flags alone fill it the same way, "all-linear" kept whole.
    alone = config_from_flags(None, {"data": "d.jsonl", "target_modules": "all-linear"})
    assert alone == TrainConfig(data="d.jsonl", target_modules="all-linear")


def test_epochs_count_optimizer_steps():
    # 2 epochs of 6 batches, 2 batches per step: 6 steps; the default without either: 1000.
    assert TrainConfig(epochs=2, grad_accumulation=2).total_steps(6) == 6
    assert TrainConfig(epochs=1, grad_accumulation=4).total_steps(6) == 2  # rounded up
    assert TrainConfig(iters=7).total_steps(6) == 7
    assert TrainConfig().total_steps(6) == 1000


def test_every_train_config_field_has_a_flag():
    flags = {p.name for p in train_command.params}
    assert {f for f in TrainConfig.__dataclass_fields__} <= flags
    assert "config_file" in flags


def test_bad_values_give_one_error_listing_every_problem(tmp_path):
    config = TrainConfig(
        data="d.jsonl",
        rank=0,
        dropout=1.5,
        loss_on="everything",
        optimizer="adamx",
        learning_rate=-1.0,
        batch_size=0,
        iters=10,
        epochs=2,
        eval_batches=0,
    )
    with pytest.raises(ConfigError) as info:
        config.validate()
    message = str(info.value)
    for key in ("rank", "dropout", "loss_on", "optimizer", "learning_rate", "batch_size"):
        assert f"{key} must be" in message, key
    assert "iters or epochs, not both" in message and "eval_batches" in message
    assert "adam has none" in str(pytest.raises(ConfigError, TrainConfig(optimizer="adam", weight_decay=0.1).validate, require_data=False).value)  # fmt: skip


def test_config_file_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: x.jsonl\nlearning_rat: 0.001\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'learning_rat'.*learning_rate"):
        config_from_flags(str(path), {})
    path.write_text("data: x.jsonl\nrank: -2\nbatch_size: many\n")
    with pytest.raises(ConfigError) as info:
        config_from_flags(str(path), {"learning_rate": 0.0})
    message = str(info.value)
    assert f"{path}: rank must be" in message
    assert f"{path}: batch_size must be" in message
    assert "--learning-rate: learning_rate must be > 0" in message
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"run\.yaml, line \d+: not valid YAML"):
        config_from_flags(str(path), {})
    with pytest.raises(ConfigError, match="data is required"):
        config_from_flags(None, {})
