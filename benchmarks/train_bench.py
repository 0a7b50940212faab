"""Training throughput and memory, ondevice-lora against mlx-lm, on the same model and data.

    python benchmarks/train_bench.py            # the 88M Llama, 500 chats (several minutes)
    python benchmarks/train_bench.py --quick    # a small model, to check it runs (~1 minute)

Makes a random-weight Llama in float32 and 4-bit, and a deterministic
variable-length chat dataset; trains each row in its own process up to the same number of
trained tokens, with the same rank, targets, batch size, maximum length, optimizer and
learning rate; prints one table and writes the results to JSON. Every process gets the same
fast BLAS preloaded (ondevice_lora.backend.fast_blas: a system OpenBLAS, or scipy-openblas32 through a
shim), mlx-lm's included, so the comparison is of the trainers, not of the BLAS. See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_setup as setup
import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from ondevice_lora.training.config import DEFAULT_BATCHING

HERE = Path(__file__).resolve().parent
# Each row: which trainer, which base, and anything it changes. The first "ours" row is
# compared with BASELINE.
ROWS = {
    "ours-4bit": {"framework": "ours", "bits": 4},
    "ours-fp32": {"framework": "ours", "bits": None},
    "ours-4bit-bucketed": {"framework": "ours", "bits": 4, "batching": "bucketed"},
    "ours-4bit-packed": {"framework": "ours", "bits": 4, "batching": "packed"},
    "mlx-lm-fp32": {"framework": "mlx-lm", "bits": None},
    # Opt-in: MLX's 4-bit kernel on Linux CPU trains at a few tokens per second.
    "mlx-lm-4bit": {"framework": "mlx-lm", "bits": 4},
    # Opt-in: our trainer without the CPU path (no OpenBLAS, MLX's quantised kernel).
    "ours-4bit-no-cpu-path": {"framework": "ours", "bits": 4, "cpu_path": False},
}
DEFAULT_ROWS = ["ours-4bit-packed", "ours-4bit-bucketed", "mlx-lm-fp32", "ours-fp32"]
MEDIAN_FIELDS = (
    "trained_tokens_per_s", "real_tokens_per_s", "seconds_per_step", "trained_tokens_per_cpu_s",
    "cpu_seconds_per_step", "first_step_s", "model_gflops_per_s", "val_loss",
)  # fmt: skip
BASELINE = "mlx-lm-fp32"
MODES = {
    # chats, validation chats, longest chat, trained-token budget
    "full": {
        "model": setup.FULL_MODEL,
        "chats": 500,
        "valid": 50,
        "max_length": 512,
        "tokens": 12000,
    },
    "quick": {
        "model": setup.QUICK_MODEL,
        "chats": 80,
        "valid": 8,
        "max_length": 128,
        "tokens": 1500,
    },
}


def numpy_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 matmul rate of numpy (its own optimised BLAS): the machine's ceiling."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def child_env(cpu_path: bool) -> dict:
    """The environment of a side's process: OpenBLAS preloaded when installed (and wanted)."""
    from ondevice_lora.backend.fast_blas import OPT_OUT_ENV, find_openblas, preload_env

    env = dict(os.environ)
    library = find_openblas()
    if cpu_path and library:
        env = preload_env(library, env)
    elif not cpu_path:
        env[OPT_OUT_ENV] = "0"
        env.pop("LD_PRELOAD", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    return env


def run_row(name: str, spec: dict, work: Path, console: Console) -> dict:
    row = ROWS[name]
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)  # a fresh adapter folder: no checkpoint to resume
    folder.mkdir(parents=True)
    spec = {**spec, "framework": row["framework"], "batching": row.get("batching"),
            "model_folder": str(spec["models"][str(row["bits"])]), "work": str(folder)}  # fmt: skip
    (folder / "spec.json").write_text(json.dumps(spec))
    out, log = folder / "result.json", folder / "log.txt"
    console.print(f"[bold]{name}[/]: training (log: {log})")
    with open(log, "w") as handle:
        done = subprocess.run(
            [sys.executable, str(HERE / "bench_sides.py"), str(folder / "spec.json"), str(out)],
            env=child_env(row.get("cpu_path", True)), stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if done.returncode != 0 or not out.is_file():
        tail = log.read_text().splitlines()[-15:]
        console.print(f"[red]{name} failed (exit {done.returncode}):[/]\n" + "\n".join(tail))
        return {"row": name, "error": f"exit {done.returncode}; see {log}"}
    result = {"row": name, **row, **json.loads(out.read_text())}
    flops = setup.model_flops(
        np.asarray(result.pop("steady_positions")) + 1, result["steady_trained_tokens"],
        spec["model_config"],
    )  # fmt: skip
    result["model_gflops_per_s"] = flops / result["steady_seconds"] / 1e9
    return result


def table(results: list[dict], ceiling: float, title: str, markdown: bool = False) -> Table:
    """The results table; markdown=True draws it as a Markdown table (for the README)."""
    out = Table(title=title, box=box.MARKDOWN) if markdown else Table(title=title)
    for column in (
        "run", "base", "batching", "trained tok/s", "real tok/s", "s/step", "trained tok/CPU-s",
        "padding", "MLX peak GB", "max RSS GB", "val loss", "MFU",
    ):  # fmt: skip
        out.add_column(column, justify="left" if column in ("run", "batching") else "right")
    for r in results:
        if "error" in r:
            out.add_row(r["row"], "", r["error"], *[""] * 9)
            continue
        out.add_row(
            r["row"], "4-bit" if r["bits"] else "fp32", r["batching"],
            f"{r['trained_tokens_per_s']:.1f}", f"{r['real_tokens_per_s']:.1f}",
            f"{r['seconds_per_step']:.2f}", f"{r['trained_tokens_per_cpu_s']:.1f}",
            f"{100 * r['padding_share']:.0f}%",
            f"{r['mlx_peak_gb']:.2f}", f"{r['max_rss_gb']:.2f}", f"{r['val_loss']:.4f}",
            f"{100 * r['model_gflops_per_s'] / ceiling:.1f}%",
        )  # fmt: skip
    return out


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per name over its repeats: the median of each rate and time (the machine may be
    shared: one slow or lucky run must not decide), the largest memory figures."""
    rows = []
    for name in dict.fromkeys(r["row"] for r in runs):
        mine = [r for r in runs if r["row"] == name and "error" not in r]
        if not mine:
            rows.append(next(r for r in runs if r["row"] == name))
            continue
        row = {**mine[0], "repeats": len(mine)}
        for key in MEDIAN_FIELDS:
            row[key] = float(np.median([r[key] for r in mine]))
        for key in ("mlx_peak_gb", "max_rss_gb"):
            row[key] = max(r[key] for r in mine)
        rows.append(row)
    return rows


def compare(results: list[dict], runs: list[dict]) -> dict | None:
    """Our default configuration's row (else our first) against the mlx-lm baseline: speed
    ratio and memory ratios. pair_ratios: the speed ratio within each repeat."""
    ok = {r["row"]: r for r in results if "error" not in r}
    mine = [r for r in ok.values() if r["framework"] == "ours"]
    # Our trainer as it runs by default: a 4-bit base, the default batching.
    ours = next(
        (r for r in mine if r["bits"] == 4 and r["batching"] == DEFAULT_BATCHING),
        mine[0] if mine else None,
    )
    base = ok.get(BASELINE)
    if ours is None or base is None:
        return None
    rate = {(r["row"], r["repeat"]): r["trained_tokens_per_s"] for r in runs if "error" not in r}
    pairs = [
        rate[ours["row"], i] / rate[BASELINE, i]
        for i in sorted({r["repeat"] for r in runs})
        if (ours["row"], i) in rate and (BASELINE, i) in rate
    ]
    return {
        "ours": ours["row"],
        "baseline": BASELINE,
        "pair_ratios": pairs,
        "trained_tokens_per_s_ratio": ours["trained_tokens_per_s"] / base["trained_tokens_per_s"],
        "trained_tokens_per_cpu_s_ratio": ours["trained_tokens_per_cpu_s"]
        / base["trained_tokens_per_cpu_s"],
        "mlx_peak_ratio": ours["mlx_peak_gb"] / base["mlx_peak_gb"],
        "max_rss_ratio": ours["max_rss_gb"] / base["max_rss_gb"],
    }


def show(report: dict, console: Console) -> None:
    """Print a report's table, its comparison line, and the table again as Markdown."""
    settings, rows = report["settings"], report["rows"]
    ceiling = report["machine"]["fp32_matmul_ceiling_gflops"]
    repeats = max(r["repeat"] for r in report["runs"]) + 1
    title = (
        f"{'quick' if report['mode'] == 'quick' else '88M Llama'}: {settings['chats']} chats, "
        f"{settings['budget_tokens']} trained tokens per row, medians of {repeats} run(s); "
        f"fp32 matmul ceiling {ceiling:.0f} GFLOP/s"
    )
    console.print(table(rows, ceiling, title))
    c = report["comparison"]
    if c:
        console.print(
            f"{c['ours']} vs {c['baseline']}: {c['trained_tokens_per_s_ratio']:.2f}x trained "
            f"tokens/s ({c['trained_tokens_per_cpu_s_ratio']:.2f}x per CPU-second), MLX peak "
            f"{c['mlx_peak_ratio']:.2f}x, max RSS {c['max_rss_ratio']:.2f}x; per repeat: "
            + ", ".join(f"{x:.2f}x" for x in c["pair_ratios"])
        )
    # The same table as Markdown, to paste into benchmarks/README.md.
    Console(width=250).print(table(rows, ceiling, title, markdown=True))


def show_saved(path: Path) -> dict:
    """Print a saved report; its comparison is recomputed for the trainer's current default
    batching (a report made before the default changed compares the row now the default)."""
    report = json.loads(path.read_text())
    report["default_batching"] = DEFAULT_BATCHING
    report["comparison"] = compare(report["rows"], report["runs"])
    show(report, Console(width=150))
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and data (~1 minute)")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"of {', '.join(ROWS)}")
    parser.add_argument("--tokens", type=int, help="trained-token budget of every row")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/)")
    parser.add_argument("--work", type=Path, help="keep models, data and logs here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="run the rows in turn N times")
    parser.add_argument(
        "--show",
        type=Path,
        help="print a saved results JSON and update its comparison in place; train nothing",
    )
    args = parser.parse_args(argv)
    if args.show:
        return show_saved(args.show)
    mode = MODES["quick" if args.quick else "full"]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if importlib.util.find_spec("mlx_lm") is None:
        rows = [r for r in rows if ROWS[r]["framework"] != "mlx-lm"]
        print("mlx-lm is not installed (pip install -e '.[bench]'): its rows are skipped")
    console = Console(width=150)
    work = args.work or Path(tempfile.mkdtemp(prefix="train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = mode["model"]
    models = {
        str(bits): setup.write_model(work / f"model-{bits or 'fp32'}", config, bits, args.seed)
        for bits in {ROWS[r]["bits"] for r in rows}
    }
    max_length = mode["max_length"]
    train = setup.make_chats(mode["chats"], config["vocab_size"], max_length, args.seed)
    valid = setup.make_chats(mode["valid"], config["vocab_size"], max_length, args.seed + 1)
    spec = {
        "data": str(setup.write_data(work / "chats.json", train, valid)),
        "models": {k: str(v) for k, v in models.items()}, "model_config": config,
        "rank": 8, "alpha": 16.0, "batch_size": 4, "max_length": max_length,
        "learning_rate": 5e-4, "seed": args.seed, "budget_tokens": args.tokens or mode["tokens"],
    }  # fmt: skip
    numpy_rate = numpy_matmul_gflops()
    # Rows take turns (A B A B ...), so a change in the machine's load hits every row alike.
    runs = [
        {**run_row(name, spec, work / f"repeat-{i}", console), "repeat": i}
        for i in range(args.repeat)
        for name in rows
    ]
    mlx_rates = [r["mlx_matmul_gflops"] for r in runs if "mlx_matmul_gflops" in r]
    ceiling = max([numpy_rate, *mlx_rates])
    results = aggregate(runs)
    for r in results + runs:
        if "model_gflops_per_s" in r:
            r["mfu"] = r["model_gflops_per_s"] / ceiling
    lengths = [len(x["input_ids"]) for x in train]
    report = {
        "mode": "quick" if args.quick else "full",
        "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "numpy_fp32_matmul_gflops": numpy_rate, "fp32_matmul_ceiling_gflops": ceiling,
        },
        "settings": {k: v for k, v in spec.items() if k not in ("data", "models")}
        | {"chats": len(train), "mean_chat_tokens": float(np.mean(lengths)),
           "max_chat_tokens": int(max(lengths)), "valid_chats": len(valid)},
        "rows": results,
        "runs": runs,
        "default_batching": DEFAULT_BATCHING,
        "comparison": compare(results, runs),
    }  # fmt: skip
    show(report, console)
    out = args.out or HERE / "results" / f"train_bench_{report['mode']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {out}")
    return report


if __name__ == "__main__":
    main()
