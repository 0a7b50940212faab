"""benchmarks/train_bench.py --quick runs end to end and writes every field the README reads.

Timings are never asserted: they depend on the machine and whatever else runs on it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ondevice_lora.training.config import DEFAULT_BATCHING

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_bench.py"
ROW_FIELDS = {
    "row", "framework", "bits", "batching", "steps", "trained_tokens", "trained_tokens_per_s",
    "real_tokens_per_s", "seconds_per_step", "first_step_s", "padding_share", "mlx_peak_gb",
    "max_rss_gb", "val_loss", "mfu", "model_gflops_per_s", "mlx_matmul_gflops", "blas",
    "trained_tokens_per_cpu_s",
}  # fmt: skip


@pytest.mark.slow
def test_quick_benchmark_writes_its_results(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "quick"
    assert report["machine"]["fp32_matmul_ceiling_gflops"] > 0
    settings = report["settings"]
    assert settings["rank"] == 8 and settings["batch_size"] == 4 and settings["chats"] > 0
    rows = {r["row"]: r for r in report["rows"]}
    with_mlx_lm = importlib.util.find_spec("mlx_lm") is not None
    expected = {"ours-4bit-packed", "ours-4bit-bucketed", "ours-fp32"}
    expected |= {"mlx-lm-fp32"} if with_mlx_lm else set()
    assert set(rows) == expected
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("error"))
        assert ROW_FIELDS <= set(row), (name, ROW_FIELDS - set(row))
        # Every row trains up to the same budget of trained tokens.
        assert row["trained_tokens"] >= settings["budget_tokens"]
        assert 0 <= row["padding_share"] < 1 and 0 < row["mfu"] < 1
        assert row["val_loss"] > 0 and row["mlx_peak_gb"] > 0
    if with_mlx_lm:
        assert set(report["comparison"]) >= {"trained_tokens_per_s_ratio", "mlx_peak_ratio"}
        # The comparison is of our trainer as it runs by default.
        assert rows[report["comparison"]["ours"]]["batching"] == DEFAULT_BATCHING
    assert "trained tok/s" in run.stdout
