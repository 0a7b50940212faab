"""Privacy: the RDP accountant against Google's dp-accounting, per-example clipped gradients
against a loop over single examples (fp32 and 4-bit bases), the PII scanner on planted and on
clean text, and redaction with consistent placeholders, also as training reads the data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import dp_accounting
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from dp_accounting import rdp as dp_rdp
from mlx.utils import tree_flatten, tree_map

from ondevice_lora.adapters.files import LoraConfig, apply_adapters
from ondevice_lora.data import DataConfig, load_datasets
from ondevice_lora.loading import load
from ondevice_lora.privacy.accountant import dp_sgd_epsilon, noise_for_epsilon
from ondevice_lora.privacy.dp import clipped_per_example_grads, per_example_losses
from ondevice_lora.privacy.pii import KINDS, scan_text
from ondevice_lora.privacy.redact import redact_dataset, scan_dataset
from tests.hf_fixtures import write_hf_model
from tests.test_training import quantized_base, write_facts

CLEAN_TEXT = Path(__file__).parent / "fixtures" / "clean_text.md"
INTEGER_ORDERS = list(range(2, 257))
MIXED_ORDERS = [1.25, 1.5, 1.75, 2.5, 3.5, 6.5, 10.5] + list(range(2, 64))
TABLE = [  # (q, sigma, steps, delta)
    (0.05, 1.0, 1000, 1e-5),
    (0.01, 0.8, 5000, 1e-6),
    (0.2, 2.0, 100, 1e-5),
    (0.001, 0.6, 10000, 1e-5),
    (0.1, 5.0, 50, 1e-3),
    (0.02, 1.5, 2000, 1e-7),
]


def reference_epsilon(q, sigma, steps, delta, orders) -> float:
    accountant = dp_rdp.RdpAccountant(orders=list(orders))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("orders", [INTEGER_ORDERS, MIXED_ORDERS], ids=["integer", "mixed"])
@pytest.mark.parametrize("q,sigma,steps,delta", TABLE)
def test_accountant_agrees_with_dp_accounting(q, sigma, steps, delta, orders):
    ours = dp_sgd_epsilon(q, sigma, steps, delta, orders)[0]
    assert ours == pytest.approx(reference_epsilon(q, sigma, steps, delta, orders), rel=1e-6)


def test_the_issue_example():
    assert dp_sgd_epsilon(0.05, 1.0, 1000, 1e-5, INTEGER_ORDERS)[0] == pytest.approx(
        12.0629, abs=5e-5
    )


def test_noise_is_solved_from_the_target_epsilon():
    sigma = noise_for_epsilon(8.0, 0.05, 200, 1e-5)
    assert dp_sgd_epsilon(0.05, sigma, 200, 1e-5)[0] <= 8.0
    assert dp_sgd_epsilon(0.05, sigma - 0.01, 200, 1e-5)[0] > 8.0  # the smallest such noise


# --- per-example gradients -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    write_hf_model(root / "model", "llama")
    write_facts(root / "facts")
    return root


def batch_of(root, tokenizer, rows=4):
    from ondevice_lora.data.batching import iterate_batches

    data = load_datasets(DataConfig(path=root / "facts", max_length=64), tokenizer)
    return tuple(next(iter(iterate_batches(data.train, rows, 64, seed=0))))


@pytest.mark.parametrize("base", ["fp32", "4-bit"])
def test_per_example_clipped_gradients_equal_a_loop(tiny, base):
    model, tokenizer = quantized_base(tiny / "model") if base == "4-bit" else load(tiny / "model")
    mx.random.seed(0)
    apply_adapters(model, LoraConfig(rank=4, target_modules="all-linear"))
    # Non-zero B (a fresh adapter's is zero) so that both factors get gradients.
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    batch = batch_of(tiny, tokenizer)
    clip = 0.5
    summed, norms, _, _ = clipped_per_example_grads(model, batch, clip)

    def single_loss(model, inputs, targets, mask):
        return per_example_losses(model, inputs, targets, mask)[0].sum()

    expected, loop_norms = None, []
    for row in range(batch[0].shape[0]):
        one = tuple(a[row : row + 1] for a in batch)
        grads = dict(tree_flatten(nn.value_and_grad(model, single_loss)(model, *one)[1]))
        norm = float(np.sqrt(sum(float((g**2).sum()) for g in grads.values())))
        loop_norms.append(norm)
        factor = min(1.0, clip / norm)
        clipped = {k: np.array(g) * factor for k, g in grads.items()}
        expected = clipped if expected is None else {k: expected[k] + clipped[k] for k in clipped}
    assert np.allclose(np.array(norms), loop_norms, rtol=1e-5)
    assert min(loop_norms) > clip  # every example was clipped: the clipping is tested
    ours = dict(tree_flatten(summed))
    assert ours.keys() == expected.keys()
    assert max(float(np.abs(np.array(ours[k]) - expected[k]).max()) for k in ours) <= 1e-6


# --- scanning and redaction ------------------------------------------------------------------

PLANTED = {
    "email": ["jane.doe@example.com", "bob+test@mail.example.org"],
    "phone": ["+44 20 7946 0958", "(415) 555-0132", "+1 212 555 0187"],
    "card": ["4111 1111 1111 1111", "5500-0000-0000-0004"],
    "iban": ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000"],
    "ipv4": ["192.168.1.20", "8.8.4.4"],
    "ipv6": ["2001:db8::8a2e:370:7334", "fe80::1ff:fe23:4567:890a"],
    "ssn": ["123-45-6789", "078-05-1120"],
    "name": ["Smith", "Alice Jones"],
    "address": ["221 Baker Street", "10 Downing Street"],
}
LINES = {
    "email": "Write to {} when you can.",
    "phone": "Her number is {} after six.",
    "card": "I paid with {} yesterday.",
    "iban": "Transfer it to {} please.",
    "ipv4": "The server at {} is down.",
    "ipv6": "Its address is {} on the LAN.",
    "ssn": "My social security number is {}.",
    "name": "I met {} at the station.",
    "address": "They live at {} now.",
}
NAME_CUES = {"Smith": "Mr. Smith", "Alice Jones": "my name is Alice Jones"}


def write_planted(folder: Path) -> list[tuple[str, int, str, str]]:
    """A notes file and a chat file with every planted item; returns (file, line, kind, value)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected, notes, chats = [], ["# notes", ""], []
    for kind, values in PLANTED.items():
        for i, value in enumerate(values):
            text = LINES[kind].format(NAME_CUES.get(value, value))
            if i % 2 == 0:
                notes.append(text)
                expected.append(("notes.md", len(notes), kind, value))
            else:
                message = {"messages": [{"role": "user", "content": text},
                                        {"role": "assistant", "content": "Noted."}]}  # fmt: skip
                chats.append(json.dumps(message))
                expected.append(("train.jsonl", len(chats), kind, value))
    (folder / "notes.md").write_text("\n".join(notes) + "\n")
    (folder / "train.jsonl").write_text("\n".join(chats) + "\n")
    return expected


def test_scanner_finds_every_planted_item_at_its_line(tmp_path):
    expected = write_planted(tmp_path / "data")
    found = [
        (file.name, f.line, f.kind, f.value)
        for file, findings in scan_dataset(tmp_path / "data").items()
        for f in findings
    ]
    assert sorted(found) == sorted(expected)
    assert {kind for _, _, kind, _ in found} == set(KINDS)


def test_checksums_reject_look_alikes():
    # One digit off: Luhn and mod 97 fail, so these are not reported as a card or an IBAN.
    text = "Order 4111 1111 1111 1112, reference GB82 WEST 1234 5698 7654 33, v 1.2.3.456"
    assert [f.kind for f in scan_text(text) if f.kind in ("card", "iban", "ipv4")] == []


def test_clean_text_flags_nothing():
    text = CLEAN_TEXT.read_text()
    assert len(text.split()) > 2000
    assert scan_text(text) == []


def test_redaction_is_consistent_and_complete(tmp_path):
    write_planted(tmp_path / "data")
    notes = tmp_path / "data" / "notes.md"
    notes.write_text(notes.read_text() + "Again: write to jane.doe@example.com.\n")
    written, redactor = redact_dataset(tmp_path / "data", tmp_path / "clean")
    assert sorted(p.name for p in written) == ["notes.md", "train.jsonl"]
    text = (tmp_path / "clean" / "notes.md").read_text()
    assert text.count("[EMAIL_1]") == 2 and "jane.doe" not in text
    assert scan_text(text) == []  # nothing left to find
    for line in (tmp_path / "clean" / "train.jsonl").read_text().splitlines():
        json.loads(line)  # still valid JSONL
    assert not any(findings for findings in scan_dataset(tmp_path / "clean").values()), (
        "the redacted copy still holds personal data"
    )
    assert len({p for p in redactor.placeholders.values()}) == sum(map(len, PLANTED.values()))


def test_training_data_is_redacted_on_the_fly(tiny, tmp_path):
    _, tokenizer = load(tiny / "model")
    write_planted(tmp_path / "data")
    data = load_datasets(
        DataConfig(path=tmp_path / "data" / "train.jsonl", redact=True, valid_fraction=0.0),
        tokenizer,
    )
    texts = [tokenizer.decode(x["input_ids"]) for x in data.train]
    assert any("[EMAIL_1]" in t for t in texts) and any("[SSN_1]" in t for t in texts)
    assert not any("bob+test@mail.example.org" in t or "078-05-1120" in t for t in texts)


# --- training with DP, and the canary audit --------------------------------------------------


def audit_config(root, out, **extra):
    from ondevice_lora.training import TrainConfig

    return TrainConfig(
        model=str(root / "model"), data=str(root / "facts"), adapter_path=str(out),
        iters=300, batch_size=8, rank=16, target_modules="all-linear", learning_rate=1e-2,
        lr_schedule="constant", eval_every=0, save_every=0, keep_best=False, max_length=64,
        **extra,
    )  # fmt: skip


@pytest.mark.slow
def test_canary_exposure_is_high_without_dp_and_near_chance_with_it(tmp_path_factory):
    from ondevice_lora.privacy.audit import audit, results_table
    from ondevice_lora.privacy.dp import read_privacy

    root = tmp_path_factory.mktemp("audit")
    write_hf_model(root / "model", "llama")
    write_facts(root / "facts", repeats=1)
    figures = {}
    for label, extra in (("no DP", {}), ("DP eps=8", {"dp_epsilon": 8.0})):
        out = root / label.replace(" ", "_")
        # The DP noise seed is secret (os.urandom) in real runs; fixed here for a repeatable test.
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "dp_noise_secret").write_text("12345")
        results = audit(audit_config(root, out, **extra), count=1, digits=3, repeats=16)
        print(f"\n{label}:\n{results_table(results)}")
        figures[label] = results[0].exposure
    privacy = read_privacy(root / "DP_eps=8")
    assert privacy["epsilon"] <= 8.0 and privacy["steps_done"] == 300
    assert privacy["unit"].startswith("one training example")
    assert figures["no DP"] >= 6.0  # ranked among the first 1.6% of 1000 candidates
    assert figures["DP eps=8"] <= 3.0  # near chance (about 1.4 bits on average)


@pytest.mark.slow
def test_export_audit_runs_before_shipping(tiny, tmp_path):
    from click.testing import CliRunner

    from ondevice_lora.cli import main
    from ondevice_lora.training.api import train_from_config

    adapter = tmp_path / "adapter"
    config = audit_config(tiny, adapter)
    train_from_config(dataclasses.replace(config, iters=20), show_progress=False)
    runner = CliRunner()
    args = ["export", "peft", "--adapter", str(adapter), "--out", str(tmp_path / "peft")]
    # Any exposure reaches a limit of 0 bits: the audit ran and the export was refused.
    refused = runner.invoke(main, [*args, "--audit", "--audit-max-exposure", "0"])
    assert refused.exit_code == 1 and "the audit found a canary exposed" in refused.output
    assert "| my PIN is" in refused.output and not (tmp_path / "peft").exists()
    # Without checkpoints there are no training settings to audit with: a clear error.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapters.safetensors"):
        (bare / name).write_bytes((adapter / name).read_bytes())
    result = runner.invoke(main, ["export", "peft", "--adapter", str(bare), "--out",
                                  str(tmp_path / "p2"), "--audit"])  # fmt: skip
    assert result.exit_code == 1 and "needs the adapter's training settings" in result.output
