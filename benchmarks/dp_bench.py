"""DP-LoRA's cost: trained tokens/s of DP-SGD (per-example clipping, noise) against plain
training, same model, data and expected batch, each in this process one after the other.

    python benchmarks/dp_bench.py            # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

MODEL = {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6,
         "num_key_value_heads": 2, "intermediate_size": 1024, "vocab_size": 4096}  # fmt: skip


def run(work: Path, steps: int, dp: bool) -> dict:
    from bench_setup import make_tokenizer, read_data

    from ondevice_lora.loading import load_model
    from ondevice_lora.training import TrainConfig, train

    model, config = load_model(work / "model")
    chats, _ = read_data(work / "data.json")
    out = Path(tempfile.mkdtemp(dir=work))
    settings = TrainConfig(
        adapter_path=str(out), iters=steps, batch_size=4, max_length=256, rank=8, dropout=0.0,
        learning_rate=5e-4, lr_schedule="constant", eval_every=0, save_every=0, keep_best=False,
        batching="bucketed", dp_noise_multiplier=1.0 if dp else None, dp_delta=1e-5,
    )  # fmt: skip
    result = train(model, make_tokenizer(config["vocab_size"]), chats, None, settings,
                   show_progress=False)  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[2:]  # the first steps compile or warm up
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["tokens"] / r["tokens_per_second"] for r in timed)
    return {"tokens_per_second": tokens / seconds, "peak_memory_gb": result.peak_memory_gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=str(HERE / "results" / "dp_bench.json"))
    args = parser.parse_args()

    from bench_setup import FULL_MODEL, make_chats, write_data, write_model

    from ondevice_lora.backend.fast_blas import reexec_with_fast_blas

    reexec_with_fast_blas()
    work = Path(tempfile.mkdtemp(prefix="dp-bench-"))
    config = {**FULL_MODEL, **MODEL}
    write_model(work / "model", config, bits=4)
    write_data(work / "data.json", make_chats(400, config["vocab_size"], 256, seed=0), [])
    rows = {"plain": run(work, args.steps, dp=False), "DP-SGD": run(work, args.steps, dp=True)}
    print("| training | trained tok/s | vs plain | MLX peak |\n|---|---:|---:|---:|")
    base = rows["plain"]["tokens_per_second"]
    for name, r in rows.items():
        print(f"| {name} | {r['tokens_per_second']:.0f} | {r['tokens_per_second'] / base:.2f}x "
              f"| {r['peak_memory_gb']:.2f} GB |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": config, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
