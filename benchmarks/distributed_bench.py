"""Scaling of data-parallel training: tokens/s with 1 and with N local workers (ring, loopback).

Every row trains the same LoRA on the same 4-bit random Llama and the same chats
(bench_setup), with the same global batch, for the same number of steps; each rank is its own
process, started with MLX_RANK/MLX_HOSTFILE as `ondevice-lora train --workers N` starts them.
On one machine the workers share its cores, so this measures the overhead of the split and
the all-reduce more than a speed-up; across machines each rank brings its own.

    python benchmarks/distributed_bench.py                # 1 vs 2 workers (~3 min on 2 cores)
    python benchmarks/distributed_bench.py --workers 1,2,4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

MODEL = {  # between bench_setup's quick and full models: a few seconds per step here
    "hidden_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "intermediate_size": 1024,
    "vocab_size": 4096,
}


def rank_main(work: Path, steps: int, batch_size: int, out: Path) -> None:
    """One rank: train on its share and, on rank 0, write the run's numbers."""
    import mlx.core as mx
    from bench_setup import make_tokenizer, read_data

    from ondevice_lora.loading import load_model
    from ondevice_lora.training import TrainConfig, train

    model, config = load_model(work / "model")
    chats, _ = read_data(work / "data.json")
    settings = TrainConfig(
        adapter_path=str(out), iters=steps, batch_size=batch_size, max_length=256,
        rank=8, dropout=0.0, learning_rate=5e-4, lr_schedule="constant", eval_every=0,
        save_every=0, keep_best=False, batching="bucketed",
    )  # fmt: skip
    result = train(model, make_tokenizer(config["vocab_size"]), chats, None, settings,
                   show_progress=False)  # fmt: skip
    if os.environ.get("MLX_RANK", "0") == "0":
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        timed = records[2:]  # the first steps compile
        tokens = sum(r["tokens"] for r in timed)
        seconds = sum(r["tokens"] / r["tokens_per_second"] for r in timed)
        summary = {"tokens_per_second": tokens / seconds, "peak_memory_gb": result.peak_memory_gb}
        (out / "bench.json").write_text(json.dumps(summary))
        mx.eval()


def run_workers(n: int, work: Path, steps: int, batch_size: int) -> dict:
    from ondevice_lora.training.distributed import _free_ports, worker_env

    out = Path(tempfile.mkdtemp(dir=work, prefix=f"w{n}-"))
    hostfile = out / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
    command = [sys.executable, __file__, "--rank-of", str(work), "--steps", str(steps),
               "--batch-size", str(batch_size), "--out", str(out / "adapter")]  # fmt: skip
    # The ranks get the environment `train --workers` gives them.
    envs = [worker_env(r, n, hostfile) if n > 1 else dict(os.environ) for r in range(n)]
    processes = [subprocess.Popen(command, env=env) for env in envs]
    codes = [p.wait() for p in processes]
    if any(codes):
        raise SystemExit(f"{n} workers: exit codes {codes}")
    return json.loads((out / "adapter" / "bench.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=str(HERE / "results" / "distributed_bench.json"))
    parser.add_argument("--rank-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_of:
        rank_main(Path(args.rank_of), args.steps, args.batch_size, Path(args.out))
        return

    from bench_setup import FULL_MODEL, make_chats, write_data, write_model

    from ondevice_lora.backend.fast_blas import reexec_with_fast_blas

    reexec_with_fast_blas()
    work = Path(args.work or tempfile.mkdtemp(prefix="distributed-bench-"))
    config = {**FULL_MODEL, **MODEL}
    write_model(work / "model", config, bits=4)
    chats = make_chats(400, config["vocab_size"], 256, seed=0)
    write_data(work / "data.json", chats, [])
    rows = []
    for n in [int(w) for w in args.workers.split(",")]:
        row = {"workers": n, **run_workers(n, work, args.steps, args.batch_size)}
        rows.append(row)
        print(f"{n} worker(s): {row['tokens_per_second']:.0f} tokens/s, "
              f"peak {row['peak_memory_gb']:.2f} GB per rank", flush=True)  # fmt: skip
    base = rows[0]["tokens_per_second"]
    print("\n| workers | tokens/s | vs 1 | peak GB per rank |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['tokens_per_second']:.0f} | "
              f"{r['tokens_per_second'] / base:.2f}x | {r['peak_memory_gb']:.2f} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": config, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
