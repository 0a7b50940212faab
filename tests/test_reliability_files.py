"""Nothing lost: inputs are never written over, every output is whole or absent (also when the
process is killed, the disk is full or the folder read-only), and one folder holds one run.

The failures are real: SIGKILL in a child process, RLIMIT_FSIZE (the kernel refuses the write),
a folder without write permission (the child drops to user `nobody` when the tests run as root,
who may write anywhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from ondevice_lora.adapters.files import LoraConfig
from ondevice_lora.data.errors import DatasetError
from ondevice_lora.data.records import read_jsonl
from ondevice_lora.privacy.cli import privacy_group
from ondevice_lora.privacy.redact import PrivacyError, redact_dataset, scan_file
from ondevice_lora.training.checkpoint import TrainState, latest_checkpoint, save_checkpoint
from tests.hf_fixtures import write_hf_model
from tests.test_training import write_facts

REPO = Path(__file__).resolve().parents[1]
EMAIL_CHAT = {
    "messages": [
        {"role": "user", "content": "Mail ana@example.com\u2028please"},
        {"role": "assistant", "content": "Done."},
    ]
}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability") / "model"
    write_hf_model(folder, "llama")
    return folder


def child(script: str, *args, read_only: Path | None = None) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh process with the repository importable; `read_only`: a
    folder the process may read but not write."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", textwrap.dedent(script), *map(str, args)]
    if read_only is not None and os.geteuid() == 0:
        # Root writes anywhere a mode allows nothing: give it a read-only view of the folder
        # (a bind mount in a mount namespace of its own, so nothing outside sees it).
        remount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", remount, str(read_only), *command]
    elif read_only is not None:
        for path in (read_only, *read_only.rglob("*")):
            if path.is_dir():
                path.chmod(0o555)
    try:
        return subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        if read_only is not None and os.geteuid() != 0:
            for path in (read_only, *read_only.rglob("*")):
                if path.is_dir():
                    path.chmod(0o755)


# --- redact never writes over its input, and writes its output whole ------------------------------


def test_redact_refuses_an_out_folder_holding_its_input(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    original = json.dumps(EMAIL_CHAT) + "\n"
    (data / "train.jsonl").write_text(original)
    for source, out in ((data / "train.jsonl", data), (data / "train.jsonl", tmp_path), (data, data / "sub")):  # fmt: skip
        result = CliRunner().invoke(privacy_group, ["redact", str(source), "--out", str(out)])
        assert result.exit_code == 1 and "outside it" in result.output, result.output
    assert (data / "train.jsonl").read_text() == original
    assert sorted(p.name for p in data.iterdir()) == ["train.jsonl"]


def test_redact_refuses_a_non_empty_out_unless_forced_then_replaces_it_whole(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(EMAIL_CHAT) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.jsonl").write_text("mine\n")
    (out / "keep.txt").write_text("mine\n")
    with pytest.raises(PrivacyError, match="already holds files"):
        redact_dataset(data, out)
    assert (out / "data.jsonl").read_text() == "mine\n"
    redact_dataset(data, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl"]
    assert "[EMAIL_1]" in (out / "data.jsonl").read_text()


def test_redact_writes_nothing_when_a_later_file_fails(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(json.dumps(EMAIL_CHAT) + "\n")
    (data / "b.md").write_bytes(b"caf\xe9 ana@example.com\n")
    with pytest.raises(DatasetError, match=r"b.md is not UTF-8 text"):
        redact_dataset(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_scan_and_redact_read_what_train_reads(tmp_path):
    # A byte order mark, and U+2028 unescaped inside a JSON string: train accepts both.
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(EMAIL_CHAT, ensure_ascii=False).encode() + b"\n")
    assert len(read_jsonl(path)) == 1
    assert [f.kind for f in scan_file(path)] == ["email"]
    redact_dataset(path, tmp_path / "out")
    (record,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert record.data["messages"][0]["content"] == "Mail [EMAIL_1]\u2028please"


def test_non_utf8_data_gets_trains_error_in_scan_and_redact(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(EMAIL_CHAT).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetError) as trained:
        read_jsonl(path)
    for command in (["scan", str(path)], ["redact", str(path), "--out", str(tmp_path / "o")]):
        result = CliRunner().invoke(privacy_group, command)
        assert result.exit_code == 1 and str(trained.value) in result.output, result.output


# --- exports: whole or absent ----------------------------------------------------------------------

KILL_AFTER_WEIGHTS = """
import os, signal, sys
import mlx.core as mx

save = mx.save_safetensors


def save_then_die(*args, **kwargs):  # the process dies right after the first weights file
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


if sys.argv[1] == "kill":
    mx.save_safetensors = save_then_die
"""
EXPORTS = {
    "peft": "from converters.formats.peft import export_peft as export",
    "mlx-lm": "from converters.formats.mlx_lm import export_mlx_lm as export",
    "fuse": "from ondevice_lora.adapters.fuse import fuse\n"
    "export = lambda adapter, out: fuse(sys.argv[4], [adapter], out, force=True)",
}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("kind", sorted(EXPORTS))
def test_an_export_killed_mid_write_leaves_the_previous_one_whole(model_folder, tmp_path, kind):
    from tests.adapter_fixtures import write_adapter

    first = write_adapter(model_folder, tmp_path / "a1", LoraConfig(rank=2, alpha=4.0), seed=1)
    second = write_adapter(model_folder, tmp_path / "a2", LoraConfig(rank=2, alpha=32.0), seed=2)
    out = tmp_path / "out"
    script = KILL_AFTER_WEIGHTS + EXPORTS[kind] + "\nexport(sys.argv[2], sys.argv[3])\n"
    assert child(script, "run", first, out, model_folder).returncode == 0
    before = folder_bytes(out)

    killed = child(script, "kill", second, out, model_folder)
    assert killed.returncode == -9, killed.stderr
    # The earlier export, untouched: e.g. not new PEFT weights beside the old lora_alpha.
    assert folder_bytes(out) == before
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]

    result = child(script, "run", second, out, model_folder)
    assert result.returncode == 0, result.stderr
    assert f"Removed {stale}, left by an interrupted run" in result.stderr
    assert not stale.exists() and folder_bytes(out) != before
    if kind == "peft":
        assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 32.0


def test_export_refuses_a_folder_holding_other_files(model_folder, tmp_path):
    from converters.formats.common import AdapterFormatError
    from converters.formats.mlx_lm import export_mlx_lm
    from tests.adapter_fixtures import write_adapter

    adapter = write_adapter(model_folder, tmp_path / "a", LoraConfig(rank=2))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    with pytest.raises(AdapterFormatError, match=r"holds other files \(notes.md\)"):
        export_mlx_lm(adapter, out)
    with pytest.raises(AdapterFormatError, match="is or holds the folder being converted"):
        export_mlx_lm(adapter, tmp_path)
    assert (out / "notes.md").read_text() == "mine" and (adapter / "adapters.safetensors").exists()


# --- single files: one atomic helper, stale temporaries removed ------------------------------------


def test_dp_secret_is_written_whole_and_private(tmp_path):
    from ondevice_lora.privacy.dp import noise_secret

    secret = noise_secret(tmp_path)
    path = tmp_path / "checkpoints" / "dp_noise_secret"
    assert path.read_text() == str(secret) and noise_secret(tmp_path) == secret
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["dp_noise_secret"]
    path.write_text("12x4")
    with pytest.raises(Exception, match="the DP noise secret is damaged"):
        noise_secret(tmp_path)


def test_a_temporary_file_left_by_a_killed_run_is_removed_and_reported(
    model_folder, tmp_path, capfd
):
    from ondevice_lora.loading.tokenizer import Tokenizer

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".tokenizer_config.{dead}.tmp.json"
    stale.write_text('{"half": ')
    Tokenizer.from_folder(model_folder).save(tmp_path)
    assert not stale.exists()
    assert f"Removed {stale}, left by an interrupted run (process {dead})" in capfd.readouterr().err
    json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# --- disk full and permission denied ---------------------------------------------------------------

FULL_DISK = """
import resource, sys
import mlx.core as mx
from ondevice_lora.errors import OndeviceLoraError
from ondevice_lora.training.checkpoint import TrainState, save_checkpoint

weights, moments = {"a": mx.ones((64, 64))}, {"m": mx.ones((64, 64))}
save_checkpoint(sys.argv[1], TrainState(step=1), weights, moments)
# From here the kernel refuses to grow any file past 4 KiB (Python ignores SIGXFSZ: EFBIG).
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    save_checkpoint(sys.argv[1], TrainState(step=2), weights, moments)
except OndeviceLoraError as e:
    print(type(e).__name__, e)
"""


def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path):
    result = child(FULL_DISK, tmp_path / "ad")
    assert result.returncode == 0, result.stderr
    step2 = tmp_path / "ad" / "checkpoints" / "step-0000002"
    assert result.stdout.startswith(f"OutputError {step2}: could not write it: no space left on the device")  # fmt: skip
    assert latest_checkpoint(tmp_path / "ad").name == "step-0000001"
    assert sorted(p.name for p in (tmp_path / "ad" / "checkpoints").iterdir()) == [
        "latest", "step-0000001"
    ]  # fmt: skip


def test_a_read_only_folder_is_one_message_saying_permission_denied(model_folder, tmp_path):
    if os.geteuid() == 0 and subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("running as root without mount namespaces: no folder is read-only to root")
    ad = tmp_path / "ad"
    save_checkpoint(ad, TrainState(step=1), {"a": mx.ones((4,))}, {"m": mx.ones((4,))})
    script = """
        import sys
        import mlx.core as mx
        from ondevice_lora.errors import OndeviceLoraError
        from ondevice_lora.training.checkpoint import TrainState, save_checkpoint
        try:
            save_checkpoint(sys.argv[1], TrainState(step=2), {"a": mx.ones((4,))}, {})
        except OndeviceLoraError as e:
            print(type(e).__name__, e)
    """
    result = child(script, ad, read_only=ad)
    expected = f"OutputError {ad}/checkpoints/step-0000002: could not write it: permission denied"
    assert result.stdout.startswith(expected), result.stdout + result.stderr
    assert latest_checkpoint(ad).name == "step-0000001"

    train = child(
        "from ondevice_lora.training.cli import train_command; train_command()",
        "--model", model_folder, "--data", write_facts(tmp_path / "facts"), "--iters", "1",
        "--adapter-path", ad / "new", read_only=ad,
    )  # fmt: skip
    assert train.returncode == 1 and "Traceback" not in train.stderr, train.stderr
    assert f"Error: {ad}/new/.train.lock: could not write it: permission denied" in train.stderr


# --- one training per folder; --resume knows the folder however it is written -----------------------

HOLD_LOCK = """
import sys, time
from ondevice_lora.training.lock import training_lock

with training_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def train_args(model_folder, data, adapter_path, *extra) -> list[str]:
    return [
        "--model", str(model_folder), "--data", str(data), "--adapter-path", str(adapter_path),
        "--batch-size", "2", "--rank", "2", "--eval-every", "0", "--save-every", "1", *extra,
    ]  # fmt: skip


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(model_folder, tmp_path):
    from ondevice_lora.training.cli import train_command

    data = write_facts(tmp_path / "facts")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "ad")], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(train_command, train_args(model_folder, data, tmp_path / "ad", "--iters", "1"))  # fmt: skip
        assert result.exit_code == 1, result.output
        assert f"another training run (process {holder.pid}) is writing to this folder" in result.output  # fmt: skip
        assert not (tmp_path / "ad" / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed, as a crash would): the kernel released its lock.
    result = CliRunner().invoke(train_command, train_args(model_folder, data, tmp_path / "ad", "--iters", "1"))  # fmt: skip
    assert result.exit_code == 0, result.output


def test_resume_accepts_the_same_folder_however_it_is_written(model_folder, tmp_path, monkeypatch):
    from ondevice_lora.training.cli import train_command

    data = write_facts(tmp_path / "facts")
    monkeypatch.chdir(tmp_path)
    for step, spelling in enumerate(("ad", "ad/", "./ad", str(tmp_path / "ad")), start=1):
        extra = ["--iters", str(step)] + (["--resume"] if step > 1 else [])
        result = CliRunner().invoke(train_command, train_args(model_folder, data, spelling, *extra))
        assert result.exit_code == 0, result.output
        assert latest_checkpoint(tmp_path / "ad").name == f"step-{step:07d}"


# --- non-finite losses stop training, keeping the last good checkpoint -------------------------------


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(model_folder, tmp_path):
    from ondevice_lora.data import DataConfig, load_datasets
    from ondevice_lora.loading import load
    from ondevice_lora.training import TrainConfig, train
    from ondevice_lora.training.finite import NonFiniteError
    from ondevice_lora.training.step import masked_cross_entropy

    data = write_facts(tmp_path / "facts")
    config = TrainConfig(
        model=str(model_folder), data=str(data), adapter_path=str(tmp_path / "ad"), rank=2,
        batch_size=2, iters=2, eval_every=0, save_every=1, keep_best=False,
    )  # fmt: skip

    def run(loss_fn, **changes):
        model, tokenizer = load(model_folder)
        splits = load_datasets(DataConfig(path=data), tokenizer)
        settings = TrainConfig(**{**config.to_dict(), **changes})
        return train(model, tokenizer, splits.train, None, settings, loss_fn=loss_fn,
                     show_progress=False)  # fmt: skip

    def nan_loss(model, *batch):
        loss, tokens = masked_cross_entropy(model, *batch)
        return loss * mx.array(float("nan")), tokens

    run(masked_cross_entropy)
    good = mx.load(str(tmp_path / "ad" / "checkpoints" / "step-0000002" / "adapters.safetensors"))
    with pytest.raises(NonFiniteError, match=r"step 3: the training loss is nan, so training stopped; the last good checkpoint, step-0000002, is kept"):  # fmt: skip
        run(nan_loss, iters=4, resume=True)
    assert latest_checkpoint(tmp_path / "ad").name == "step-0000002"
    kept = mx.load(str(tmp_path / "ad" / "checkpoints" / "step-0000002" / "adapters.safetensors"))
    for name, value in good.items():
        np.testing.assert_array_equal(np.array(kept[name]), np.array(value))
    saved = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    assert all(mx.all(mx.isfinite(v)).item() for v in saved.values())
