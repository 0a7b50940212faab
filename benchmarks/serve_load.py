"""`ondevice-lora serve` under a burst: 50 concurrent requests, some of whose clients leave.

Starts the server in this process on a free 127.0.0.1 port (the built-in SmolLM2-135M unless
--model), sends N requests at once from N threads (streamed and not, mixed), closes every
`--leave-every`-th connection partway, and checks that every request completes, is refused
with 503 (the bounded queue), or was cancelled by its client; that the worker let go of each
abandoned generation within about one decode step; and prints p50/p95 latencies.

    python benchmarks/serve_load.py                       # ~1-3 min on 2 cores
    python benchmarks/serve_load.py --max-tokens 8 --max-queue 4
    python benchmarks/serve_load.py --tiny --max-tokens 64 --leave-after 0.2 2   # ~1 min
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import random
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ondevice_lora.loading import load
from ondevice_lora.serve.app import bind_socket, make_server
from ondevice_lora.serve.engine import Engine
from ondevice_lora.serve.limits import ServeLimits

PROMPTS = ["Tell me about France", "What is a LoRA adapter?", "Write a haiku about rain"]
# A prompt the tiny random model does not end early (greedy), so a leaver is still running.
LEAVER_PROMPT = "What is a LoRA adapter?"


def ask(port: int, index: int, max_tokens: int, stream: bool, timeout: float) -> tuple:
    """(outcome, seconds) of one request answered to its end."""
    body = {
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        connection.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    seconds = time.perf_counter() - started
    if response.status == 503:
        return "refused (503)", seconds
    if response.status == 504:
        return "timed out (504)", seconds
    if response.status != 200:
        return f"error {response.status}: {text[:200]}", seconds
    done = text.rstrip().endswith("data: [DONE]") if stream else "choices" in json.loads(text)
    return ("completed" if done else "incomplete"), seconds


def leave(port: int, stream: bool, after: float, max_tokens: int) -> tuple:
    """Send a long request and close the connection `after` seconds later (unless the server
    refused it with 503 before then)."""
    body = json.dumps(
        {"messages": [{"role": "user", "content": LEAVER_PROMPT}],
         "max_tokens": max_tokens, "stream": stream}
    ).encode()  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    started = time.perf_counter()
    sock.settimeout(after)
    try:
        first = sock.recv(64)  # a 503 comes at once; an admitted answer starts with 200
    except TimeoutError:
        first = b""
    status = first[9:12].decode()
    if status in ("", "200"):  # admitted: leave while it runs (or waits)
        time.sleep(max(0.0, after - (time.perf_counter() - started)))
    sock.close()
    outcome = {"": "cancelled by its client", "200": "cancelled by its client"}
    return outcome.get(status, "refused (503)" if status == "503" else f"error {status}"), after


def tiny_model() -> str:
    """The tests' tiny random Llama (transformers writes it), with a 4,096-token context."""
    import tempfile
    from pathlib import Path

    from tests.hf_fixtures import write_hf_model

    folder = Path(tempfile.mkdtemp(prefix="serve-load-")) / "tiny-llama"
    write_hf_model(folder, "llama")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the built-in SmolLM2-135M")
    parser.add_argument(
        "--tiny", action="store_true", help="the tests' tiny random Llama (needs transformers)"
    )
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--leave-every", type=int, default=5, help="every Nth client leaves")
    parser.add_argument(
        "--leave-after", type=float, nargs=2, default=(1.0, 30.0), metavar=("MIN", "MAX"),
        help="a leaving client closes its connection after MIN to MAX seconds (uniform)",
    )  # fmt: skip
    parser.add_argument("--max-queue", type=int, default=ServeLimits.max_queue)
    parser.add_argument("--request-timeout", type=float, default=ServeLimits.request_timeout)
    args = parser.parse_args()
    from ondevice_lora.backend.fast_blas import reexec_with_fast_blas

    reexec_with_fast_blas()  # as the `ondevice-lora` command does

    if args.tiny:
        args.model = tiny_model()
    limits = ServeLimits(max_queue=args.max_queue, request_timeout=args.request_timeout)
    engine = Engine(functools.partial(load, args.model), "base", {}, limits)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(engine)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    # Warm up (first-call compilation), so the burst measures steady serving.
    ask(port, 0, 2, False, 120)

    rng = random.Random(0)
    wall = time.perf_counter()
    client_timeout = args.request_timeout + 60  # the server answers 504 before this
    with ThreadPoolExecutor(max_workers=args.requests) as pool:
        futures = []
        for i in range(args.requests):
            stream = i % 2 == 1
            if args.leave_every and i % args.leave_every == 0:
                after = rng.uniform(*args.leave_after)
                long = engine.context_length // 2  # longer than any wait here
                futures.append(pool.submit(leave, port, stream, after, long))
            else:
                futures.append(pool.submit(ask, port, i, args.max_tokens, stream, client_timeout))
        results = [f.result() for f in futures]
    wall = time.perf_counter() - wall
    # The worker drains what the leavers left queued; then it must be idle.
    deadline = time.monotonic() + 60
    while engine._admission.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    idle = engine._admission.pending == 0

    outcomes: dict[str, int] = {}
    for outcome, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    completed = [s for o, s in results if o == "completed"]
    refused = [s for o, s in results if o == "refused (503)"]
    stats = engine.stats
    steps = list(stats.step_seconds)
    name = "tiny random Llama (tests/hf_fixtures.py)" if args.tiny else args.model
    print(f"model: {name or 'built-in SmolLM2-135M (Q4_1 GGUF)'}")
    print(
        f"{args.requests} concurrent requests ({args.max_tokens} tokens each, every "
        f"{args.leave_every}th client leaves after {args.leave_after[0]:g}-{args.leave_after[1]:g} "
        f"s), --max-queue {args.max_queue}, "
        f"--request-timeout {args.request_timeout:g}: {wall:.1f} s in all"
    )
    for outcome, count in sorted(outcomes.items()):
        print(f"  {outcome:<24} {count}")
    if completed:
        print(
            f"completed latency: p50 {percentile(completed, 0.5):.2f} s, "
            f"p95 {percentile(completed, 0.95):.2f} s, max {max(completed):.2f} s"
        )
    if refused:
        print(f"503 answered in: p50 {percentile(refused, 0.5) * 1000:.0f} ms")
    if steps:
        print(f"decode step: median {statistics.median(steps) * 1000:.1f} ms")
    lags = stats.release_lags
    for lag, step in lags:
        print(
            f"worker released an abandoned generation {lag * 1000:.1f} ms after its client "
            f"left, within the model step it was in ({step * 1000:.1f} ms)"
        )
    print(f"server stats (warm-up included): completed {stats.completed}, cancelled "
          f"{stats.cancelled}, refused {stats.refused}; worker idle at the end: {idle}")  # fmt: skip

    server.should_exit = True
    thread.join(timeout=10)
    engine.close()
    sock.close()
    allowed = {"completed", "refused (503)", "cancelled by its client"}
    within_a_step = all(lag <= step + 0.25 for lag, step in lags)  # 0.25 s: scheduling slack
    ok = idle and set(outcomes) <= allowed and within_a_step
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
