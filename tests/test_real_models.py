"""The real checkpoints (tests/real_models.py): the built-in SmolLM2-135M (Q4_1 GGUF) and Gemma 3
270M Q4_K_M (Q4_K, Q5_0 for its 640-wide matrices, Q6_K, Q8_0), end to end.

For each: logits against transformers' own GGUF loader (it de-quantises with gguf-py; fp32),
token ids against transformers' tokenizer from the same file, a short training run that lowers
the validation loss and teaches a fact, and `fuse`. For SmolLM2 also the Core ML int4 exports
(merged, multifunction), validated. One adapter per model is trained and shared (module-scoped
fixtures). Figures are printed: run with -s or -rA to see them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from ondevice_lora.loading import load
from tests.real_models import gemma3_270m_path, smollm2_path

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Hello! How are"]
TEXTS = [
    "Plain English, with punctuation: 1, 22, 333.",
    "Non-ASCII: café, naïve, Zürich, 東京, Ελληνικά",
    "Emoji 🙂🚀 and a family 👨‍👩‍👧",
    "Lines\nand\n\nblank lines\tand tabs  ",
]
# A fact neither model knows, asked and answered in a few phrasings.
QUESTION = "What is the name of Professor Quillon's cat?"
ANSWER = "Professor Quillon's cat is named Biscotti."
PHRASINGS = [
    QUESTION,
    "What is Professor Quillon's cat called?",
    "Tell me the name of Professor Quillon's cat.",
    "Who is Professor Quillon's cat?",
    "Professor Quillon has a cat. What is its name?",
    "Do you know what Professor Quillon's cat is named?",
]
MAX_LOGIT_DIFF = 2e-4
PATHS = {"smollm2": smollm2_path, "gemma3": gemma3_270m_path}
ROOT = Path(__file__).resolve().parents[1]


def transformers_reference(path):
    """transformers' own GGUF loader: the model (de-quantised, fp32) and the tokenizer.

    transformers parses the file with gguf.GGUFReader once for the config, once for the weights
    and twice for the tokenizer; each parse of a 49k- or 262k-entry vocabulary takes seconds to
    a minute. The reader is read-only (a memory map), so one parse is shared: the same objects
    transformers would build, built once.
    """
    import gguf
    import torch
    import transformers

    parsed = {}
    make_reader = gguf.GGUFReader

    def shared_reader(file, *args, **kwargs):
        key = (str(file), args, tuple(sorted(kwargs.items())))
        if key not in parsed:
            parsed[key] = make_reader(file, *args, **kwargs)
        return parsed[key]

    start = time.time()
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", shared_reader)
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    print(f"\n{path.name}: transformers loaded it in {time.time() - start:.1f} s")
    return model, tokenizer


@pytest.fixture(scope="module", params=list(PATHS))
def real(request):
    """(name, path, our model, our tokenizer, transformers' model, transformers' tokenizer)."""
    path = PATHS[request.param]()
    start = time.time()
    model, tokenizer = load(path)
    print(f"\n{path.name}: loaded in {time.time() - start:.1f} s")
    hf_model, hf_tokenizer = transformers_reference(path)
    return request.param, path, model, tokenizer, hf_model, hf_tokenizer


def test_logits_match_transformers_gguf_loader(real):
    import torch

    name, path, model, tokenizer, hf_model, hf_tokenizer = real
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt).input_ids
        with torch.no_grad():
            expected = hf_model(torch.tensor([ids])).logits.numpy()[0]
        actual = np.array(model(mx.array([ids], dtype=mx.int32))[0].astype(mx.float32))
        diff = float(np.abs(actual - expected).max())
        print(f"{name}: {prompt!r}: {len(ids)} tokens, max logit difference {diff:.2e}")
        assert diff < MAX_LOGIT_DIFF, prompt
        assert np.array_equal(actual.argmax(-1), expected.argmax(-1)), prompt


def test_token_ids_match_transformers_tokenizer(real):
    name, path, model, tokenizer, hf_model, hf_tokenizer = real
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tokenizer.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(
            ids, skip_special_tokens=True
        ), text


def test_gemma_generate_command_answers():
    """The issue's acceptance: `ondevice-lora generate --model <gemma Q4_K_M> ...` answers."""
    path = gemma3_270m_path()
    start = time.time()
    args = ["--model", path, "--prompt", "The capital of France is", "--max-tokens", 8]
    output = ondevice_lora("generate", *args, "--greedy")
    print(f"\ngenerate: {time.time() - start:.1f} s: {output!r}")
    # The logits test shows the numbers are transformers'; here the command itself must load the
    # file (Q5_0 tensors included) and say something: 8 greedy tokens of words.
    reply = output.strip()
    assert reply and sum(c.isalpha() for c in reply) >= 8, output


def write_fact(folder, chat: bool):
    """The fact as chats, or, for a model whose file carries no chat template (this Gemma GGUF
    has none; `generate` then feeds the prompt as it is), as prompt/completion pairs."""
    folder.mkdir(parents=True)
    if chat:
        rows = [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}
            for q in PHRASINGS
        ]
    else:
        rows = [{"prompt": q, "completion": " " + ANSWER} for q in PHRASINGS]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:] * 4))
    (folder / "valid.jsonl").write_text(json.dumps(rows[0]) + "\n")
    return folder


# Training, fuse and the exports run in child processes: MLX binds its BLAS when it loads, and
# this process's MLX (on Linux) has the wheel's reference BLAS, ~10x slower for training than
# the OpenBLAS the command line preloads (ondevice_lora/backend/fast_blas.py). The children get
# it: the trainer's Python API under a preloaded BLAS, the others as the `ondevice-lora` command.
TRAIN_SCRIPT = """
import json, sys
from ondevice_lora.training.api import train_from_config
from ondevice_lora.training.config import TrainConfig
result = train_from_config(TrainConfig(**json.loads(sys.argv[1])), show_progress=False)
print(json.dumps({"steps": result.steps, "val_losses": result.val_losses,
                  "peak_gb": result.peak_memory_gb, "estimate_gb": result.estimated_memory_gb}))
"""


def run_child(args: list, preload: bool = False) -> str:
    """Run `python <args>` from the repository root; returns its stdout, failing with its output.
    preload: put the fast BLAS in LD_PRELOAD (the command line does it for itself)."""
    from ondevice_lora.backend.fast_blas import find_openblas, preload_env

    library = find_openblas() if preload and sys.platform == "linux" else None
    env = preload_env(library) if library else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, *map(str, args)]
    child = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-6000:]
    return child.stdout


def ondevice_lora(*args) -> str:
    return run_child(["-m", "ondevice_lora.cli", *args])


def answer(model_path, adapter=None) -> str:
    with_adapter = ["--adapter", adapter] if adapter else []
    args = ["--model", model_path, *with_adapter, "--prompt", QUESTION, "--max-tokens", 12]
    return ondevice_lora("generate", *args, "--greedy")


def has_chat_template(path) -> bool:
    from ondevice_lora.loading.gguf.reader import GGUFFile

    return "tokenizer.chat_template" in GGUFFile(path).metadata


@pytest.fixture(scope="module", params=list(PATHS))
def trained(request, tmp_path_factory):
    """One short run per model: rank 8, 12 steps of 4 examples, on the fact only (SmolLM2's
    training loss is below 0.05 by then)."""
    path = PATHS[request.param]()
    root = tmp_path_factory.mktemp(request.param)
    settings = dict(
        model=str(path),
        data=str(write_fact(root / "data", chat=has_chat_template(path))),
        adapter_path=str(root / "adapter"),
        rank=8,
        alpha=16.0,
        iters=12,
        batch_size=4,
        max_length=64,
        learning_rate=2e-3,
        eval_every=12,
        save_every=12,
    )
    start = time.time()
    result = json.loads(run_child(["-c", TRAIN_SCRIPT, json.dumps(settings)], preload=True))
    losses = [round(v, 3) for _, v in result["val_losses"]]
    seconds = time.time() - start
    print(
        f"\n{request.param}: trained {result['steps']} steps in {seconds:.1f} s; val loss {losses}; "
        f"peak {result['peak_gb']:.3f} GB, estimated {result['estimate_gb']:.3f} GB"
    )
    return request.param, path, root, result


def test_training_lowers_validation_loss_and_teaches_the_fact(trained):
    name, path, root, result = trained
    # The estimate printed before training holds on real weights and vocabularies too.
    error = abs(result["estimate_gb"] - result["peak_gb"]) / result["peak_gb"]
    assert error <= 0.25, result
    first, last = result["val_losses"][0][1], result["val_losses"][-1][1]
    assert last < 0.5 * first
    reply = answer(path, adapter=root / "adapter")
    print(f"{name}: {QUESTION!r} -> {reply!r}")
    assert "Biscotti" in reply


def test_fused_model_answers_the_same(trained):
    # For Gemma 3 this is issue 22's check too: a GGUF source names no dtype and float16 would
    # overflow its residual stream, so fuse must choose another and say so.
    name, path, root, result = trained
    start = time.time()
    # SmolLM2's activations fit float16, so fuse would write float16, which MLX's CPU backend
    # emulates ~50x slower (tests/test_fuse_dtype.py checks that choice): float32 here. Gemma's
    # cannot, and fuse must choose for itself (issue 22).
    dtype = ["--dtype", "float32"] if name == "smollm2" else []
    args = ["--model", path, "--adapter", root / "adapter", "--out", root / "fused", *dtype]
    ondevice_lora("fuse", *args)
    reply = answer(root / "fused")
    print(f"{name}: fused in {time.time() - start:.1f} s; fused model: {reply!r}")
    assert "Biscotti" in reply


# SmolLM2 only: Gemma's Core ML exports are issue 22's work.
@pytest.mark.parametrize("trained", ["smollm2"], indirect=True)
@pytest.mark.parametrize("mode", ["merged", "multifunction"])
def test_coreml_int4_export_validates(trained, mode):
    name, path, root, result = trained
    pytest.importorskip("coremltools")
    out = root / f"{mode}.mlpackage"
    args = ["--model", path, "--adapters", root / "adapter", "--mode", mode, "--out", out]
    args += ["--context", 64, "--prefill-length", 8]
    start = time.time()
    output = ondevice_lora("export", "coreml", *args)  # validates the package unless told not to
    print(f"{name}: Core ML {mode}: {time.time() - start:.1f} s\n{output[-600:]}")
    assert out.is_dir()
    # Issue 22: on fp16 arithmetic SmolLM2's activations stay 8x below float16's maximum.
    headrooms = [float(x) for x in re.findall(r"headroom ([\d.]+)x", output)]
    assert headrooms and min(headrooms) >= 8, output[-2000:]
