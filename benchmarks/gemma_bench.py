"""Training memory and speed at a 262k vocabulary: Gemma 3 270M's real weights, LoRA rank 8 on
all linear layers, batch 4 x 512 tokens, with and without gradient checkpointing; and the time
and peak of a 300-token prefill with the head at every position (before) and at the sampled
position only (now).

    python benchmarks/gemma_bench.py                  # ~15-30 min on 2 shared cores
    python benchmarks/gemma_bench.py --steps 3 --work /tmp/gemma

Each measurement runs in a process of its own (a clean MLX peak), with the fast BLAS preloaded
as the command line does. The model: benchmarks/gemma_model.py (which loader made it is
printed). Training data: bench_setup.make_chats over Gemma's vocabulary (about half of each chat
trained), packed into 4 rows of 511 positions. Reported per row: MLX's peak (mx.get_peak_memory,
weights included), the estimate the trainer printed (training/memory.py), their ratio, and
trained tokens per second of the steps after the first (the first compiles).

mlx-lm's rows (`--only mlx-lm` runs them alone) use its own trainer at the same settings on
float32 weights de-quantised from the same 4-bit folder (its 4-bit CPU kernel would take hours
per step here), with the chats joined into rows of 512 tokens since it does not pack: batches
of 4 x 512 on both sides. Its peak therefore includes 1.1 GB of float32 weights where ours
holds 0.17 GB of 4-bit ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_setup as setup  # noqa: E402
from gemma_model import gemma_folder  # noqa: E402

PROMPT_TOKENS = 300


def train_child(spec: dict) -> dict:
    import mlx.core as mx

    from ondevice_lora.loading import load_model
    from ondevice_lora.training import TrainConfig, TrainingCallback, train

    model, _ = load_model(spec["model"])
    vocab = model.args.vocab_size
    tokenizer = setup.make_tokenizer(vocab)
    chats = setup.make_chats(64, vocab, 512, seed=0)
    adapter = Path(spec["work"]) / f"adapter-{spec['grad_checkpoint']}"
    shutil.rmtree(adapter, ignore_errors=True)  # an earlier run's: a fresh run, not a resume
    config = TrainConfig(
        adapter_path=str(adapter),
        rank=8, alpha=16, dropout=0.0, target_modules="all-linear", max_length=512,
        batch_size=4, batching="packed", grad_checkpoint=spec["grad_checkpoint"],
        optimizer="adam", learning_rate=1e-4, lr_schedule="constant", iters=spec["steps"],
        eval_every=0, save_every=0, keep_best=False, seed=0,
    )  # fmt: skip
    records, began = [], {}

    class Keep(TrainingCallback):
        def on_train_begin(self, info):
            began.update(info)

        def on_step_end(self, record):
            records.append(record)
            print(f"step {record['step']}: {record['tokens_per_second']:.1f} trained tok/s, "
                  f"peak {record['peak_memory_gb']:.3f} GB", flush=True)  # fmt: skip

    result = train(model, tokenizer, chats, None, config, [Keep()], show_progress=False)
    later = records[1:] or records  # the first step compiles
    tokens = sum(r["tokens"] for r in later)
    seconds = sum(r["tokens"] / r["tokens_per_second"] for r in later)
    return {
        "grad_checkpoint": spec["grad_checkpoint"],
        "steps": len(records),
        "peak_gb": result.peak_memory_gb,
        "estimate_gb": result.estimated_memory_gb,
        "estimate_table": began["memory_estimate"].table(),
        "trained_tok_per_s": tokens / seconds,
        "trained_tokens_per_step": tokens / len(later),
        "seconds_per_step": seconds / len(later),
        "mlx_active_after_gb": mx.get_active_memory() / 1e9,
    }


def mlx_lm_rows(chats: list[dict], width: int) -> list[dict]:
    """Chats joined into rows of `width` tokens for mlx-lm, which does not pack: its batches
    are then 4 x `width`, as ours are. Trained from the first chat's reply on."""
    rows, row = [], None
    for chat in chats:
        if row is None:
            row = {"input_ids": list(chat["input_ids"]), "offset": chat["offset"]}
        else:
            row["input_ids"] += chat["input_ids"]
        if len(row["input_ids"]) >= width:
            row["input_ids"] = row["input_ids"][:width]
            rows.append(row)
            row = None
    return rows


def mlx_lm_child(spec: dict) -> dict:
    """mlx-lm's own trainer at the same settings, on float32 weights de-quantised from the same
    4-bit folder: its 4-bit kernel on Linux CPU (~2 GFLOP/s) would take hours per step."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from bench_sides import LORA_KEYS, TokenChats
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import dequantize_model, load_model

    model, _ = load_model(Path(spec["model"]))
    model = dequantize_model(model)
    mx.eval(model.parameters())
    rows = mlx_lm_rows(setup.make_chats(256, model.args.vocab_size, 512, seed=0), 512)
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(
        model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": LORA_KEYS}
    )
    times, trained = [], []

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            times.append(time.perf_counter())
            trained.append(info["trained_tokens"])
            print(f"mlx-lm step {info['iteration']}: peak {info['peak_memory']:.3f} GB", flush=True)

    args = trainer.TrainingArgs(
        batch_size=4, iters=spec["steps"], val_batches=0, steps_per_report=1,
        steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=512,
        adapter_file=str(Path(spec["work"]) / f"mlx-lm-{spec['grad_checkpoint']}.safetensors"),
        grad_checkpoint=spec["grad_checkpoint"],
    )  # fmt: skip
    mx.reset_peak_memory()
    started = time.perf_counter()
    trainer.train(model, optim.Adam(learning_rate=1e-4), CacheDataset(TokenChats(rows)), None,
                  args, training_callback=Clock())  # fmt: skip
    steps = [b - a for a, b in zip([started, *times], times)]
    later = steps[1:] or steps  # the first step compiles
    tokens = (trained[-1] - trained[0]) if len(trained) > 1 else trained[0]
    return {
        "side": "mlx-lm (float32 weights)",
        "grad_checkpoint": spec["grad_checkpoint"],
        "steps": len(steps),
        "peak_gb": mx.get_peak_memory() / 1e9,
        "trained_tok_per_s": tokens / sum(later),
        "seconds_per_step": sum(later) / len(later),
    }


def prefill_child(spec: dict) -> dict:
    """One prefill of a PROMPT_TOKENS prompt into a fresh cache; the head over every position
    ("before", as generation did) or at the last position only ("now", generate_tokens)."""
    import mlx.core as mx

    from ondevice_lora.generation.generate import SamplingConfig, generate_tokens
    from ondevice_lora.loading import load_model
    from ondevice_lora.models.base import make_cache

    model, _ = load_model(spec["model"])
    prompt = setup.make_chats(1, model.args.vocab_size, 2 * PROMPT_TOKENS, seed=1)[0]
    ids = (prompt["input_ids"] * 4)[:PROMPT_TOKENS]
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    start = time.perf_counter()
    if spec["mode"] == "before":
        logits = model(mx.array(ids)[None], cache=make_cache(model))[:, -1, :]
        token = int(mx.argmax(logits, axis=-1).item())
    else:
        token = next(generate_tokens(model, ids, SamplingConfig(max_tokens=1, stop_at_eos=False)))
    seconds = time.perf_counter() - start
    return {"mode": spec["mode"], "seconds": seconds, "peak_gb": mx.get_peak_memory() / 1e9,
            "first_token": token}  # fmt: skip


def run_child(kind: str, spec: dict, timeout: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    out = Path(f.name).with_suffix(".out.json")
    command = [sys.executable, __file__, "--child", kind, f.name, str(out)]
    try:
        subprocess.run(command, check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"did not finish in {timeout} s"}
    except subprocess.CalledProcessError as error:
        return {**spec, "error": f"failed ({error.returncode})"}
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gemma-bench")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    parser.add_argument("--only", choices=["train", "mlx-lm", "prefill"], help="one part only")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gemma_bench.json")
    args = parser.parse_args()
    if args.child:
        from ondevice_lora.backend.fast_blas import reexec_with_fast_blas

        reexec_with_fast_blas()
        kind, spec_path, out_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        children = {"train": train_child, "mlx-lm": mlx_lm_child, "prefill": prefill_child}
        result = children[kind](spec)
        Path(out_path).write_text(json.dumps(result))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    model, made_by = gemma_folder(args.work)
    print(f"model: {model} ({made_by})", flush=True)
    # --only reruns one part: the others keep their last results.
    report = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    report["model_made_by"] = made_by
    for part in ("train", "mlx_lm", "prefill"):
        if args.only in (None, part.replace("_", "-")):
            report[part] = []
    for part, kind in (("train", "train"), ("mlx_lm", "mlx-lm")):
        if args.only not in (None, kind):
            continue
        for checkpoint in (True, False):
            spec = {"model": str(model), "work": str(args.work), "steps": args.steps,
                    "grad_checkpoint": checkpoint}  # fmt: skip
            row = run_child(kind, spec, args.timeout)
            print(json.dumps(row, indent=1), flush=True)
            report[part].append(row)
    if args.only in (None, "prefill"):
        for mode in ("before", "now"):
            row = run_child("prefill", {"model": str(model), "mode": mode}, args.timeout)
            print(json.dumps(row), flush=True)
            report["prefill"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
