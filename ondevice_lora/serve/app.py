"""The HTTP side of `ondevice-lora serve`: OpenAI's routes on Starlette, served by uvicorn.

    GET  /v1/models              the base model and each adapter, by the id a request names
    POST /v1/chat/completions    messages -> the assistant's reply (stream: server-sent events)
    POST /v1/completions         prompt -> its continuation, no chat template

Every error, ours or the framework's (404, 405), is answered in OpenAI's JSON error shape.
Every request passes access.py's checks (Host, Origin, API key) first.
"""

from __future__ import annotations

import asyncio
import json
import socket

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .access import AccessConfig, with_access
from .engine import ClientGone, Engine, Finished
from .schema import APIError, Responses, parse_request, usage


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body, status_code=error.status, headers=error.headers)


async def _watch_disconnect(request: Request, disconnected: asyncio.Event) -> None:
    """Set `disconnected` when the client closes the connection.

    Once the body is read, the server's next message on this request is its disconnect; a
    handler that only sends never sees it, so without this an abandoned request would keep the
    one worker busy to its last token.
    """
    message = await request.receive()
    while message["type"] != "http.disconnect":
        message = await request.receive()
    disconnected.set()


def _sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def make_app(engine: Engine, access: AccessConfig | None = None):
    """The ASGI app answering OpenAI's API with `engine`'s model and adapters, behind the
    access checks (default: loopback Host names, no web pages, no API key)."""

    async def models(request: Request) -> JSONResponse:
        data = [
            {"id": served, "object": "model", "created": 0, "owned_by": "ondevice-lora"}
            for served in engine.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def completions(request: Request, chat: bool):
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON: {e}") from None
            parsed = parse_request(body, chat=chat)
            ids = engine.prepare(parsed)
            job = engine.submit(parsed, ids)  # before any status line: a full queue is a 503
        except APIError as e:
            return _error_response(e)
        responses = Responses(parsed)
        disconnected = asyncio.Event()
        if parsed.stream:
            return StreamingResponse(
                _stream(engine, job, request, parsed, responses), media_type="text/event-stream"
            )
        pieces = []
        watcher = asyncio.ensure_future(_watch_disconnect(request, disconnected))
        try:
            async for event in engine.events(job, disconnected):
                if isinstance(event, Finished):
                    used = usage(event.prompt_tokens, event.completion_tokens)
                    return JSONResponse(
                        responses.complete("".join(pieces), event.finish_reason, used)
                    )
                pieces.append(event)
        except APIError as e:
            return _error_response(e)
        except ClientGone:
            return _error_response(APIError(499, "the client closed the connection"))
        except Exception as e:
            return _error_response(APIError(500, f"generation failed: {type(e).__name__}: {e}"))
        finally:
            watcher.cancel()

    async def chat_completions(request: Request):
        return await completions(request, chat=True)

    async def text_completions(request: Request):
        return await completions(request, chat=False)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(APIError(exc.status_code, message, code=code))

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    return with_access(app, access or AccessConfig())


async def _stream(engine: Engine, job, http: Request, request, responses: Responses):
    """The server-sent events of one streamed answer, ending with `data: [DONE]`."""
    disconnected = asyncio.Event()
    watcher = asyncio.ensure_future(_watch_disconnect(http, disconnected))
    events = engine.events(job, disconnected)
    try:
        if request.chat:
            yield _sse(responses.chunk(None, first=True))  # the role first, as OpenAI sends it
        async for event in events:
            if isinstance(event, Finished):
                yield _sse(responses.chunk(None, event.finish_reason))
                if request.include_usage:
                    used = usage(event.prompt_tokens, event.completion_tokens)
                    yield _sse(responses.usage_chunk(used))
            else:
                yield _sse(responses.chunk(event))
    except ClientGone:
        return  # nobody is listening any more
    except APIError as e:  # past the time limit
        # The status line is already sent: the error travels as an event, as OpenAI's does.
        yield _sse(e.body)
    except Exception as e:
        yield _sse(APIError(500, f"generation failed: {type(e).__name__}: {e}").body)
    finally:
        job.cancel()  # also when the response never got to iterate `events`
        watcher.cancel()
    yield _sse("[DONE]")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one, see getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from ..errors import OndeviceLoraError

        raise OndeviceLoraError(
            f"cannot listen on {host}:{port}: {e.strerror}. Pick another --port (0: any free one)."
        ) from None
    sock.listen(128)
    return sock


def make_server(engine: Engine, log_level: str = "warning", access: AccessConfig | None = None):
    """A uvicorn server for the app; run it with `server.run(sockets=[sock])`."""
    import uvicorn

    config = uvicorn.Config(make_app(engine, access), log_level=log_level, lifespan="off")
    return uvicorn.Server(config)
