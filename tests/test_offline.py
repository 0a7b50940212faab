"""Offline by construction: a socket opened during training fails loudly; the guard is removed
afterwards. Connections go to a listener on 127.0.0.1 only, never to another address."""

from __future__ import annotations

import _socket
import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys

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
    with offline():
        assert guard_installed()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            with pytest.raises(NetworkBlockedError, match="offline by construction"):
                s.connect(("127.0.0.1", listener))
            with pytest.raises(NetworkBlockedError):
                s.connect_ex(("127.0.0.1", listener))
            # The C type under socket.socket: no Python wrapper to patch, the audit event holds.
            with pytest.raises(NetworkBlockedError, match=f"127.0.0.1:{listener}"):
                _socket.socket.connect(s, ("127.0.0.1", listener))
        with pytest.raises(NetworkBlockedError):
            socket.create_connection(("127.0.0.1", listener))
        with offline():  # nested: still guarded, and the inner exit does not lift the guard
            pass
        assert guard_installed()
    assert not guard_installed()
    assert can_connect(listener)


@pytest.fixture
def datagrams():
    """A UDP receiver on 127.0.0.1: (its address, a function returning what arrived)."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(0.5)

    def arrived() -> list[bytes]:
        got = []
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(receiver.recv(64))
        return got

    yield receiver.getsockname(), arrived
    receiver.close()


def test_no_datagram_leaves_by_sendto_or_sendmsg(datagrams):
    address, arrived = datagrams
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with offline():
            with pytest.raises(NetworkBlockedError, match="sendto"):
                s.sendto(b"sendto", address)
            with pytest.raises(NetworkBlockedError, match="sendmsg"):
                s.sendmsg([b"sendmsg"], [], 0, address)
            with pytest.raises(NetworkBlockedError, match="sendto"):
                _socket.socket.sendto(s, b"raw", address)
        assert arrived() == []
        s.sendmsg([b"after"], [], 0, address)  # the guard is off again
        assert arrived() == [b"after"]


def test_name_lookups_are_refused():
    with offline():
        for lookup, args in (
            (socket.gethostbyname, ("localhost",)),
            (socket.gethostbyname_ex, ("localhost",)),
            (socket.gethostbyaddr, ("127.0.0.1",)),
            (socket.getaddrinfo, ("localhost", 80)),
            (_socket.getaddrinfo, ("localhost", 80)),
            (socket.getnameinfo, (("127.0.0.1", 80), 0)),
        ):
            with pytest.raises(NetworkBlockedError, match="name lookup"):
                lookup(*args)
    assert socket.getaddrinfo("127.0.0.1", 80)


def test_listening_beyond_loopback_is_refused():
    with offline(), socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(NetworkBlockedError, match="bind to 0.0.0.0"):
            s.bind(("0.0.0.0", 0))
        s.bind(("127.0.0.1", 0))  # loopback listeners reach this machine only


def test_new_processes_are_refused(tmp_path):
    with offline():
        with pytest.raises(NetworkBlockedError, match="starting a process"):
            subprocess.run(["true"])
        with pytest.raises(NetworkBlockedError, match="os.system"):
            os.system("true")
        with pytest.raises(NetworkBlockedError, match="posix_spawn"):
            os.posix_spawn("/bin/true", ["true"], os.environ)
        with pytest.raises(NetworkBlockedError, match="os.fork"):
            if os.fork() == 0:  # only reached when the guard fails: the child leaves at once
                os._exit(0)
        process = multiprocessing.get_context("spawn").Process(target=print)
        with pytest.raises(NetworkBlockedError, match="starting a process"):
            process.start()
    assert subprocess.run(["true"]).returncode == 0


def test_the_loss_curve_is_drawn_under_the_guard_on_a_fresh_machine(tmp_path):
    # matplotlib builds its font cache (running fc-list) the first time it draws: with an empty
    # cache folder, as on a fresh machine, that happens inside the guard at the end of training.
    script = (
        "from ondevice_lora.training.offline import offline\n"
        "from ondevice_lora.training.metrics import plot_losses\n"
        "with offline():\n"
        f"    plot_losses([{{'step': 1, 'train_loss': 2.0}}], {str(tmp_path / 'loss.png')!r})\n"
    )
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_exec_is_refused():
    # os.execv replaces the process when it succeeds: try it in a child, started unguarded.
    script = (
        "import os, sys\n"
        "from ondevice_lora.training.offline import offline, NetworkBlockedError\n"
        "with offline():\n"
        "    try:\n"
        "        os.execv(sys.executable, [sys.executable, '-c', 'print(\"escaped\")'])\n"
        "    except NetworkBlockedError as e:\n"
        "        print('refused:', e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused: blocked starting a process (os.exec*")


class SendsAway(TrainingCallback):
    """Tries one way out after the first step, recording whether it got through."""

    def __init__(self, action):
        self.action = action
        self.got_through = False

    def on_step_end(self, record):
        self.action()
        self.got_through = True


def test_no_datagram_lookup_or_process_gets_out_during_training(inputs, tmp_path, datagrams):
    address, arrived = datagrams
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    actions = {
        "sendmsg": lambda: udp.sendmsg([b"training data"], [], 0, address),
        "_socket connect": lambda: _socket.socket.connect(udp, address),
        "gethostbyname": lambda: socket.gethostbyname("localhost"),
        "subprocess": lambda: subprocess.run(["true"]),
    }
    for name, action in actions.items():
        callback = SendsAway(action)
        with pytest.raises(NetworkBlockedError, match="offline by construction"):
            run(inputs, tmp_path / name, callback)
        assert not callback.got_through, name
    udp.close()
    assert arrived() == []
    assert not guard_installed()
