"""DPO and ORPO held to TRL: the same pairs, weights and beta give TRL's loss and PEFT's gradients.

TRL's own trainers compute the reference: DPOTrainer over a PEFT model turns the adapter off
for a new adapter (our reference_adapter=None) and keeps a frozen "ref" copy of a pretrained
one (our --reference-adapter); ORPOTrainer has no reference. Gradients come from torch
autograd through TRL's loss into PEFT's LoRA tensors of the same values as ours.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
peft = pytest.importorskip("peft")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from ondevice_lora.adapters.files import LoraConfig, adapter_tensors, apply_adapters  # noqa: E402
from ondevice_lora.adapters.layers import adapter_modules  # noqa: E402
from ondevice_lora.data.preference import PairEncoder  # noqa: E402
from ondevice_lora.loading import load  # noqa: E402
from ondevice_lora.training.preference import (  # noqa: E402
    PairBatchIterator,
    PreferenceLoss,
    pair_loss,
    positions_of,
)
from tests.hf_fixtures import write_hf_model  # noqa: E402

LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
RANK, ALPHA = 4, 8.0
PAIRS = [
    {
        "prompt": "What is the capital of France?",
        "chosen": " Paris.",
        "rejected": " The capital of France is a city, and it is Paris.",
    },  # fmt: skip
    {"prompt": "Name a fruit.", "chosen": " An apple.", "rejected": " Carrots and potatoes."},
    {"prompt": "Say hello.", "chosen": " Hello there!", "rejected": " No."},
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pref") / "llama"
    hf_model = write_hf_model(folder, "llama")
    model, tokenizer = load(folder)
    encoder = PairEncoder(tokenizer, max_length=64)
    examples = [encoder.pair(p)[0] for p in PAIRS]
    batch = next(PairBatchIterator(examples, len(examples), 64, shuffle=False))
    return folder, hf_model, model, tokenizer, batch


def random_adapter(model, seed: int, dora: bool = False) -> dict:
    """Random nonzero adapter tensors for `model`'s adapter layers (applied if not yet)."""
    if not adapter_modules(model):
        config = LoraConfig(
            rank=RANK, alpha=ALPHA, target_modules="all-linear",
            fine_tune_type="dora" if dora else "lora",
        )  # fmt: skip
        apply_adapters(model, config)
    mx.random.seed(seed)
    tensors = {}
    for name, value in adapter_tensors(model).items():
        if name.endswith("magnitude"):
            tensors[name] = value * mx.random.uniform(0.8, 1.2, value.shape)
        else:
            tensors[name] = mx.random.normal(value.shape) * 0.1
    return tensors


def set_ours(model, tensors: dict) -> None:
    model.load_weights(list(tensors.items()), strict=False)
    mx.eval(model.parameters())


def set_peft(peft_model, tensors: dict, adapter: str = "default") -> None:
    """Copy our tensors (saved names) into PEFT's adapter `adapter` of the same layers."""
    params = dict(peft_model.named_parameters())
    names = {"lora_a": "lora_A", "lora_b": "lora_B", "magnitude": "lora_magnitude_vector"}
    with torch.no_grad():
        for name, value in tensors.items():
            path, kind = name.rsplit(".", 1)
            key = f"base_model.model.{path}.{names[kind]}.{adapter}.weight"
            params[key].copy_(torch.from_numpy(np.array(value)))


def peft_grads(peft_model) -> dict:
    names = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "magnitude"}
    grads = {}
    for key, p in peft_model.named_parameters():
        if ".default." in key and p.grad is not None:
            path, kind = key.removeprefix("base_model.model.").split(".default.")[0].rsplit(".", 1)
            grads[f"{path}.{names[kind]}"] = p.grad.numpy()
    return grads


def our_loss_and_grads(model, batch, settings):
    def loss_fn(model):
        return pair_loss(model, batch, settings, positions_of(batch, settings))

    (loss, stats), grads = nn.value_and_grad(model, loss_fn)(model)
    # Saved names ("model.layers.0.self_attn.q_proj.lora_a") of every gradient.
    return loss.item(), stats, {k: np.array(v) for k, v in tree_flatten(grads)}


def torch_inputs(batch, rows: slice | None = None):
    """TRL's layout from our interleaved PairBatch: all chosen rows, then all rejected."""
    ids = np.concatenate([np.array(batch.inputs[:, :1]), np.array(batch.targets)], axis=1)
    real = np.concatenate([np.ones_like(ids[:, :1]), np.array(batch.token_mask)], axis=1)
    scored = np.concatenate([np.zeros_like(ids[:, :1]), np.array(batch.loss_mask)], axis=1)
    order = np.concatenate([np.arange(0, len(ids), 2), np.arange(1, len(ids), 2)])
    as_long = lambda a: torch.from_numpy(a[order].astype(np.int64))  # noqa: E731
    return as_long(ids), as_long(real), as_long(scored)


def dpo_trainer(tmp_path, model, tokenizer_folder, beta, peft_config=None):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path), beta=beta, report_to=[], use_cpu=True,
        per_device_train_batch_size=len(PAIRS),
    )  # fmt: skip
    return DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
        processing_class=AutoTokenizer.from_pretrained(tokenizer_folder), peft_config=peft_config,
    )  # fmt: skip


def assert_grads_match(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and len(ours) == 7 * 2 * 2  # 2 layers, A and B
    for name, grad in ours.items():
        np.testing.assert_allclose(grad, theirs[name], atol=GRAD_TOLERANCE, rtol=0, err_msg=name)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_against_the_base_equals_trl(setup, tmp_path, beta):
    """A new adapter's reference is the base: TRL disables the adapter, so do we."""
    import copy

    folder, hf_model, model, _, batch = setup
    model = copy.deepcopy(model)
    tensors = random_adapter(model, seed=1)
    set_ours(model, tensors)
    loss, stats, grads = our_loss_and_grads(model, batch, PreferenceLoss("dpo", beta))

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    trainer = dpo_trainer(tmp_path, copy.deepcopy(hf_model), folder, beta, peft_config=config)
    set_peft(trainer.model, tensors)
    ids, real, scored = torch_inputs(batch)
    inputs = {"input_ids": ids, "attention_mask": real, "completion_mask": scored}
    trainer.model.train()
    expected = trainer.compute_loss(trainer.model, inputs)
    expected.backward()
    assert loss == pytest.approx(expected.item(), abs=LOSS_TOLERANCE)
    assert expected.item() != pytest.approx(np.log(2), abs=1e-3)  # the adapter moved the policy
    assert_grads_match(grads, peft_grads(trainer.model))
    assert 0 < float(stats["pairs"]) == len(PAIRS)


def test_dpo_against_a_reference_adapter_equals_trl(setup, tmp_path):
    """A pretrained adapter's reference is its frozen copy (TRL's "ref" adapter), while the
    trained one has moved on: ours swaps in the reference tensors for the reference pass."""
    import copy

    folder, hf_model, model, _, batch = setup
    model = copy.deepcopy(model)
    reference = random_adapter(model, seed=2)
    trained = random_adapter(model, seed=3)
    set_ours(model, trained)
    loss, _, grads = our_loss_and_grads(
        model, batch, PreferenceLoss("dpo", 0.1, reference=reference)
    )

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    wrapped = peft.get_peft_model(copy.deepcopy(hf_model), config)
    set_peft(wrapped, reference)  # the pretrained adapter: TRL copies it to "ref"
    trainer = dpo_trainer(tmp_path, wrapped, folder, 0.1)
    set_peft(trainer.model, trained)  # the policy has trained since
    ids, real, scored = torch_inputs(batch)
    inputs = {"input_ids": ids, "attention_mask": real, "completion_mask": scored}
    trainer.model.train()
    expected = trainer.compute_loss(trainer.model, inputs)
    expected.backward()
    assert loss == pytest.approx(expected.item(), abs=LOSS_TOLERANCE)
    assert_grads_match(grads, peft_grads(trainer.model))


@pytest.mark.parametrize("orpo_lambda", [0.1, 1.0])
def test_orpo_equals_trl(setup, orpo_lambda):
    """TRL's ORPOTrainer.get_batch_loss_metrics on a PEFT model with our adapter's values."""
    import copy
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    folder, hf_model, model, _, batch = setup
    model = copy.deepcopy(model)
    tensors = random_adapter(model, seed=4)
    set_ours(model, tensors)
    loss, stats, grads = our_loss_and_grads(model, batch, PreferenceLoss("orpo", orpo_lambda=orpo_lambda))  # fmt: skip

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    wrapped = peft.get_peft_model(copy.deepcopy(hf_model), config)
    set_peft(wrapped, tensors)
    ids, real, scored = torch_inputs(batch)
    n = len(PAIRS)
    labels = torch.where(scored == 1, ids, torch.full_like(ids, -100))
    trl_batch = {
        "chosen_input_ids": ids[:n], "chosen_attention_mask": real[:n],
        "chosen_labels": labels[:n], "rejected_input_ids": ids[n:],
        "rejected_attention_mask": real[n:], "rejected_labels": labels[n:],
    }  # fmt: skip
    # The trainer's own methods, bound to the settings they read (building a whole
    # ORPOTrainer would tokenise a dataset we do not need).
    fake = SimpleNamespace(
        beta=orpo_lambda, is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        concatenated_inputs=ORPOTrainer.concatenated_inputs,
        get_batch_logps=ORPOTrainer.get_batch_logps,
    )  # fmt: skip
    fake.concatenated_forward = lambda m, b: ORPOTrainer.concatenated_forward(fake, m, b)
    fake.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(fake, c, r)
    wrapped.train()
    expected, metrics = ORPOTrainer.get_batch_loss_metrics(fake, wrapped, trl_batch)
    expected.backward()
    assert loss == pytest.approx(expected.item(), abs=LOSS_TOLERANCE)
    assert float(stats["accuracy"]) / n == pytest.approx(float(metrics["rewards/accuracies"]))
    assert_grads_match(grads, peft_grads(wrapped))
