"""The HTTP side of `ondevice-lora serve`: OpenAI's routes on Starlette, served by uvicorn.

    GET  /v1/models              the base model and each adapter, by the id a request names
    POST /v1/chat/completions    messages -> the assistant's reply (stream: server-sent events)
    POST /v1/completions         prompt -> its continuation, no chat template

Every error, ours or the framework's (404, 405), is answered in OpenAI's JSON error shape.
"""

from __future__ import annotations

import json
import socket

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Finished
from .schema import APIError, Responses, parse_request, usage


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body, status_code=error.status)


def _sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def make_app(engine: Engine) -> Starlette:
    """The Starlette app answering OpenAI's API with `engine`'s model and adapters."""

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
            ids = engine.prompt_ids(parsed)
        except APIError as e:
            return _error_response(e)
        responses = Responses(parsed)
        if parsed.stream:
            return StreamingResponse(
                _stream(engine, parsed, ids, responses), media_type="text/event-stream"
            )
        pieces = []
        try:
            async for event in engine.generate(parsed, ids):
                if isinstance(event, Finished):
                    used = usage(event.prompt_tokens, event.completion_tokens)
                    return JSONResponse(
                        responses.complete("".join(pieces), event.finish_reason, used)
                    )
                pieces.append(event)
        except APIError as e:
            return _error_response(e)
        except Exception as e:
            return _error_response(APIError(500, f"generation failed: {type(e).__name__}: {e}"))

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
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


async def _stream(engine: Engine, request, ids, responses: Responses):
    """The server-sent events of one streamed answer, ending with `data: [DONE]`."""
    if request.chat:
        yield _sse(responses.chunk(None, first=True))  # the role comes first, as OpenAI sends
    try:
        async for event in engine.generate(request, ids):
            if isinstance(event, Finished):
                yield _sse(responses.chunk(None, event.finish_reason))
                if request.include_usage:
                    used = usage(event.prompt_tokens, event.completion_tokens)
                    yield _sse(responses.usage_chunk(used))
            else:
                yield _sse(responses.chunk(event))
    except Exception as e:
        # The status line is already sent: the error travels as an event, as OpenAI's does.
        yield _sse(APIError(500, f"generation failed: {type(e).__name__}: {e}").body)
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


def make_server(engine: Engine, log_level: str = "warning"):
    """A uvicorn server for the app; run it with `server.run(sockets=[sock])`."""
    import uvicorn

    config = uvicorn.Config(make_app(engine), log_level=log_level, lifespan="off")
    return uvicorn.Server(config)
