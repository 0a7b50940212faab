"""The `ondevice-lora serve` command. Starlette and uvicorn are imported only when it runs."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from ..adapters.mix import parse_adapter_specs
from ..errors import OndeviceLoraError


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
def serve_command(model_name, adapters, host, port, log_level):
    """Serve the model and its adapters with OpenAI's API (/v1/chat/completions, ...).

    One base model is loaded; each adapter is served as a model of its own name. Requests
    are answered one at a time, in the order they arrive.
    """
    try:
        from .app import bind_socket, make_server
        from .engine import Engine
    except ImportError as e:
        raise OndeviceLoraError(
            f"serve needs starlette and uvicorn ({e}); install them with "
            "pip install 'ondevice-lora[serve]'."
        ) from None
    from ..loading import load

    specs = parse_adapter_specs(adapters)
    base_id = base_model_id(model_name)
    engine = Engine(functools.partial(load, model_name), base_id, specs)
    sock = bind_socket(host, port)
    host_, port_ = sock.getsockname()[:2]
    click.echo(f"serving {', '.join(engine.models)} on http://{host_}:{port_}/v1", err=True)
    try:
        make_server(engine, log_level).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down gracefully and re-raised Ctrl-C: a normal way to stop
    finally:
        engine.close()
        sock.close()
