"""`ondevice-lora serve` under load and against strangers: disconnects free the worker, the
queue and the context are bounded, every bad field is a 400, and only loopback names, no web
pages and (when set) the API key get in. Servers listen on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import socket
import threading
import time

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from ondevice_lora.cli import main
from ondevice_lora.loading import load
from ondevice_lora.serve.access import AccessConfig, check_bind, host_name
from ondevice_lora.serve.app import bind_socket, make_app, make_server
from ondevice_lora.serve.engine import Engine
from ondevice_lora.serve.limits import ServeLimits
from tests.hf_fixtures import write_hf_model

# The tiny model's context, widened so that one request can run long enough to be abandoned.
CONTEXT = 20_000
LONG = CONTEXT - 10  # tokens: far more than any test waits for
TIMEOUT = 2.0  # --request-timeout of the engine that tests it


@contextlib.contextmanager
def running(engine: Engine, access: AccessConfig | None = None):
    """A uvicorn server for `engine` on a free 127.0.0.1 port; yields the port."""
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(engine, access=access)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The tiny model with a CONTEXT-token context."""
    folder = tmp_path_factory.mktemp("serve-guard") / "base"
    write_hf_model(folder, "llama")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def engine(wide):
    # A time limit far beyond the tests' waits: only a disconnect can stop a LONG request.
    limits = ServeLimits(max_queue=1, request_timeout=600)
    engine = Engine(functools.partial(load, wide), "base", {}, limits)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """An engine on the tiny model's own context (256), for requests that fill it: a prefill
    of 20,000 tokens would take minutes here."""
    folder = tmp_path_factory.mktemp("serve-small") / "base"
    write_hf_model(folder, "llama")
    engine = Engine(functools.partial(load, folder), "base", {})
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def port(engine):
    with running(engine) as port:
        yield port


def post(port: int, path: str, body: dict, timeout: float = 30, headers=None):
    """(status, headers, decoded JSON body) of a POST to 127.0.0.1:port/v1/path."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(
            "POST", "/v1" + path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})}
        )  # fmt: skip
        response = connection.getresponse()
        return response.status, dict(response.headers), json.loads(response.read())
    finally:
        connection.close()


def long_request(port: int, stream: bool) -> socket.socket:
    """Start a request for LONG tokens on a raw socket (closing it is the client leaving)."""
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": LONG, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def wait_until(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def generating(engine: Engine, steps_before: int):
    return lambda: len(engine.stats.step_seconds) > steps_before + 5


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_the_worker_within_a_step(engine, port, stream):
    cancelled = engine.stats.cancelled
    client = long_request(port, stream)
    wait_until(generating(engine, len(engine.stats.step_seconds)))
    client.close()
    # Before: the worker kept generating the abandoned LONG tokens first (minutes): this
    # request's 20 s client timeout would expire.
    status, _, body = post(port, "/completions", {"prompt": "hi", "max_tokens": 1}, timeout=20)
    assert status == 200 and body["usage"]["completion_tokens"] == 1
    assert engine.stats.cancelled == cancelled + 1
    lag, step = engine.stats.release_lags[-1]
    assert lag <= step + 0.5  # within the model step it was in, and scheduling slack


def test_prompts_and_max_tokens_are_held_to_the_context(small):
    context = small.context_length
    assert context == 256
    client = TestClient(make_app(small), base_url="http://127.0.0.1:8080")

    def post_small(body):
        response = client.post("/v1/completions", json=body)
        return response.status_code, response.json()

    status, body = post_small({"prompt": [5] * (context + 1)})
    message = body["error"]["message"]
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert f"{context + 1} tokens" in message and f"context is {context} tokens" in message
    status, body = post_small({"prompt": [5, 6], "max_tokens": 10**9})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert str(10**9) in body["error"]["message"] and str(context) in body["error"]["message"]
    # A max_tokens that fits the context but not beside this prompt is capped to the room left.
    status, body = post_small({"prompt": [5] * (context - 3), "max_tokens": 50})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] <= 3
    assert body["usage"]["completion_tokens"] == 3 or body["choices"][0]["finish_reason"] == "stop"


def test_a_full_queue_answers_503_with_retry_after(engine, port):
    steps = len(engine.stats.step_seconds)
    running_one = long_request(port, stream=True)
    wait_until(generating(engine, steps))
    waiting = long_request(port, stream=True)  # max_queue=1: this one waits
    wait_until(lambda: engine._admission.pending == 2)
    try:
        status, headers, body = post(port, "/completions", {"prompt": "hi", "max_tokens": 1})
        assert status == 503 and body["error"]["code"] == "server_busy"
        assert int(headers["retry-after"]) >= 1
    finally:
        running_one.close()
        waiting.close()
    wait_until(lambda: engine._admission.pending == 0)
    status, _, _ = post(port, "/completions", {"prompt": "hi", "max_tokens": 1})
    assert status == 200


def test_a_request_past_its_time_limit_gets_504_and_frees_the_worker(wide):
    limits = ServeLimits(request_timeout=TIMEOUT)
    engine = Engine(functools.partial(load, wide), "base", {}, limits)
    try:
        client = TestClient(make_app(engine), base_url="http://127.0.0.1:8080")
        started = time.monotonic()
        response = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": LONG})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 10
        response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert response.status_code == 200
        assert engine.stats.cancelled == 1  # the worker stopped the timed-out generation
    finally:
        engine.close()


BAD_FIELDS = [
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"model": 7}, "model"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
]


def test_every_invalid_field_is_a_400_naming_it(port):
    for fields, param in BAD_FIELDS:
        status, _, body = post(port, "/completions", {"prompt": "hi", **fields})
        assert status == 400 and body["error"]["param"] == param, (fields, body)
    # seed at the top of its range is fine (before: 2**64 was a 500)
    status, _, _ = post(port, "/completions", {"prompt": "hi", "max_tokens": 1, "seed": 2**64 - 1})
    assert status == 200


def test_no_model_or_default_is_the_base(port):
    answers = []
    for model in ({}, {"model": "default"}, {"model": "base"}):
        status, _, body = post(port, "/completions", {"prompt": "Once", "max_tokens": 4, **model})
        assert status == 200, body
        answers.append(body["choices"][0]["text"])
        assert body["model"] == "base"
    assert answers[0] == answers[1] == answers[2]


def test_strangers_are_kept_out(engine):
    key = "s3cret-key"
    access = AccessConfig(api_key=key, allowed_origins=("https://app.example",))
    client = TestClient(make_app(engine, access), base_url="http://127.0.0.1:8080")
    auth = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/models", headers=auth).status_code == 200
    # No key, or a wrong one (of the same length too): 401 in OpenAI's error shape.
    for headers in ({}, {"Authorization": "Bearer s3cret-kez"}, {"Authorization": key}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    # DNS rebinding: a page at evil.example whose name now points to 127.0.0.1.
    evil = {**auth, "Host": "evil.example", "Origin": "http://evil.example"}
    body = json.dumps({"prompt": "secret?", "max_tokens": 2})
    steps = len(engine.stats.step_seconds)
    for headers in (evil, {**auth, "Host": "evil.example:8080"}):
        response = client.post("/v1/completions", content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "host_not_allowed"
    # A foreign page's "simple" text/plain POST (no preflight needed) never reaches the model.
    foreign = {**auth, "Origin": "https://other.example", "Content-Type": "text/plain"}
    response = client.post("/v1/completions", content=body, headers=foreign)
    assert response.status_code == 403 and "choices" not in response.json()
    assert "access-control-allow-origin" not in response.headers
    assert len(engine.stats.step_seconds) == steps  # nothing was generated for them
    # The allowed origin gets CORS, preflight included (which carries no key).
    app_origin = {"Origin": "https://app.example"}
    preflight = client.options(
        "/v1/completions",
        headers={**app_origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    )  # fmt: skip
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    response = client.post("/v1/completions", content=body, headers={**auth, **app_origin})
    assert response.status_code == 200 and response.json()["choices"]
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    # Without --allowed-origins no page gets in, and no CORS header is ever sent.
    plain = TestClient(make_app(engine), base_url="http://localhost:8080")
    response = plain.get("/v1/models", headers={"Origin": "https://app.example"})
    assert response.status_code == 403 and "access-control-allow-origin" not in response.headers
    assert plain.get("/v1/models").status_code == 200


def test_host_names_and_binding_beyond_loopback():
    assert host_name("[::1]:8080") == "::1" and host_name("LocalHost:80") == "localhost"
    assert host_name("127.0.0.1") == "127.0.0.1"
    assert check_bind("127.0.0.1", AccessConfig()) is None
    warning = check_bind("0.0.0.0", AccessConfig(api_key="k"))
    assert warning.startswith("warning: listening on 0.0.0.0")
    # The command refuses before loading or binding anything.
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code != 0 and "--api-key" in result.output
