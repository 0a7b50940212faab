"""`ondevice-lora serve`, talked to with the official openai client.

The references: `ondevice-lora generate` (the CLI, through click's runner) with the same
adapter and settings, and the openai package's own parsing of our responses and errors.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from click.testing import CliRunner

from ondevice_lora import SamplingConfig, generate, load
from ondevice_lora.adapters.files import LoraConfig
from ondevice_lora.cli import main
from ondevice_lora.serve.app import bind_socket, make_server
from ondevice_lora.serve.engine import Engine, StopMatcher
from tests.adapter_fixtures import write_adapter
from tests.hf_fixtures import write_hf_model

MAX_TOKENS = 12
ADAPTERS = {
    "a": LoraConfig(rank=4, alpha=8, target_modules="all-linear"),
    "b": LoraConfig(rank=2, alpha=4, target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(openai client, folders): a server on a free 127.0.0.1 port with adapters a and b."""
    root = tmp_path_factory.mktemp("serve")
    write_hf_model(root / "base", "llama")
    folders = {"base": root / "base"}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        folders[name] = write_adapter(root / "base", root / name, config, lora_b_std=0.5, seed=seed)
    adapters = {name: folders[name] for name in ADAPTERS}
    engine = Engine(functools.partial(load, folders["base"]), "base", adapters)
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(engine)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    yield client, folders
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()
    sock.close()


def cli_generate(folders, model: str, prompt: str, *flags: str) -> str:
    """The reply `ondevice-lora generate` prints for `prompt` (stdout, less its newline)."""
    args = ["generate", "--model", str(folders["base"]), "--prompt", prompt]
    if model != "base":
        args += ["--adapter", str(folders[model])]
    result = CliRunner().invoke(main, [*args, "--max-tokens", str(MAX_TOKENS), *flags])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


def chat(client, model, prompt, **kwargs):
    messages = [{"role": "user", "content": prompt}]
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, **kwargs
    )


@pytest.mark.slow  # with the server's fixture: ~4 s idle, more under load
def test_served_answers_are_the_generate_commands(served):
    client, folders = served
    assert [m.id for m in client.models.list()] == ["base", "a", "b"]
    prompt = "Tell me about France"
    replies = {}
    for model in ("base", "a", "b"):
        expected = cli_generate(folders, model, prompt, "--greedy")
        answer = chat(client, model, prompt, temperature=0)
        choice = answer.choices[0]
        assert choice.message.content == expected and choice.message.role == "assistant"
        assert answer.model == model and answer.usage.completion_tokens <= MAX_TOKENS
        hit_limit = answer.usage.completion_tokens == MAX_TOKENS
        assert choice.finish_reason == ("length" if hit_limit else "stop")

        chunks = list(chat(client, model, prompt, temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == choice.finish_reason
        replies[model] = expected
    # The adapters change the answer, so matching the right reference means something.
    assert len(set(replies.values())) == 3

    # Sampling settings reach the same sampler: temperature, top_p and seed as in the CLI.
    flags = ("--temperature", "0.8", "--top-p", "0.9", "--seed", "7")
    sampled = chat(client, "a", prompt, temperature=0.8, top_p=0.9, seed=7)
    assert sampled.choices[0].message.content == cli_generate(folders, "a", prompt, *flags)

    # /v1/completions: plain text, no chat template, as `generate --no-chat`; stop cuts it.
    text = cli_generate(folders, "b", "Once upon", "--greedy", "--no-chat")
    completion = client.completions.create(
        model="b", prompt="Once upon", max_tokens=MAX_TOKENS, temperature=0
    )
    assert completion.choices[0].text == text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model="b", prompt="Once upon", max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="b", prompt="Once upon", max_tokens=MAX_TOKENS, temperature=0, stop=stop,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text[: text.find(stop)]
    assert chunks[-1].usage.completion_tokens <= MAX_TOKENS


BAD_BODIES = [
    # (path, body, status, param)
    ("/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/chat/completions", {"model": "a"}, 400, "messages"),
    ("/chat/completions", {"model": "a", "messages": "hello"}, 400, "messages"),
    ("/chat/completions", {"model": "a", "messages": [{"content": "x"}]}, 400, "messages[0]"),
    ("/chat/completions", {"model": 5, "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ("/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}], "temperature": 0.5, "max_tokens": 0}, 400, "max_tokens"),
    ("/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
    ("/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
    ("/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ("/completions", {"model": "a", "prompt": ""}, 400, "prompt"),
    ("/completions", {"model": "a", "prompt": [10**9]}, 400, "prompt"),
]  # fmt: skip


def test_malformed_requests_get_json_errors_and_the_server_keeps_serving(served):
    client, _ = served
    for path, body, status, param in BAD_BODIES:
        with pytest.raises(openai.APIStatusError) as caught:
            client.post(path, body=body, cast_to=object)
        error = caught.value
        assert error.status_code == status, (body, error.body)
        # The openai client reads our body as OpenAI's error object.
        assert error.body["param"] == param and error.body["message"], error.body
        assert error.body["type"] == "invalid_request_error"
    # Bodies the openai client would not send: raw bytes over plain HTTP.
    base_url = str(client.base_url).rstrip("/")
    for path, data in (
        ("/chat/completions", b"{not json"),
        ("/chat/completions", b"[1, 2]"),
        ("/no/such/route", None),
        ("/chat/completions", None),  # GET: method not allowed
    ):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(urllib.request.Request(base_url + path, data=data), timeout=30)
        assert 400 <= caught.value.code < 500
        body = json.loads(caught.value.read())
        assert set(body["error"]) == {"message", "type", "param", "code"}
    answer = chat(client, "a", "still there?", temperature=0)
    assert answer.choices[0].message.content


def test_eight_concurrent_requests_all_get_their_own_answer(served):
    client, folders = served
    jobs = [(model, f"question {i}") for i, model in enumerate(["base", "a", "b", "a"] * 2)]
    # The reference: each (adapter, prompt) generated alone, through `generate` directly.
    models = {"base": load(folders["base"])}
    models.update({n: load(folders["base"], adapter=folders[n]) for n in ("a", "b")})
    config = SamplingConfig(temperature=0, max_tokens=MAX_TOKENS)
    expected = [generate(*models[m], p, config) for m, p in jobs]
    assert len(set(expected)) > 4

    def ask(job):
        model, prompt = job
        stream = job[1].endswith(("1", "4", "7"))
        if stream:
            chunks = chat(client, model, prompt, temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        return chat(client, model, prompt, temperature=0).choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == expected


def test_stop_matcher_holds_back_what_may_start_a_stop_string():
    matcher = StopMatcher(["END", "xy"])
    assert matcher.feed("abcE") == ("abc", False)  # "E" may start "END"
    assert matcher.feed("Nd") == ("ENd", False)
    assert matcher.feed("x") == ("", False)
    assert matcher.feed("z EN") == ("xz ", False)
    assert matcher.feed("D tail") == ("", True)
    assert StopMatcher([]).feed("anything") == ("anything", False)
