"""The `ondevice-lora serve` command. Starlette and uvicorn are imported only when it runs."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from ..adapters.mix import parse_adapter_specs
from ..errors import OndeviceLoraError
from .limits import ServeLimits


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def base_model_id(name: str | None) -> str:
    """The id the base model is served under: its folder or file name, or the Hub id."""
    if name is None:
        from ..loading.defaults import default_model_path

        name = default_model_path()
    path = Path(name).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return str(name)


@click.command("serve")
@click.option("--model", "model_name", default=None, help="Model folder, .gguf file or Hub id.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="NAME=FOLDER (or FOLDER, named after it); repeat for several. A request picks one "
    "by passing its NAME as `model`.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8080, show_default=True, help="0 picks a free port.")
@click.option("--log-level", default="warning", show_default=True, help="uvicorn's log level.")
@click.option(
    "--api-key",
    envvar="ONDEVICE_LORA_API_KEY",
    default=None,
    help="Require Authorization: Bearer KEY on every request (also ONDEVICE_LORA_API_KEY). "
    "Required with a --host beyond loopback.",
)
@click.option(
    "--allowed-hosts",
    default=None,
    help="Comma-separated Host header names the server answers (default: 127.0.0.1, "
    "localhost, ::1 and the --host address); '*' answers any (no DNS-rebinding protection).",
)
@click.option(
    "--allowed-origins",
    default="",
    help="Comma-separated web origins (https://app.example) whose pages may call the server, "
    "with CORS. Default: none; requests carrying any Origin header are refused.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=ServeLimits.max_queue,
    show_default=True,
    help="Requests that may wait behind the running one; more are answered 503 + Retry-After.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=ServeLimits.request_timeout,
    show_default=True,
    help="Seconds a request may take, waiting and generating; past it: 504.",
)
def serve_command(
    model_name,
    adapters,
    host,
    port,
    log_level,
    api_key,
    allowed_hosts,
    allowed_origins,
    max_queue,
    request_timeout,
):
    """Serve the model and its adapters with OpenAI's API (/v1/chat/completions, ...).

    One base model is loaded; each adapter is served as a model of its own name ("default",
    or no model, is the base). Requests are answered one at a time, in the order they arrive;
    a client that disconnects stops its generation.
    """
    try:
        from .access import AccessConfig, check_bind, default_allowed_hosts
        from .app import bind_socket, make_server
        from .engine import Engine
    except ImportError as e:
        raise OndeviceLoraError(
            f"serve needs starlette and uvicorn ({e}); install them with "
            "pip install 'ondevice-lora[serve]'."
        ) from None
    from ..loading import load

    hosts = _names(allowed_hosts) if allowed_hosts is not None else default_allowed_hosts(host)
    access = AccessConfig(api_key, hosts, _names(allowed_origins))
    warning = check_bind(host, access)  # before loading anything: refuse early
    limits = ServeLimits(max_queue=max_queue, request_timeout=request_timeout)
    specs = parse_adapter_specs(adapters)
    base_id = base_model_id(model_name)
    engine = Engine(functools.partial(load, model_name), base_id, specs, limits)
    sock = bind_socket(host, port)
    host_, port_ = sock.getsockname()[:2]
    if warning:
        click.echo(warning, err=True)
    click.echo(f"serving {', '.join(engine.models)} on http://{host_}:{port_}/v1", err=True)
    try:
        make_server(engine, log_level, access).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down gracefully and re-raised Ctrl-C: a normal way to stop
    finally:
        engine.close()
        sock.close()
