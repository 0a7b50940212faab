"""Offline by construction: while training or evaluating, nothing leaves through Python.

`offline(guard=True)` sets HF_HUB_OFFLINE=1 (so Hugging Face libraries answer from the local
cache only) and turns on a guard that refuses, with NetworkBlockedError:

- connecting a socket, or sending a datagram without connecting (sendto, sendmsg), to any
  address but a Unix domain socket (those reach only processes on this machine);
- binding a socket to an address other than loopback (a listener others could reach);
- name resolution: getaddrinfo, gethostbyname(_ex), gethostbyaddr, getnameinfo (a DNS query
  can itself carry data out);
- starting a process: subprocess, os.system, os.exec*, os.fork/forkpty, os.posix_spawn*,
  os.spawn*, and multiprocessing's fork-exec (a child could do what the guard forbids); only
  the local helpers in LOCAL_PROGRAMS may run.

The guard is a Python audit hook (`sys.addaudithook`, PEP 578): CPython raises the audit event
inside its own C socket and os functions, so `_socket.socket.connect` and every wrapper above it
(urllib, asyncio, requests, http.client) are covered, whatever the import order. An audit hook
cannot be removed, so it is installed once and does nothing while no guard is on.

What it cannot see: code in C extensions or loaded through ctypes that calls the C library
directly (MLX's own distributed ring, for one, which `train --workers N` uses between its ranks
on 127.0.0.1), sockets connected before the guard went up (send/recv on them raise no event),
and processes started before it (our own `train --workers N` launcher starts its ranks before
any of them trains; each rank is guarded itself).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys

from ..errors import OndeviceLoraError

ENV_VAR = "HF_HUB_OFFLINE"
# Programs the guard lets training start, by file name. fc-list lists the installed fonts:
# matplotlib runs it once to build its font cache when the loss curve is drawn at the end of
# training; without it a first run on a fresh machine would fail (or cache no system fonts).
LOCAL_PROGRAMS = frozenset({"fc-list"})


class NetworkBlockedError(OndeviceLoraError):
    """A network connection, name lookup or new process was attempted under the offline guard."""


def _message(what: str) -> str:
    return (
        f"blocked {what}: training and evaluation are offline by construction, so your data "
        "never leaves this machine. If you really need the network during training (a callback "
        "that reports somewhere), turn the guard off: `ondevice-lora train --no-offline-guard`, "
        "or offline_guard: false in the config file, or TrainConfig(offline_guard=False)."
    )


def _address(address) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return repr(address)


def _is_local_ipc(sock) -> bool:
    # Unix domain sockets talk to processes on this machine only; they are not the network.
    return getattr(socket, "AF_UNIX", None) is not None and sock.family == socket.AF_UNIX


def _is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) and address else address
    try:
        return ipaddress.ip_address(host).is_loopback
    except (TypeError, ValueError):
        return False  # a name ("localhost") would need a lookup: refuse it like any other


# Audit event -> what the refusal says it blocked, from the event's arguments.
_SOCKET_SENDS = {
    "socket.connect": "a network connection (connect to {})",
    "socket.sendto": "a datagram (sendto {})",
    "socket.sendmsg": "a datagram (sendmsg to {})",
}
_LOOKUPS = {
    "socket.getaddrinfo": lambda args: f"getaddrinfo for {_address(args[:2])}",
    "socket.gethostbyname": lambda args: f"gethostbyname for {args[0]!r}",
    "socket.gethostbyaddr": lambda args: f"gethostbyaddr for {args[0]!r}",
    "socket.getnameinfo": lambda args: f"getnameinfo for {_address(args[0])}",
}


def _program(event: str, args: tuple) -> str | None:
    """The file name of the program a process event would run (None: unknown or a shell)."""
    if event == "subprocess.Popen":
        executable, argv = args[0], args[1]
        if executable is None:
            executable = argv if isinstance(argv, (str, bytes, os.PathLike)) else argv[0]
    elif event in ("os.exec", "os.posix_spawn"):
        executable = args[0]
    else:
        return None
    try:
        return os.path.basename(os.fsdecode(executable))
    except TypeError:
        return None


_PROCESSES = {
    "subprocess.Popen": lambda args: f"subprocess {args[1]!r:.200}",
    "os.system": lambda args: f"os.system {args[0]!r:.200}",
    "os.exec": lambda args: f"os.exec* {args[0]!r:.200}",
    "os.posix_spawn": lambda args: f"os.posix_spawn {args[0]!r:.200}",
    "os.spawn": lambda args: f"os.spawn* {args[1]!r:.200}",
    "os.fork": lambda args: "os.fork",
    "os.forkpty": lambda args: "os.forkpty",
}


def _refusal(event: str, args: tuple) -> str | None:
    """What the guard refuses for this audit event, or None to let it happen."""
    if event in _SOCKET_SENDS:
        sock, address = args[0], args[1]
        if _is_local_ipc(sock):
            return None
        return _SOCKET_SENDS[event].format(_address(address))
    if event == "socket.bind":
        sock, address = args
        if _is_local_ipc(sock) or _is_loopback(address):
            return None
        return f"listening on the network (bind to {_address(address)})"
    if event in _LOOKUPS:
        return f"a name lookup ({_LOOKUPS[event](args)})"
    if event in _PROCESSES:
        if _program(event, args) in LOCAL_PROGRAMS:
            return None
        return f"starting a process ({_PROCESSES[event](args)})"
    return None


_WATCHED = frozenset({*_SOCKET_SENDS, "socket.bind", *_LOOKUPS, *_PROCESSES})

# Whether a guard is on right now (nested `offline()` blocks share the outer one's).
_active = False
_hook_installed = False


def _audit(event: str, args: tuple) -> None:
    # Called for every audit event in the process, for its whole life: return fast.
    if not _active or event not in _WATCHED:
        return
    refused = _refusal(event, args)
    if refused is not None:
        raise NetworkBlockedError(_message(refused))


def _blocked_fork_exec(*args, **kwargs):
    raise NetworkBlockedError(_message("starting a process (multiprocessing fork_exec)"))


def _install_hook() -> None:
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True


def guard_installed() -> bool:
    """Whether the guard is on right now."""
    return _active


@contextlib.contextmanager
def _guarded():
    global _active
    # multiprocessing's spawn and forkserver start methods call this C function directly,
    # without an audit event (subprocess raises one first): replace it while guarded.
    import _posixsubprocess

    fork_exec = _posixsubprocess.fork_exec
    _install_hook()
    _active = True
    _posixsubprocess.fork_exec = _blocked_fork_exec
    try:
        yield
    finally:
        _active = False
        _posixsubprocess.fork_exec = fork_exec


@contextlib.contextmanager
def offline(guard: bool = True):
    """Run the body with HF_HUB_OFFLINE=1 and, when `guard`, the network, name lookups and new
    processes refused (see the module's docstring for exactly what is covered).

    Restores the environment variable, huggingface_hub's cached copy of it and the guard's
    previous state on exit.
    """
    previous_env = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "1"
    # huggingface_hub reads the variable once, at import; update its copy if it is loaded.
    hub_constants = sys.modules.get("huggingface_hub.constants")
    previous_hub = getattr(hub_constants, ENV_VAR, None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    with contextlib.ExitStack() as stack:
        if guard and not _active:
            stack.enter_context(_guarded())
        try:
            yield
        finally:
            if previous_env is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = previous_env
            if hub_constants is not None:
                hub_constants.HF_HUB_OFFLINE = previous_hub
