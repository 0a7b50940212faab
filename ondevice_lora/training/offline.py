"""Offline by construction: while training or evaluating, no network connection can be opened.

`offline(guard=True)` sets HF_HUB_OFFLINE=1 (so Hugging Face libraries answer from the local
cache only) and replaces the socket entry points that reach another machine
(socket.socket.connect / connect_ex / sendto, socket.create_connection,
socket.getaddrinfo) with functions that raise NetworkBlockedError. Unix domain sockets, which
reach only processes on this machine, are let through. Everything is put back on exit, even after an error.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

from ..errors import OndeviceLoraError

ENV_VAR = "HF_HUB_OFFLINE"


class NetworkBlockedError(OndeviceLoraError):
    """A network connection was attempted while the offline guard was on."""


def _message(what: str) -> str:
    return (
        f"blocked a network connection ({what}): training and evaluation are offline by "
        "construction, so your data never leaves this machine. If you really need the network "
        "during training (a callback that reports somewhere), turn the guard off: "
        "`ondevice-lora train --no-offline-guard`, or offline_guard: false in the config file, "
        "or TrainConfig(offline_guard=False)."
    )


def _address(address) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return repr(address)


def _is_local_ipc(sock: socket.socket) -> bool:
    # Unix domain sockets talk to processes on this machine only; they are not the network.
    return getattr(socket, "AF_UNIX", None) is not None and sock.family == socket.AF_UNIX


class _Guard:
    """The patched socket functions and the originals they replace."""

    def __init__(self):
        self.originals = {
            "connect": socket.socket.connect,
            "connect_ex": socket.socket.connect_ex,
            # UDP can send a datagram without connecting first.
            "sendto": socket.socket.sendto,
            "create_connection": socket.create_connection,
            "getaddrinfo": socket.getaddrinfo,
        }

    def install(self) -> None:
        connect, connect_ex = self.originals["connect"], self.originals["connect_ex"]
        sendto = self.originals["sendto"]

        def guarded_connect(sock, address):
            if _is_local_ipc(sock):
                return connect(sock, address)
            raise NetworkBlockedError(_message(f"connect to {_address(address)}"))

        def guarded_connect_ex(sock, address):
            if _is_local_ipc(sock):
                return connect_ex(sock, address)
            raise NetworkBlockedError(_message(f"connect_ex to {_address(address)}"))

        def guarded_sendto(sock, data, *args):
            if _is_local_ipc(sock):
                return sendto(sock, data, *args)
            raise NetworkBlockedError(_message(f"sendto {_address(args[-1])}"))

        def guarded_create_connection(address, *args, **kwargs):
            raise NetworkBlockedError(_message(f"create_connection to {_address(address)}"))

        def guarded_getaddrinfo(host, port, *args, **kwargs):
            raise NetworkBlockedError(_message(f"getaddrinfo for {host}:{port}"))

        socket.socket.connect = guarded_connect
        socket.socket.connect_ex = guarded_connect_ex
        socket.socket.sendto = guarded_sendto
        socket.create_connection = guarded_create_connection
        socket.getaddrinfo = guarded_getaddrinfo

    def remove(self) -> None:
        socket.socket.connect = self.originals["connect"]
        socket.socket.connect_ex = self.originals["connect_ex"]
        socket.socket.sendto = self.originals["sendto"]
        socket.create_connection = self.originals["create_connection"]
        socket.getaddrinfo = self.originals["getaddrinfo"]


# The guard currently installed, so that nested `offline()` blocks do not stack patches.
_active: _Guard | None = None


def guard_installed() -> bool:
    """Whether the socket guard is in place right now."""
    return _active is not None


@contextlib.contextmanager
def offline(guard: bool = True):
    """Run the body with HF_HUB_OFFLINE=1 and, when `guard`, every network connection refused.

    Restores the environment variable, huggingface_hub's cached copy of it and the socket
    functions on exit.
    """
    global _active
    previous_env = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "1"
    # huggingface_hub reads the variable once, at import; update its copy if it is loaded.
    hub_constants = sys.modules.get("huggingface_hub.constants")
    previous_hub = getattr(hub_constants, ENV_VAR, None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    installed_here = None
    if guard and _active is None:
        installed_here = _active = _Guard()
        installed_here.install()
    try:
        yield
    finally:
        if installed_here is not None:
            installed_here.remove()
            _active = None
        if previous_env is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous_env
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = previous_hub
