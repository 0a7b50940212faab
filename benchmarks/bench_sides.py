"""One side of the training benchmark, run in a process of its own (so that its peak memory and
max RSS are its own): `python benchmarks/bench_sides.py SPEC.json OUT.json`.

SPEC names the trainer ("ours" or "mlx-lm"), the model folder, the data file and the shared
settings. Each side plans how many steps reach the trained-token budget (its batches are
deterministic), trains that many, times every step, then measures the validation loss with the
same code for both (bench_setup.validation_loss).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import bench_setup as setup
import mlx.core as mx
import numpy as np

LORA_KEYS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
]  # fmt: skip


def batch_stats(trained: float, targets: np.ndarray, example_positions: list[int]) -> dict:
    """One batch: trained tokens, real (non-padding) positions, slots, each example's positions."""
    return {
        "trained": int(trained),
        "real": int((targets != setup.PAD).sum()),
        "slots": int(targets.size),
        "positions": [int(p) for p in example_positions],
    }


def plan(batches, budget: int, stats_of) -> list[dict]:
    """Stats of the batches, in order, until their trained tokens reach `budget`."""
    out, total = [], 0
    for batch in batches:
        out.append(stats_of(batch))
        total += out[-1]["trained"]
        if total >= budget:
            return out
    return out


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 n x n matmul rate of MLX in this process (with whichever BLAS it is bound to)."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9


# --- our trainer --------------------------------------------------------------------------------


def _ours_stats(batch) -> dict:
    targets = np.asarray(batch.targets)
    segments = getattr(batch, "segment_ids", None)
    if segments is None:  # bucketed: one example per row
        positions = list((targets != setup.PAD).sum(axis=1))
    else:  # packed: one example per nonzero segment id of each row
        positions = [
            int(c)
            for row in np.asarray(segments)
            for c in np.unique(row[row > 0], return_counts=True)[1]
        ]
    return batch_stats(np.asarray(batch.loss_mask).sum(), targets, positions)


def run_ours(spec: dict, train_set: list, valid_set: list) -> dict:
    from ondevice_lora.backend.cpu_matmul import dequantized_matmuls
    from ondevice_lora.data.packing import BATCHING
    from ondevice_lora.loading import load_model
    from ondevice_lora.training import TrainConfig, TrainingCallback, train

    model, _ = load_model(spec["model_folder"])
    tokenizer = setup.make_tokenizer(spec["model_config"]["vocab_size"])
    settings = dict(
        adapter_path=str(Path(spec["work"]) / "adapter"), rank=spec["rank"],
        alpha=spec["alpha"], dropout=0.0, target_modules="all-linear",
        max_length=spec["max_length"], optimizer="adam", learning_rate=spec["learning_rate"],
        lr_schedule="constant", batch_size=spec["batch_size"], eval_every=0, save_every=0,
        keep_best=False, seed=spec["seed"], iters=1,
    )  # fmt: skip
    if spec.get("batching"):
        settings["batching"] = spec["batching"]
    config = TrainConfig(**settings)
    iterator = BATCHING[config.batching](
        train_set, config.batch_size, config.max_length, seed=config.seed, repeat=True,
        pad_id=setup.PAD,
    )  # fmt: skip
    planned = plan(iterator, spec["budget_tokens"], _ours_stats)
    config.iters = len(planned)

    class Clock(TrainingCallback):
        def __init__(self):
            self.times: list[tuple[float, float]] = []

        def on_step_end(self, record):
            self.times.append(clock_now())

    clock = Clock()
    started = clock_now()
    train(model, tokenizer, train_set, None, config, callbacks=[clock], show_progress=False)
    result = _measure(started, clock.times, planned)
    result["batching"] = config.batching
    with dequantized_matmuls(model):
        result["val_loss"] = setup.validation_loss(model, valid_set)
    return result


# --- mlx-lm -------------------------------------------------------------------------------------


class TokenChats:
    """Chats in mlx-lm's dataset protocol: raw records, and process() -> (tokens, offset).

    The records are dicts, as mlx-lm's ChatDataset's are, so its CacheDataset measures every
    record with len(dict) and its length sort sorts nothing: mlx-lm as it trains chat data.
    """

    def __init__(self, examples):
        self._data = [{"input_ids": x["input_ids"], "offset": x["offset"]} for x in examples]

    def process(self, record):
        return record["input_ids"], record["offset"]

    def __getitem__(self, index):
        return self._data[index]

    def __len__(self):
        return len(self._data)


def _mlx_lm_stats(batch, lengths) -> dict:
    tokens, lengths = np.asarray(batch), np.asarray(lengths)
    width = tokens.shape[1] - 1  # inputs are tokens[:, :-1]
    # mlx-lm's own mask: target steps 1..width from each offset up to each length.
    steps = np.arange(1, width + 1)[None]
    mask = (steps >= lengths[:, :1]) & (steps <= lengths[:, 1:])
    positions = np.minimum(lengths[:, 1], width + 1) - 1
    return batch_stats(mask.sum(), tokens[:, 1:], list(positions))


def run_mlx_lm(spec: dict, train_set: list, valid_set: list) -> dict:
    import mlx.optimizers as optim
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from ondevice_lora.backend.cpu_matmul import dequantized_matmuls

    model, _ = load_model(Path(spec["model_folder"]))
    mx.random.seed(spec["seed"])
    model.freeze()
    lora = {"rank": spec["rank"], "scale": spec["alpha"] / spec["rank"], "dropout": 0.0}
    linear_to_lora_layers(model, len(model.layers), {**lora, "keys": LORA_KEYS})
    dataset = CacheDataset(TokenChats(train_set))
    shape = dict(dataset=dataset, batch_size=spec["batch_size"], max_seq_length=spec["max_length"])
    # mlx-lm's trainer shuffles with numpy's global generator (its CLI seeds it first).
    np.random.seed(spec["seed"])
    batches = (_mlx_lm_stats(*b) for b in trainer.iterate_batches(**shape, loop=True))
    planned = plan(batches, spec["budget_tokens"], lambda s: s)
    seen: list[dict] = []

    def recording_batches(**kwargs):
        for batch, lengths in trainer.iterate_batches(**kwargs):
            seen.append(_mlx_lm_stats(batch, lengths))
            yield batch, lengths

    class Clock(TrainingCallback):
        def __init__(self):
            self.times: list[tuple[float, float]] = []

        def on_train_loss_report(self, info):
            self.times.append(clock_now())

    args = trainer.TrainingArgs(
        batch_size=spec["batch_size"], iters=len(planned), val_batches=0, steps_per_report=1,
        steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=spec["max_length"],
        adapter_file=str(Path(spec["work"]) / "adapters.safetensors"),
    )  # fmt: skip
    clock = Clock()
    np.random.seed(spec["seed"])
    mx.reset_peak_memory()  # as our trainer does: the peak of training, weights included
    started = clock_now()
    trainer.train(
        model, optim.Adam(learning_rate=spec["learning_rate"]), dataset, None, args,
        iterate_batches=recording_batches, training_callback=clock,
    )  # fmt: skip
    result = _measure(started, clock.times, seen[: len(planned)])
    result["batching"] = "mlx-lm (padded to 32k+1)"
    with dequantized_matmuls(model):
        result["val_loss"] = setup.validation_loss(model, valid_set)
    return result


# --- shared -------------------------------------------------------------------------------------


def clock_now() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds, all threads)."""
    return time.perf_counter(), time.process_time()


def _measure(started, times: list, batches: list[dict]) -> dict:
    """Timing, tokens and memory of a finished run. Step 1 includes compiling the step, so
    rates are over steps 2..N (over step 1 alone if there is no other). CPU seconds are the
    process's own: on a shared machine they move less than wall time with others' load."""
    clocks = np.array([started, *times])  # (steps + 1, 2): wall, cpu
    durations = np.diff(clocks[:, 0]).tolist()
    cpu = np.diff(clocks[:, 1]).tolist()
    steady = slice(1, None) if len(durations) > 1 else slice(0, None)
    seconds = sum(durations[steady])
    cpu_seconds = sum(cpu[steady])
    kept = batches[steady]
    trained = sum(b["trained"] for b in kept)
    real = sum(b["real"] for b in kept)
    return {
        "steps": len(durations),
        "first_step_s": durations[0],
        "step_seconds": durations,
        "seconds_per_step": seconds / max(1, len(kept)),
        "trained_tokens": sum(b["trained"] for b in batches),
        "trained_tokens_per_s": trained / seconds,
        "real_tokens_per_s": real / seconds,
        "trained_tokens_per_cpu_s": trained / cpu_seconds,
        "cpu_seconds_per_step": cpu_seconds / max(1, len(kept)),
        "padding_share": 1 - sum(b["real"] for b in batches) / sum(b["slots"] for b in batches),
        "steady_seconds": seconds,
        "steady_positions": [p for b in kept for p in b["positions"]],
        "steady_trained_tokens": trained,
        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
        # ru_maxrss is in KiB on Linux (bytes on macOS).
        "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        * (1 if sys.platform == "darwin" else 1024)
        / 1e9,
    }


def main(spec_path: str, out_path: str) -> None:
    from ondevice_lora.backend.fast_blas import blas_provider

    spec = json.loads(Path(spec_path).read_text())
    train_set, valid_set = setup.read_data(spec["data"])
    runner = {"ours": run_ours, "mlx-lm": run_mlx_lm}[spec["framework"]]
    result = runner(spec, train_set, valid_set)
    result["blas"] = blas_provider() or "MLX's bundled reference BLAS"
    result["mlx_matmul_gflops"] = matmul_gflops()
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
