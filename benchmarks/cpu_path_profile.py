"""Where a training step's time goes on MLX's Linux CPU backend, and what each CPU change gains.

    python benchmarks/cpu_path_profile.py              # the 88M Llama, 1 packed row of 511
    python benchmarks/cpu_path_profile.py --quick      # the small model, to check it runs

One packed batch of the benchmark's chats, the 4-bit base with rank-8 LoRA on every linear
layer; the compiled loss-and-gradient of a training step is timed with the CPU changes
switched on one after another, each configuration in a process of its own (a BLAS preload
only takes at process start):

  1. MLX as shipped: its bundled reference BLAS, its 4-bit matmul kernel, its attention.
  2. + OpenBLAS preloaded (fast_blas.py; the system's, or scipy-openblas32 through blas_shim).
  3. + de-quantise-then-matmul for the 4-bit layers (cpu_matmul.py).
  4. + causal attention block by block, skipping the masked half (backend/cpu_attention.py).
  5. + the output head at the trained positions only (training/trained_positions.py).

Every configuration computes the same loss (printed, to float32 rounding). The table gives
seconds per step, model GFLOP/s, and the speed-up over the previous line; results go to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import bench_setup as setup

HERE = Path(__file__).resolve().parent
STAGES = [
    ("MLX as shipped", {"blas": False, "dequant": False, "blocks": False, "positions": False}),
    ("+ OpenBLAS", {"blas": True, "dequant": False, "blocks": False, "positions": False}),
    ("+ de-quantise, then matmul", {"blas": True, "dequant": True, "blocks": False, "positions": False}),
    ("+ block causal attention", {"blas": True, "dequant": True, "blocks": True, "positions": False}),
    ("+ head at trained positions", {"blas": True, "dequant": True, "blocks": True, "positions": True}),
]  # fmt: skip
# Timed calls: at least MIN_CALLS, more while under MIN_SECONDS (the slow stages take one).
MIN_CALLS, MIN_SECONDS = 1, 20.0


def child(spec: dict) -> dict:
    """One configuration: load, wrap, time the compiled loss and gradient of one batch."""
    import mlx.core as mx
    import mlx.nn as nn

    from ondevice_lora.adapters.files import LoraConfig, apply_adapters
    from ondevice_lora.backend.cpu_matmul import dequantized_matmuls
    from ondevice_lora.backend.fast_blas import blas_provider
    from ondevice_lora.data.packing import iterate_packed_batches
    from ondevice_lora.loading import load_model
    from ondevice_lora.models import llama
    from ondevice_lora.training.step import masked_cross_entropy
    from ondevice_lora.training.trained_positions import trained_positions

    if not spec["blocks"]:  # MLX's own kernel for every attention call
        llama.scaled_dot_product_attention = lambda q, k, v, scale, mask: (
            mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        )
    mx.random.seed(0)
    model, _ = load_model(spec["model_folder"])
    apply_adapters(model, LoraConfig(rank=8, alpha=16.0, target_modules="all-linear"))
    train, _ = setup.read_data(spec["data"])
    batch = next(iter(iterate_packed_batches(train, spec["rows"], spec["max_length"], seed=0)))
    extra = {"loss_positions": trained_positions(batch.loss_mask)} if spec["positions"] else {}
    value_and_grad = nn.value_and_grad(model, masked_cross_entropy)

    # Compiled as the trainer compiles its step: the model is state, not an argument.
    @partial(mx.compile, inputs=model.state, outputs=model.state)
    def loss_and_grad(batch, extra):
        return value_and_grad(model, *batch, **extra)

    with dequantized_matmuls(model, enabled=spec["dequant"]):
        mx.eval(loss_and_grad(tuple(batch), extra))  # trace and compile
        times = []
        while len(times) < MIN_CALLS or sum(times) < MIN_SECONDS and len(times) < 5:
            tic = time.perf_counter()
            (loss, ntoks), grads = loss_and_grad(tuple(batch), extra)
            mx.eval(loss, grads)
            times.append(time.perf_counter() - tic)
    segments = mx.array(batch.segment_ids).tolist()
    lengths = [row.count(s) + 1 for row in segments for s in set(row) if s > 0]
    flops = setup.model_flops(lengths, int(ntoks.item()), spec["model_config"])
    seconds = sorted(times)[len(times) // 2]
    return {
        "seconds": seconds,
        "calls": len(times),
        "loss": loss.item(),
        "positions": sum(lengths) - len(lengths),
        "model_gflops_per_s": flops / seconds / 1e9,
        "blas": blas_provider(),
    }


def run_stage(name: str, stage: dict, spec: dict, work: Path) -> dict:
    from ondevice_lora.backend.fast_blas import OPT_OUT_ENV, find_openblas, preload_env

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env[OPT_OUT_ENV] = "0"
    if stage["blas"]:
        library = find_openblas()
        if library is None:
            return {"stage": name, "error": "no OpenBLAS found (see fast_blas.INSTALL_HINT)"}
        env = preload_env(library, env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    spec_path, out_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps({**spec, **stage}))
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(spec_path), str(out_path)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        return {"stage": name, "error": done.stderr.strip().splitlines()[-1]}
    return {"stage": name, **stage, **json.loads(out_path.read_text())}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small model")
    parser.add_argument("--rows", type=int, default=1, help="packed rows in the batch")
    parser.add_argument(
        "--stages", default="1-5", help="which stages to run, e.g. 3-5 (the fast ones) [1-5]"
    )
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/)")
    args = parser.parse_args(argv)
    first, _, last = args.stages.partition("-")
    stages = STAGES[int(first) - 1 : int(last or first)]
    config = setup.QUICK_MODEL if args.quick else setup.FULL_MODEL
    max_length = 512
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = setup.write_model(work / "model", config, bits=setup.BITS)
        train = setup.make_chats(200, config["vocab_size"], max_length, seed=0)
        data = setup.write_data(work / "data.json", train, [])
        spec = {
            "model_folder": str(folder), "model_config": config, "data": str(data),
            "rows": args.rows, "max_length": max_length,
        }  # fmt: skip
        results = []
        for name, stage in stages:
            print(f"{name} ...", flush=True)
            results.append(run_stage(name, stage, spec, work))
    print(table(results, args))
    out = (
        args.out or HERE / "results" / f"cpu_path_profile_{'quick' if args.quick else 'full'}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": args.rows, "model": config, "stages": results}, indent=2))
    print(f"results: {out}")
    return results


def table(results: list[dict], args) -> str:
    """A Markdown table, as the README shows it."""
    lines = [
        f"{'small model' if args.quick else '88M Llama, 4-bit'}, {args.rows} packed row(s) of "
        "511 positions, rank-8 LoRA on every linear layer; compiled loss and gradient:",
        "",
        "| configuration | s/step | model GFLOP/s | speed-up | loss |",
        "|---|---:|---:|---:|---:|",
    ]
    previous = None
    for r in results:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['error']} | | | |")
            continue
        gain = f"{previous / r['seconds']:.1f}x" if previous else ""
        lines.append(
            f"| {r['stage']} | {r['seconds']:.2f} | {r['model_gflops_per_s']:.1f} | {gain} | "
            f"{r['loss']:.5f} |"
        )
        previous = r["seconds"]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        result = child(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(result))
    else:
        main()
