"""Offline by construction: a socket opened during training fails loudly; the guard is removed
afterwards. Connections go to a listener on 127.0.0.1 only, never to another address."""

from __future__ import annotations

import os
import socket

import pytest

from ondevice_lora.data import DataConfig, load_datasets
from ondevice_lora.loading import load
from ondevice_lora.training import NetworkBlockedError, TrainConfig, TrainingCallback, train
from ondevice_lora.training.offline import guard_installed, offline
from tests.hf_fixtures import write_hf_model
from tests.test_training import write_facts


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    write_hf_model(root / "model", "llama")
    write_facts(root / "facts")
    return root


@pytest.fixture
def listener():
    """A loopback port that accepts connections, so only the guard can make one fail."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


class Connects(TrainingCallback):
    """Tries to open a loopback connection after the first step, recording what happened."""

    def __init__(self, port: int):
        self.port = port
        self.hub_offline = None
        self.connected = False

    def on_step_end(self, record):
        self.hub_offline = os.environ.get("HF_HUB_OFFLINE")
        with socket.create_connection(("127.0.0.1", self.port), timeout=5):
            self.connected = True


def run(inputs, tmp_path, callback, **settings):
    model, tokenizer = load(inputs / "model")
    splits = load_datasets(DataConfig(inputs / "facts"), tokenizer)
    config = TrainConfig(
        adapter_path=str(tmp_path / "adapter"), iters=1, eval_every=0, save_every=0, **settings
    )
    return train(model, tokenizer, splits.train, None, config, [callback], show_progress=False)


def can_connect(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        return True


def test_a_socket_opened_during_training_fails_with_a_clear_message(
    inputs, tmp_path, listener, monkeypatch
):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    original_connect = socket.socket.connect
    callback = Connects(listener)
    with pytest.raises(NetworkBlockedError) as info:
        run(inputs, tmp_path, callback)
    message = str(info.value)
    assert f"127.0.0.1:{listener}" in message
    assert "offline by construction" in message
    assert "--no-offline-guard" in message and "offline_guard=False" in message
    assert callback.hub_offline == "1" and not callback.connected
    # Everything is put back: the socket functions, the environment, the connection works.
    assert not guard_installed()
    assert socket.socket.connect is original_connect
    assert "HF_HUB_OFFLINE" not in os.environ
    assert can_connect(listener)


def test_the_guard_can_be_turned_off(inputs, tmp_path, listener):
    callback = Connects(listener)
    run(inputs, tmp_path, callback, offline_guard=False)
    assert callback.connected
    assert callback.hub_offline == "1"  # the Hub stays offline either way


def test_every_way_to_connect_is_blocked_and_restored(listener):
    def functions():
        return (
            socket.socket.connect,
            socket.socket.connect_ex,
            socket.socket.sendto,
            socket.create_connection,
            socket.getaddrinfo,
        )

    originals = functions()
    with offline():
        assert guard_installed()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            with pytest.raises(NetworkBlockedError, match="offline by construction"):
                s.connect(("127.0.0.1", listener))
            with pytest.raises(NetworkBlockedError):
                s.connect_ex(("127.0.0.1", listener))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            with pytest.raises(NetworkBlockedError):
                s.sendto(b"x", ("127.0.0.1", listener))
        with pytest.raises(NetworkBlockedError):
            socket.create_connection(("127.0.0.1", listener))
        with pytest.raises(NetworkBlockedError):
            socket.getaddrinfo("localhost", listener)
        with offline():  # nested: still guarded, and the inner exit does not lift the guard
            pass
        assert guard_installed()
    assert functions() == originals
    assert not guard_installed()
    assert can_connect(listener)
