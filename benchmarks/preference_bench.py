"""DPO/ORPO beside SFT at the same batch size: peak memory (MLX's allocator) and tokens/s.

    python benchmarks/preference_bench.py [--quick] [--batch-size 4] [--steps 10]

A random 4-bit Llama (bench_setup) and synthetic pairs of token ids: the chosen side is a chat
of bench_setup.make_chats, the rejected side the same prompt with another reply of about the
same length. SFT trains on the chosen chats alone, with the same batch size, so the figures
compare one batch of b chats with one batch of b pairs (2b rows, plus the reference pass).
The acceptance bound: DPO's peak at most 2.2x SFT's. Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_setup import FULL_MODEL, QUICK_MODEL, make_chats, make_tokenizer, write_model  # noqa: E402
from ondevice_lora.loading import load_model  # noqa: E402
from ondevice_lora.training import TrainConfig, train  # noqa: E402

# Between the quick model and the 88M one: 4 layers of width 384, as distributed_bench.py.
MEDIUM_MODEL = {**FULL_MODEL, "hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 1024}  # fmt: skip
MAX_RATIO = 2.2


def make_pairs(count: int, vocab_size: int, max_length: int) -> list[dict]:
    chosen = make_chats(count, vocab_size, max_length, seed=1)
    others = make_chats(count * 4, vocab_size, max_length, seed=2)
    pairs = []
    for c in chosen:
        # Another chat's reply of similar length, after this chat's prompt.
        reply_len = len(c["input_ids"]) - c["offset"]
        other = min(others, key=lambda o: abs(len(o["input_ids"]) - o["offset"] - reply_len))
        rejected = c["input_ids"][: c["offset"]] + other["input_ids"][other["offset"] :]
        rejected = rejected[:max_length]
        pairs.append({
            "input_ids": c["input_ids"], "loss_mask": [0] + c["loss_mask"][1:],
            "rejected_input_ids": rejected,
            "rejected_loss_mask": [0] * c["offset"] + [1] * (len(rejected) - c["offset"]),
        })  # fmt: skip
    return pairs


def run(method: str, folder: Path, examples, batch_size: int, steps: int, max_length: int, out: Path) -> dict:  # fmt: skip
    model, _ = load_model(folder)
    tokenizer = make_tokenizer(model.args.vocab_size)
    config = TrainConfig(
        adapter_path=str(out / method), method=method, iters=steps, batch_size=batch_size,
        max_length=max_length, rank=8, target_modules="all-linear", learning_rate=5e-4,
        eval_every=0, save_every=0, keep_best=False,
    )  # fmt: skip
    result = train(model, tokenizer, examples, None, config, show_progress=False)
    records = [json.loads(x) for x in (out / method / "metrics.jsonl").read_text().splitlines()]
    steady = [
        r["tokens_per_second"] for r in records[2:] if "tokens_per_second" in r
    ]  # past compiling
    steady.sort()
    return {
        "method": method,
        "peak_memory_gb": result.peak_memory_gb,
        "estimated_memory_gb": result.estimated_memory_gb,
        "scored_tokens_per_second": steady[len(steady) // 2] if steady else None,
        "seconds": result.seconds,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 2-layer model (CI smoke)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args(argv)
    spec = QUICK_MODEL if args.quick else MEDIUM_MODEL
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = write_model(work / "model", spec, bits=4)
        pairs = make_pairs(32, spec["vocab_size"], args.max_length)
        chosen = [{"input_ids": p["input_ids"], "loss_mask": p["loss_mask"]} for p in pairs]
        rows = [
            run("sft", folder, chosen, args.batch_size, args.steps, args.max_length, work),
            run("dpo", folder, pairs, args.batch_size, args.steps, args.max_length, work),
            run("orpo", folder, pairs, args.batch_size, args.steps, args.max_length, work),
        ]
    sft = rows[0]["peak_memory_gb"]
    for row in rows:
        row["peak_vs_sft"] = row["peak_memory_gb"] / sft
        print(f"{row['method']:>5}: peak {row['peak_memory_gb']:.3f} GB ({row['peak_vs_sft']:.2f}x SFT), "
              f"estimate {row['estimated_memory_gb']:.3f} GB, {row['scored_tokens_per_second']:.0f} scored tok/s")  # fmt: skip
    report = {
        "model": spec,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "rows": rows,
    }
    name = "preference_quick.json" if args.quick else "preference.json"
    (Path(__file__).parent / "results" / name).write_text(json.dumps(report, indent=2) + "\n")
    worst = max(r["peak_vs_sft"] for r in rows)
    print(f"largest peak vs SFT: {worst:.2f}x (bound {MAX_RATIO}x): {'ok' if worst <= MAX_RATIO else 'OVER'}")  # fmt: skip
    return report


if __name__ == "__main__":
    from ondevice_lora.backend.fast_blas import reexec_with_fast_blas

    reexec_with_fast_blas()  # as the command line does: MLX's CPU matmuls through OpenBLAS
    main()
